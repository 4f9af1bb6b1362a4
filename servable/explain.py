"""Occlusion explanations, model-agnostic and gradient-free (numpy and Pillow only).

Shared by serving (`/classify/explain`, `/sentiment/explain`) and training's gallery of mistakes:
the same artifact, any backbone, no gradients. Each explanation is one batch of perturbed
inputs whose first row is the unperturbed input; the score of a region (or word) is how much the
target class's probability drops when that region is masked (that word is masked):
positive = it supported the target class, negative = it spoke against it.

What "masked" means is the model's, chosen at training from its training data and stored in its
manifest (`Occlusion`): a patch takes the training images' background value (black for Fashion-MNIST:
a masked patch shows nothing rather than a grey shape), a word becomes the tokenizer's mask token.
An artifact without it keeps the older choice: the image's own mean, the word cut out.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from servable.preprocessing import ImagePreprocessing, normalize

WORD = re.compile(r"\S+")


class Occlusion(BaseModel):
    """What an absent part of the input is, for this model (the manifest's `occlusion`)."""

    pixel_fill: list[float] | None = Field(
        None, description="image models: per channel, 0-255, the training images' background (their border's median)"
    )
    token: str | None = Field(None, description="text models: a masked word becomes this token (None: cut out)")


# ---------------------------------------------------------------- images


def background_fill(images: np.ndarray) -> list[float]:
    """Per channel, the median of the outermost pixels of uint8 (N, H, W, C) images: their background."""
    c = images.shape[-1]
    border = [images[:, 0].reshape(-1, c), images[:, -1].reshape(-1, c), images[:, :, 0].reshape(-1, c),
              images[:, :, -1].reshape(-1, c)]  # fmt: skip
    return [float(v) for v in np.median(np.concatenate(border), axis=0)]


def normalised_fill(occlusion: Occlusion | None, prep: ImagePreprocessing) -> np.ndarray | None:
    """The pixel fill in the model's input units (`normalize`, as the image itself), (C, 1, 1); None without one."""
    if occlusion is None or occlusion.pixel_fill is None:
        return None
    return normalize(np.asarray(occlusion.pixel_fill, np.float32).reshape(1, 1, -1), prep)


def grid_edges(size: int, grid: int) -> np.ndarray:
    """Pixel edges of `grid` near-equal bands over `size` pixels (grid + 1 values)."""
    return np.round(np.linspace(0, size, grid + 1)).astype(int)


def occluded_images(pixels: np.ndarray, grid: int, fill: np.ndarray | None = None) -> np.ndarray:
    """(1 + grid², C, H, W): the input, then one copy per grid cell with that cell filled with `fill`
    ((C, 1, 1), normalised: the model's background, `normalised_fill`) or, without one, the image's
    per-channel mean."""
    _, h, w = pixels.shape
    if fill is None:
        fill = pixels.mean(axis=(1, 2), keepdims=True)
    ys, xs = grid_edges(h, grid), grid_edges(w, grid)
    batch = np.repeat(pixels[None], 1 + grid * grid, axis=0)
    for i in range(grid):
        for j in range(grid):
            cell = batch[1 + i * grid + j]
            cell[:, ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = fill[:, :, :]
    return batch


def occlusion_scores(probs: np.ndarray, target: int, log_odds: bool = False) -> np.ndarray:
    """Drop of the target's probability per perturbed row (probs[0] is the unperturbed input); with
    `log_odds`, the drop of its log-odds, which still separates the words of a 0.999-confident answer."""
    p = probs[:, target].astype(np.float64)
    if log_odds:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        p = np.log(p) - np.log1p(-p)
    return p[0] - p[1:]


def image_heatmap(probs: np.ndarray, target: int, grid: int) -> np.ndarray:
    """(grid, grid) occlusion scores, row-major like the image."""
    return occlusion_scores(probs, target).reshape(grid, grid)


def _colour(heat: np.ndarray) -> np.ndarray:
    """RGBA uint8 per cell, diverging: red where the patch supports the class, blue where it speaks
    against it; the opacity grows with |score| relative to the largest (score 0: transparent)."""
    scale = float(np.abs(heat).max())
    v = np.clip(heat / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(heat)
    rgba = np.zeros((*heat.shape, 4), np.uint8)
    rgba[..., 0] = np.where(v > 0, 230, 30)
    rgba[..., 1] = 40
    rgba[..., 2] = np.where(v > 0, 30, 230)
    rgba[..., 3] = np.round(170 * np.abs(v)).astype(np.uint8)
    return rgba


def overlay_png(image: Image.Image, heat: np.ndarray, max_pixels: int = 4_000_000) -> tuple[bytes, tuple[int, int]]:
    """(PNG bytes, (width, height)): the heatmap over `image` at the image's own size, scaled down
    only when it has more than `max_pixels` (the work and the answer stay bounded)."""
    base = image.convert("RGB")
    w, h = base.size
    if w * h > max_pixels:
        s = (max_pixels / (w * h)) ** 0.5
        base = base.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR)
    # Each grid cell covers the same share of the image as of the model's (resized, square) input.
    layer = Image.fromarray(_colour(heat), "RGBA").resize(base.size, Image.Resampling.NEAREST)
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue(), out.size


# ---------------------------------------------------------------- text


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # character offsets in the original text
    end: int


def words(text: str) -> list[Word]:
    """Whitespace-separated words with their offsets (punctuation stays with its word)."""
    return [Word(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def masked_text(text: str, found: list[Word], token: str | None) -> str:
    """The text with the words `found` masked: each replaced by `token`, or cut out without one."""
    if token is None:
        for w in reversed(found):
            text = text[: w.start] + text[w.end :]
        return text.strip() or " "
    for w in reversed(found):
        text = text[: w.start] + token + text[w.end :]
    return text


def texts_without_each_word(text: str, found: list[Word], token: str | None = None) -> list[str]:
    """The text, then one copy per word with that word masked (replaced by `token`, or cut out)."""
    return [text, *(masked_text(text, [w], token) for w in found)]


def word_scores(probs: np.ndarray, target: int, log_odds: bool = False) -> np.ndarray:
    """Per word: how much removing it lowers the target class's probability (or log-odds)."""
    return occlusion_scores(probs, target, log_odds)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the models output logits)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
