"""The suite's fixture models' training settings, in one place: tests/conftest.py trains them for the
tests, loadtest/release_pictures.py trains two versions of the image one for docs/releasing.md's pictures."""

from __future__ import annotations

from pathlib import Path

from servable.config import ImageTrainConfig

# The image fixture's recipe (`python -m training image` takes each as a flag): 400 Fashion-MNIST images at 32 px.
IMAGE_FIXTURE_RECIPE = {
    "limit": 400, "test_limit": 300, "image_size": 32, "epochs_head": 1, "epochs_finetune": 2, "batch_size": 32,
    "lr_finetune": 1e-3, "calibration_size": 64, "progress": False, "average_last": 2,
}  # fmt: skip


def image_config(runs_dir: Path, version: str = "t1", **overrides) -> ImageTrainConfig:
    """A real fine-tune on 400 Fashion-MNIST images at 32 px: seconds, not minutes."""
    return ImageTrainConfig(runs_dir=runs_dir, version=version, **{**IMAGE_FIXTURE_RECIPE, **overrides})
