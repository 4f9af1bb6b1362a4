"""Image data: Fashion-MNIST from the Debian package, or a user's `root/<class>/*` folder.

Every image passes through `servable.preprocessing.to_model_pixels` (Pillow), the same
colour/resize step serving uses; normalisation happens on the batch tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from servable.idx import read_idx
from servable.preprocessing import (
    DRAFT_FACTOR,
    ImageLimits,
    ImagePreprocessing,
    InvalidImage,
    load_image,
    open_image,
    to_model_pixels,
)

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """The data cannot be used; the message names the problem for the user."""


@dataclass
class ImageSplits:
    labels: list[str]
    train_x: np.ndarray  # uint8 (N, S, S, 3)
    train_y: np.ndarray  # int64 (N,)
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    provenance: dict = field(default_factory=dict)
    train_sizes: np.ndarray | None = None  # int (N, 2): each training image's width and height as read, if known


def _to_pixels(images: np.ndarray, cfg: ImagePreprocessing, progress: bool, desc: str) -> np.ndarray:
    out = np.empty((len(images), cfg.size, cfg.size, 3), dtype=np.uint8)
    for i, img in enumerate(tqdm(images, desc=desc, disable=None if progress else True, leave=False, unit="img")):
        out[i] = to_model_pixels(Image.fromarray(img), cfg)
    return out


def _split(n: int, val_fraction: float, rng: np.random.Generator, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Stratified train/val index split with a fixed generator."""
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        # at least one held-out example per class, but never the class's only one
        k = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(val_idx))


def _limit(idx: np.ndarray, limit: int | None) -> np.ndarray:
    return idx if limit is None else idx[:limit]


def load_fashion_mnist(
    root: Path, cfg: ImagePreprocessing, *, seed: int, val_fraction: float,
    limit: int | None, test_limit: int | None, progress: bool = True,
) -> ImageSplits:  # fmt: skip
    files = {k: root / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz" for k in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")}  # fmt: skip
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install dataset-fashion-mnist` or pass --data-dir with your own images."
        )
    x, y = read_idx(files["train-images"]), read_idx(files["train-labels"]).astype(np.int64)
    tx, ty = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"]).astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _split(len(y), val_fraction, rng, y)
    train_idx = _limit(train_idx, limit)
    val_idx = _limit(val_idx, None if limit is None else max(200, int(limit * val_fraction)))
    test_idx = _limit(np.arange(len(ty)), test_limit)
    return ImageSplits(
        labels=FASHION_MNIST_LABELS,
        train_x=_to_pixels(x[train_idx], cfg, progress, "prepare train"),
        train_y=y[train_idx],
        val_x=_to_pixels(x[val_idx], cfg, progress, "prepare val"),
        val_y=y[val_idx],
        test_x=_to_pixels(tx[test_idx], cfg, progress, "prepare test"),
        test_y=ty[test_idx],
        train_sizes=np.tile(x.shape[2:0:-1], (len(train_idx), 1)),  # every item is one 28 x 28 image
        provenance={
            "source": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
            "path": str(root),
            "split_seed": seed,
            "val_fraction": val_fraction,
            "counts": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            "pool": {"train": len(y), "test": len(ty)},
        },
    )


def feedback_provenance(data_path: Path) -> dict | None:
    """`feedback_provenance.json` written beside an export of the feedback queue (serving/feedback), if any."""
    path = (data_path if data_path.is_dir() else data_path.parent) / "feedback_provenance.json"
    try:
        prov = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # beside a data file it must name that file: another file in the folder is not described by it
    return prov if data_path.is_dir() or prov.get("file") == data_path.name else None


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Find `root/<class>/<image>` files; raise DataError naming what is wrong."""
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected root/<class>/<image files>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        (f, ci)
        for ci, c in enumerate(classes)
        for f in sorted((root / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(f"image folder {root} has no images in class sub-folders (root/<class>/*.jpg)")
    present = {ci for _, ci in items}
    empty = [classes[i] for i in range(len(classes)) if i not in present]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {empty}")
    if len(classes) < 2:
        raise DataError(f"image folder {root} has a single class ({classes[0]}); need at least two")
    return classes, items


def decode_training_image(data: bytes, cfg: ImagePreprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """A training file's model pixels, decoded as serving decodes an upload, and its (width, height) as
    declared, before the draft scaling: the upload size serving's drift statistics read. InvalidImage if broken."""
    opened = open_image(data, ImageLimits(formats=None))
    return to_model_pixels(load_image(opened, draft=DRAFT_FACTOR * cfg.size), cfg), opened.size


def load_image_folder(
    root: Path, cfg: ImagePreprocessing, *, seed: int, val_fraction: float,
    limit: int | None, test_fraction: float = 0.1, progress: bool = True,
) -> ImageSplits:  # fmt: skip
    """Decode a user's folder with Pillow; a stratified train/val/test split by seed."""
    classes, items = scan_image_folder(root)
    pixels, labels, sizes, unreadable = [], [], [], []
    for path, ci in tqdm(items, desc="decode images", disable=None if progress else True, leave=False, unit="img"):
        try:
            x, size = decode_training_image(path.read_bytes(), cfg)
            pixels.append(x)
            labels.append(ci)
            sizes.append(size)
        except InvalidImage as exc:
            unreadable.append(f"{path} ({exc})")
    if unreadable:
        raise DataError(f"{len(unreadable)} unreadable image(s), fix or remove them: " + "; ".join(unreadable[:5]))
    x, y = np.stack(pixels), np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rest_idx, test_idx = _split(len(y), test_fraction, rng, y)
    train_rel, val_rel = _split(len(rest_idx), val_fraction, rng, y[rest_idx])
    train_idx, val_idx = _limit(rest_idx[train_rel], limit), rest_idx[val_rel]
    feedback = feedback_provenance(root)
    return ImageSplits(
        labels=classes,
        train_x=x[train_idx], train_y=y[train_idx],
        val_x=x[val_idx], val_y=y[val_idx],
        test_x=x[test_idx], test_y=y[test_idx], train_sizes=np.asarray(sizes)[train_idx],
        provenance={
            "source": "image folder",
            "path": str(root.resolve()),
            "split_seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "counts": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            **({"feedback": feedback} if feedback else {}),
        },
    )  # fmt: skip
