"""The model artifact contract: one BentoML model-store tag per version, checksummed.

A version's directory holds the ONNX file(s), the tokenizer files (text), `MODEL_CARD.md`
(written by training/model_card.py before registration) and `manifest.json`: labels, pre-processing,
training config, metrics, data provenance, library versions and the sha256 of every file. The
manifest's own sha256 sits in the BentoML metadata, so loading can prove that neither the files nor
the manifest changed since registration.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from servable.drift_reference import DriftReference
from servable.explain import Occlusion
from servable.preprocessing import ImagePreprocessing, TextPreprocessing

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class Calibration(BaseModel):
    """How far to trust a classifier's probabilities: the temperature that divides its logits before the
    softmax (fitted on the validation split, training/calibration.py) and the abstention threshold, the
    calibrated top-1 probability below which an answer is flagged as unsure."""

    temperature: float = Field(1.0, gt=0, description="logits / temperature before the softmax; 1 = as trained")
    abstain_below: float | None = Field(
        None, ge=0, le=1, description="answers with a lower top-1 probability carry below_threshold: true"
    )
    coverage: float | None = Field(None, description="share of validation answers at or above the threshold")
    fitted_on: str = Field("validation", description="the split both were fitted on")
    n: int = Field(0, ge=0, description="examples in that split")


class ModelManifest(BaseModel):
    """Shared metadata schema of every model (documented in docs/artifacts.md)."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    task: str = Field(pattern=r"^[a-z0-9]+-[a-z0-9]+$", description="<input>-<task>, e.g. image-classification")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    labels: list[str]
    onnx: dict[str, str] = Field(description="variant (fp32, int8, optimized) -> file name")
    image_preprocessing: ImagePreprocessing | None = None
    text_preprocessing: TextPreprocessing | None = None
    preprocessing: dict[str, Any] | None = Field(
        None, description="Pre-processing parameters of a model with neither typed field (its adapter reads them)"
    )
    training_config: dict[str, Any]
    metrics: dict[str, Any]
    calibration: Calibration | None = Field(None, description="None (older artifacts): temperature 1, no threshold")
    occlusion: Occlusion | None = Field(
        None, description="What a masked patch or word is in explanations; None (older artifacts): image mean, word cut"
    )
    drift_reference: DriftReference | None = Field(
        None,
        description="The training inputs' distributions for drift (servable/drift_reference.py); None (older "
        "artifacts): the replica exports no drift",
    )
    provenance: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, FileEntry] = Field(default_factory=dict, description="every file -> sha256, size")


class ArtifactError(RuntimeError):
    """The artifact cannot be used: missing, tampered or incomplete."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_version() -> str:
    return datetime.now(UTC).strftime("v%Y%m%d-%H%M%S")


def _hash_tree(root: Path) -> dict[str, FileEntry]:
    return {
        p.relative_to(root).as_posix(): FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def register(manifest: ModelManifest, staging: Path) -> str:
    """Checksum every file in `staging`, write the manifest and store it all under name:version. Whatever
    should travel with the model (training writes its model card first) must be in `staging` by then."""
    import bentoml

    manifest = manifest.model_copy(update={"files": _hash_tree(staging)})
    missing = [f for f in manifest.onnx.values() if f not in manifest.files]
    if missing:
        raise ArtifactError(f"manifest names ONNX files that are not in {staging}: {missing}")
    (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    metadata = {
        "manifest_sha256": sha256_file(staging / MANIFEST),
        "task": manifest.task,
        "schema_version": manifest.schema_version,
        "n_labels": len(manifest.labels),
    }
    with bentoml.models.create(
        f"{manifest.name}:{manifest.version}",
        module="servable",
        labels={"task": manifest.task, "project": "servable"},
        metadata=metadata,
    ) as bento_model:
        shutil.copytree(staging, bento_model.path, dirs_exist_ok=True)
    return f"{manifest.name}:{manifest.version}"


class Artifact(BaseModel):
    tag: str
    path: Path
    manifest: ModelManifest

    def file(self, name: str) -> Path:
        return self.path / name

    def onnx_path(self, variant: str = "fp32") -> Path:
        if variant not in self.manifest.onnx:
            raise ArtifactError(f"{self.tag} has no '{variant}' ONNX model; it has {sorted(self.manifest.onnx)}")
        return self.file(self.manifest.onnx[variant])


def verify(path: Path, manifest_sha256: str) -> ModelManifest:
    """Check the manifest and every file it lists against their recorded sha256."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not a servable artifact")
    if sha256_file(mpath) != manifest_sha256:
        raise ArtifactError(f"{mpath} was changed after registration (sha256 mismatch)")
    manifest = ModelManifest.model_validate_json(mpath.read_text())
    for rel, entry in manifest.files.items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"artifact file missing: {f}")
        if sha256_file(f) != entry.sha256:
            raise ArtifactError(f"artifact file corrupted or tampered with (sha256 mismatch): {f}")
    return manifest


def load(tag: str) -> Artifact:
    """Fetch `name:version` (or `name:latest`) from the BentoML model store and verify it."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bento_model = bentoml.models.get(tag)
    except NotFound as exc:
        raise ArtifactError(f"model {tag!r} is not in the BentoML model store ({exc})") from exc
    sha = bento_model.info.metadata.get("manifest_sha256")
    if not sha:
        raise ArtifactError(f"{bento_model.tag} has no manifest_sha256: not registered by servable")
    path = Path(bento_model.path)
    return Artifact(tag=str(bento_model.tag), path=path, manifest=verify(path, sha))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
