"""Real request inputs for load tests: Fashion-MNIST test images and review sentences.

Torch-free on purpose (a load-generator install is Locust, numpy and Pillow). The inputs are
exported once to a folder (`python -m loadtest.inputs export`) so that a machine without the
project's data can run the load test from a copied folder.
"""

from __future__ import annotations

import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from servable.idx import read_idx

DEFAULT_DIR = Path(".cache/loadtest-inputs")
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
DATASETS_DIR = Path(".cache/datasets")


@dataclass
class Inputs:
    images: list[bytes]  # encoded PNG/JPEG files as a client would upload them
    texts: list[str]  # real review sentences, natural length spread


def encode_images(pixels: np.ndarray, n: int, seed: int = 0) -> list[bytes]:
    """Half PNG, half JPEG (quality 90): the two formats clients really send."""
    rng = np.random.default_rng(seed)
    out = []
    for k, i in enumerate(rng.choice(len(pixels), size=min(n, len(pixels)), replace=False)):
        buf = io.BytesIO()
        img = Image.fromarray(pixels[i])
        img.save(buf, "PNG") if k % 2 == 0 else img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def review_sentences(n: int, seed: int = 0) -> list[str]:
    """Held-out review sentences of the bundled data set (the same split training tests on)."""
    from training.data_text import load_bundled  # torch-free, needs the project's bundled data

    test = [t for t, _ in load_bundled(DATASETS_DIR, 42, 0.1).test]
    random.Random(seed).shuffle(test)
    return test[:n]


def export(folder: Path = DEFAULT_DIR, n_images: int = 200, n_texts: int = 400) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = encode_images(read_idx(FASHION_MNIST_TEST), n_images)
    img_dir = folder / "images"
    img_dir.mkdir(exist_ok=True)
    for i, blob in enumerate(images):
        suffix = "png" if blob.startswith(b"\x89PNG") else "jpg"
        (img_dir / f"{i:04d}.{suffix}").write_bytes(blob)
    (folder / "texts.json").write_text(json.dumps(review_sentences(n_texts), indent=0))
    return folder


def load(folder: Path = DEFAULT_DIR) -> Inputs:
    """Read the exported inputs; export them first when the folder is missing (needs the data)."""
    if not (folder / "texts.json").exists():
        export(folder)
    images = [p.read_bytes() for p in sorted((folder / "images").iterdir())]
    texts = json.loads((folder / "texts.json").read_text())
    if not images or not texts:
        raise RuntimeError(f"{folder} holds no inputs; run `python -m loadtest.inputs export {folder}`")
    return Inputs(images, texts)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "export":
        sys.exit("usage: python -m loadtest.inputs export [FOLDER]")
    out = export(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_DIR)
    found = load(out)
    words = np.percentile([len(t.split()) for t in found.texts], [10, 50, 90]).astype(int).tolist()
    print(f"{out}: {len(found.images)} images, {len(found.texts)} texts (words p10/p50/p90: {words})")
