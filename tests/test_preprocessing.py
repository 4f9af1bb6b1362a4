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
    ImagePreprocessing,
    InvalidImage,
    decode_image,
    normalize,
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
