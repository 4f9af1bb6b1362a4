"""The shared pre-processing module: parity with training, and clear refusals of bad images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from servable.config import FASHION_MNIST_DIR
from servable.preprocessing import (
    DRAFT_FACTOR,
    ImageLimits,
    ImagePreprocessing,
    InvalidImage,
    decode_image,
    normalize,
    open_image,
    preprocess_image,
    to_model_pixels,
)
from training.data_images import read_idx
from training.image_model import normalize_batch

CFG = ImagePreprocessing(size=64, color_mode="L")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def real_images(n: int = 16) -> np.ndarray:
    return read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:n]


def test_serving_path_equals_training_eval_transform():
    """Serving: PNG bytes -> preprocess_image (numpy). Training eval: pixels -> torch normalize_batch."""
    raw = real_images()
    served = np.stack([preprocess_image(_png(Image.fromarray(a)), CFG) for a in raw])
    pixels = np.stack([to_model_pixels(Image.fromarray(a), CFG) for a in raw])
    trained = normalize_batch(torch.from_numpy(pixels), CFG).numpy()
    assert served.shape == (len(raw), 3, 64, 64) and served.dtype == np.float32
    np.testing.assert_allclose(served, trained, atol=1e-6)
    assert served.min() >= -1.0 and served.max() <= 1.0 and served.std() > 0.1


def test_colour_modes_and_odd_sizes_become_rgb_squares():
    cfg = ImagePreprocessing(size=40, color_mode="RGB")
    for mode, size in [("RGB", (123, 77)), ("L", (5, 300)), ("RGBA", (64, 64)), ("P", (31, 17)), ("I;16", (50, 50))]:
        arr = to_model_pixels(Image.new(mode, size, color=1), cfg)
        assert arr.shape == (40, 40, 3) and arr.dtype == np.uint8, mode
    x = normalize(np.full((2, 40, 40, 3), 255, np.uint8), cfg)
    assert x.shape == (2, 3, 40, 40) and np.allclose(x, 1.0)


def test_grey_mode_replicates_channels():
    arr = to_model_pixels(Image.new("RGB", (10, 10), (200, 10, 10)), CFG)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a-not-really", "not_an_image"),
        (b"%PDF-1.4 hello", "not_an_image"),
        (_png(Image.new("RGB", (64, 64), "red"))[:60], "corrupt"),
        (_bomb_png(30000, 30000), "too_many_pixels"),
    ],
)
def test_bad_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(InvalidImage) as err:
        decode_image(data, max_pixels=25_000_000)
    assert err.value.reason == reason
    assert str(err.value)


# ---------------------------------------------------------------- the serving bounds, each reached below Pillow's guard


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _img_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, format=fmt)
    return buf.getvalue()


LIMITS = ImageLimits()  # the serving defaults: web formats, 25 Mpx, 12,000 a side, 20:1, 64 JPEG scans


def _many_scans_jpeg(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until the file holds `scans` scans."""
    data = _jpeg(Image.new("RGB", (64, 64), "red"), progressive=True)
    last = data.rindex(b"\xff\xda")
    extra = scans - data.count(b"\xff\xda")
    return data[:last] + data[last:-2] * (extra + 1) + data[-2:]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_bomb_png(25_000_000, 1), "too_many_pixels"),  # the strip: 25 Mpx, a 24 KB file, 400 MB to resample
        (_bomb_png(5001, 5000), "too_many_pixels"),  # the area, just over
        (_bomb_png(12_001, 1000), "too_many_pixels"),  # a side, just over (12 Mpx: the area would pass)
        (_bomb_png(2001, 100), "bad_aspect_ratio"),  # the aspect ratio, just over
        (_many_scans_jpeg(65), "too_many_scans"),
        (_img_bytes("GIF"), "unsupported_format"),
        (_img_bytes("BMP"), "unsupported_format"),
        (_img_bytes("TIFF"), "unsupported_format"),
        (b"GIF89a-not-really", "unsupported_format"),
    ],
)
def test_serving_bounds_refuse_on_the_header_before_decoding(data, reason):
    with pytest.raises(InvalidImage) as err:
        open_image(data, LIMITS)
    assert err.value.reason == reason and str(err.value)


@pytest.mark.parametrize(
    "data",
    [_bomb_png(5000, 5000), _bomb_png(12_000, 1000), _bomb_png(2000, 100), _many_scans_jpeg(64),
     _img_bytes("JPEG"), _img_bytes("PNG"), _img_bytes("WEBP")],
)  # fmt: skip
def test_serving_bounds_let_each_limit_itself_and_the_web_formats_through(data):
    assert open_image(data, LIMITS).size


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_gives_nearly_the_same_pixels():
    """draft: the decoder's own 1/2..1/8 scaling, never below DRAFT_FACTOR x the model's side; the model's
    input barely moves (the resize after it is antialiased either way)."""
    photo = Image.radial_gradient("L").resize((2048, 1536)).convert("RGB")
    data = _jpeg(photo)
    reduced = decode_image(data, limits=LIMITS, draft=DRAFT_FACTOR * CFG.size)
    assert reduced.size[0] < 2048 and min(reduced.size) >= DRAFT_FACTOR * CFG.size
    full = to_model_pixels(decode_image(data, limits=LIMITS), CFG).astype(int)
    assert np.abs(to_model_pixels(reduced, CFG).astype(int) - full).max() <= 8
