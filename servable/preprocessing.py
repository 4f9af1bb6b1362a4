"""Pre-processing shared by training's evaluation and by serving (numpy, Pillow, tokenizers only).

Its parameters are pydantic models that travel inside the model artifact, so a served model is
always fed exactly as it was evaluated.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, Field

# ---------------------------------------------------------------- images


class ImagePreprocessing(BaseModel):
    """How raw pixels become the network's input tensor."""

    size: int = Field(description="Square side the image is resized to.")
    color_mode: Literal["L", "RGB"] = Field(
        "RGB", description="L: converted to grey, then repeated on 3 channels (as trained)."
    )
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    resample: Literal["bilinear"] = "bilinear"
    input_name: str = "pixels"


class InvalidImage(ValueError):
    """A client-side problem with an image; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# The formats users send; anything else (TIFF, PSD, JPEG 2000, FITS, EPS, ... : Pillow opens about 40)
# is refused from its first bytes, before a decoder runs. Training reads what its folders hold.
WEB_FORMATS = ("JPEG", "PNG", "WEBP")
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


def sniff_format(data: bytes) -> str | None:
    """JPEG, PNG or WEBP from a file's first bytes; None for anything else."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return "WEBP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


class ImageLimits(BaseModel):
    """What an image may declare before any pixel is decoded (each checked on its header alone)."""

    max_pixels: int = 25_000_000  # the area
    max_side: int = 12_000  # each side: a 25,000,000 x 1 strip stays out however small its file
    max_aspect: float = 20.0  # longest side / shortest side
    max_jpeg_scans: int = 64  # a progressive JPEG re-reads the whole image per scan; cameras write about 10
    formats: tuple[str, ...] | None = WEB_FORMATS  # None: whatever Pillow opens (training's folders)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """A lazily opened image whose format and declared size are within `limits` (no pixel decoded yet)."""
    if not data:
        raise InvalidImage("empty", "the image is empty (0 bytes)")
    found = sniff_format(data)
    if limits.formats is not None and found not in limits.formats:
        raise InvalidImage("unsupported_format", f"send {', '.join(limits.formats)}; this is not one of them")
    try:
        img = Image.open(io.BytesIO(data), formats=[found] if limits.formats is not None else None)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, above 2x its default limit
        raise InvalidImage("too_many_pixels", f"the image declares too many pixels ({exc})") from exc
    except Exception as exc:  # Pillow raises several types for unknown formats
        raise InvalidImage("not_an_image", "the data is not a decodable image (JPEG, PNG, ...)") from exc
    width, height = img.size
    # Checked before decoding pixels: a small file can declare a huge canvas (decompression bomb).
    if width * height > limits.max_pixels:
        raise InvalidImage(
            "too_many_pixels", f"the image has {width}x{height} pixels, more than the limit {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise InvalidImage("too_many_pixels", f"the image is {width}x{height}; each side may be {limits.max_side}")
    if min(width, height) < 1 or max(width, height) / min(width, height) > limits.max_aspect:
        raise InvalidImage("bad_aspect_ratio", f"the image is {width}x{height}; its sides may differ "
                           f"{limits.max_aspect:g}-fold at most")  # fmt: skip
    if img.format == "JPEG" and data.count(b"\xff\xda") > limits.max_jpeg_scans:  # SOS markers: never in data
        raise InvalidImage("too_many_scans", f"the JPEG has more than {limits.max_jpeg_scans} scans")
    return img


def load_image(img: Image.Image, *, draft: int | None = None) -> Image.Image:
    """Decode an image fresh from `open_image` (its header checked, no pixel read yet) into a fully loaded
    one. `draft`: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides at least
    this (the decoder does less work; the resize to the model's input follows anyway)."""
    if draft is not None and img.format == "JPEG":
        img.draft(img.mode, (draft, draft))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        raise InvalidImage("corrupt", "the image is truncated or corrupt") from exc
    return ImageOps.exif_transpose(img) or img


def decode_image(data: bytes, *, max_pixels: int = 25_000_000, limits: ImageLimits | None = None,
                 draft: int | None = None) -> Image.Image:  # fmt: skip
    """Decode bytes into a fully loaded Pillow image, refusing bombs and broken files early. `limits`
    (default: any format, `max_pixels`) bound what it may declare; `draft` as in `load_image`."""
    return load_image(open_image(data, limits or ImageLimits(max_pixels=max_pixels, formats=None)), draft=draft)


# A JPEG is decoded at no less than this many times the model's input side before the resize: the
# DCT's own scaling does the first reduction for free, the bilinear resize (antialiased) the rest.
DRAFT_FACTOR = 4


def to_model_pixels(img: Image.Image, cfg: ImagePreprocessing) -> np.ndarray:
    """Colour-convert and resize: uint8 array of shape (size, size, 3)."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
    img = img.convert(cfg.color_mode)
    if img.size != (cfg.size, cfg.size):
        img = img.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def normalize(pixels: np.ndarray, cfg: ImagePreprocessing) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled as the backbone's weights expect."""
    std = np.asarray(cfg.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std))[:, None, None]  # (x / 255 - mean) / std as one multiply and one add
    offset = (-np.asarray(cfg.mean, dtype=np.float32) / std)[:, None, None]
    # channels first while still uint8 (a quarter of the bytes to move), then one float32 copy
    x = np.ascontiguousarray(np.moveaxis(pixels, -1, -3)).astype(np.float32)
    x *= scale
    x += offset
    return x


