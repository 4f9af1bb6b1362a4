"""Occlusion explanations, model-agnostic and gradient-free (numpy and Pillow only).

Shared by serving (`/classify/explain`, `/sentiment/explain`) and training's gallery of mistakes:
the same artifact, any backbone, no gradients. Each explanation is one batch of perturbed
inputs whose first row is the unperturbed input; the score of a region (or word) is how much the
target class's probability drops when that region is masked (that word is removed):
positive = it supported the target class, negative = it spoke against it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

WORD = re.compile(r"\S+")


# ---------------------------------------------------------------- images


def grid_edges(size: int, grid: int) -> np.ndarray:
    """Pixel edges of `grid` near-equal bands over `size` pixels (grid + 1 values)."""
    return np.round(np.linspace(0, size, grid + 1)).astype(int)


def occluded_images(pixels: np.ndarray, grid: int) -> np.ndarray:
    """(1 + grid², C, H, W): the input, then one copy per grid cell with that cell filled with the
    image's per-channel mean (a neutral value of this image, so masking adds no new edge colour)."""
    _, h, w = pixels.shape
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


def texts_without_each_word(text: str, found: list[Word]) -> list[str]:
    """The text, then one copy per word with that word removed (its span cut out)."""
    out = [text]
    for w in found:
        out.append((text[: w.start] + text[w.end :]).strip() or " ")
    return out


def word_scores(probs: np.ndarray, target: int, log_odds: bool = False) -> np.ndarray:
    """Per word: how much removing it lowers the target class's probability (or log-odds)."""
    return occlusion_scores(probs, target, log_odds)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the models output logits)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
