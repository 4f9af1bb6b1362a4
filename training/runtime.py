"""Seeds, device choice and thread settings: one place, used by both models."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); return a generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 1 << 30


def prepare_process(threads: int) -> None:
    """A training process's compute set-up: `threads` torch threads (0: torch's default) and freed memory kept.

    By default glibc serves a large allocation (a batch's activations) from its own mmap and gives the free
    top of its heap back to the kernel past a few MB, so the kernel zeroes fresh pages for every training
    step: the limited-data study spent a tenth of its CPU time in the kernel that way. Raising the mmap and
    trim thresholds keeps freed memory in the heap for the next step. No-op where the C library has no mallopt."""
    if threads > 0:
        torch.set_num_threads(threads)
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported (no loss scaling), else fp16."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
