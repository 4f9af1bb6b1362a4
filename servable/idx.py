"""The IDX format of MNIST-style data sets (Fashion-MNIST from the Debian package), torch-free.

Training reads its data with it, and the load generator and the demo read test images with it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip) unsigned-byte IDX file into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
