"""Real request inputs for load tests: Fashion-MNIST test images, review sentences and camera photos.

Torch-free on purpose (a load-generator install is Locust, numpy and Pillow). The inputs are
exported once to a folder (`python -m loadtest.inputs export`) so that a machine without the
project's data can run the load test from a copied folder.
"""

from __future__ import annotations

import io
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from servable.idx import read_idx

DEFAULT_DIR = Path(".cache/loadtest-inputs")
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
DATASETS_DIR = Path(".cache/datasets")
# Camera photos as users upload them: JPEG, 15 KiB to 1.3 MiB, from 320 px to a 12-megapixel phone's width.
PHOTO_WIDTHS = (320, 640, 1280, 2048, 4032)
PHOTO_SHARE = 0.05  # of the photo mix's requests: a few percent of photos already change the picture


@dataclass
class Inputs:
    images: list[bytes]  # encoded PNG/JPEG files as a client would upload them
    texts: list[str]  # real review sentences, natural length spread
    photos: list[bytes] = field(default_factory=list)  # camera JPEGs (camera_photos)

    def photo_mix(self, share: float = PHOTO_SHARE) -> Inputs:
        """The same inputs with the photos spread evenly among the images, `share` of the image requests."""
        if not self.photos:
            raise RuntimeError("no photos among the inputs; run `python -m loadtest.inputs export` again")
        n = max(len(self.photos), round(share * len(self.images) / (1 - share)))
        photos = [self.photos[k % len(self.photos)] for k in range(n)]
        step = (len(self.images) + n) / n
        mixed, at = list(self.images), [round(k * step) for k in range(n)]
        for pos, blob in zip(at, photos, strict=True):
            mixed.insert(pos, blob)
        return Inputs(mixed, self.texts, self.photos)


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


def camera_photos() -> list[bytes]:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg: CC BY 2.0, docs/assets.md), each saved as a
    quality-90 JPEG at every width of PHOTO_WIDTHS (aspect kept): the sizes a photo upload spans."""
    from sklearn.datasets import load_sample_images  # export only: a load-generator install copies the folder

    out = []
    for pixels in load_sample_images().images:
        img = Image.fromarray(pixels)
        for width in PHOTO_WIDTHS:
            buf = io.BytesIO()
            img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS).save(
                buf, "JPEG", quality=90
            )
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
    export_photos(folder)
    return folder


def export_photos(folder: Path) -> None:
    photo_dir = folder / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(camera_photos()):
        (photo_dir / f"{i:04d}.jpg").write_bytes(blob)


def load(folder: Path = DEFAULT_DIR) -> Inputs:
    """Read the exported inputs; export them first when the folder is missing (needs the data)."""
    if not (folder / "texts.json").exists():
        export(folder)
    elif not (folder / "photos").exists():  # exported before the photos were added
        export_photos(folder)
    images = [p.read_bytes() for p in sorted((folder / "images").iterdir())]
    texts = json.loads((folder / "texts.json").read_text())
    photos = [p.read_bytes() for p in sorted((folder / "photos").iterdir())]
    if not images or not texts:
        raise RuntimeError(f"{folder} holds no inputs; run `python -m loadtest.inputs export {folder}`")
    return Inputs(images, texts, photos)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "export":
        sys.exit("usage: python -m loadtest.inputs export [FOLDER]")
    out = export(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_DIR)
    found = load(out)
    words = np.percentile([len(t.split()) for t in found.texts], [10, 50, 90]).astype(int).tolist()
    print(f"{out}: {len(found.images)} images, {len(found.texts)} texts (words p10/p50/p90: {words})")