def preprocess_opened(img: Image.Image, cfg: ImagePreprocessing) -> np.ndarray:
    """An image fresh from `open_image` to the network's input: decoded (a JPEG at a reduced scale near
    the model's input), converted, resized, normalised -> float32 (3, H, W)."""
    return normalize(to_model_pixels(load_image(img, draft=DRAFT_FACTOR * cfg.size), cfg), cfg)


def preprocess_image(data: bytes | Image.Image, cfg: ImagePreprocessing, *, max_pixels: int = 25_000_000):
    """The whole path for one image (bytes, or an already loaded image): decode, convert, resize,
    normalise -> float32 (3, H, W)."""
    if isinstance(data, bytes):
        return preprocess_opened(open_image(data, ImageLimits(max_pixels=max_pixels, formats=None)), cfg)
    return normalize(to_model_pixels(data, cfg), cfg)


# ---------------------------------------------------------------- text


class TextPreprocessing(BaseModel):
    """Tokenisation settings; the tokenizer file itself ships in the artifact."""

    tokenizer_file: str = "tokenizer.json"
    max_length: int = Field(description="Truncation length in tokens (special tokens included).")
    input_names: list[str] = Field(description="ONNX inputs, e.g. input_ids, attention_mask, token_type_ids.")
    pad_token_id: int = 0


def load_tokenizer(path: Path, cfg: TextPreprocessing):
    """A `tokenizers.Tokenizer` set to truncate as in training; padding is done per batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=cfg.max_length)
    tok.no_padding()
    return tok


def encode_texts(tokenizer, texts: Sequence[str], cfg: TextPreprocessing) -> dict[str, np.ndarray]:
    """Tokenise and pad to the longest text of this batch (dynamic padding): int64 arrays."""
    encodings = tokenizer.encode_batch(list(texts))
    return pad_encodings([e.ids for e in encodings], [e.type_ids for e in encodings], cfg)


def pad_encodings(
    ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]], cfg: TextPreprocessing
) -> dict[str, np.ndarray]:
    """Pad token id lists to a rectangle and build the inputs the ONNX model declares."""
    length = max(len(x) for x in ids)
    n = len(ids)
    input_ids = np.full((n, length), cfg.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    types = np.zeros((n, length), dtype=np.int64)
    for i, (row, trow) in enumerate(zip(ids, type_ids, strict=True)):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        types[i, : len(trow)] = trow
    arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name] for name in cfg.input_names}
