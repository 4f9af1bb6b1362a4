"""Self-supervised pre-training on unlabelled images: rotation prediction (Gidaris et al., 2018).

Each unlabelled image is shown at 0°, 90°, 180° and 270° and the network learns which; telling them
apart needs the shapes of the objects (a sleeve, a sole, a collar), which are what the labelled task
needs too. The backbone is then fine-tuned on the labelled images under a fresh head. The pretext
task runs without the main job's augmentation: its horizontal flip would turn a 90° image into a
270° one.
"""

from __future__ import annotations

import numpy as np

from servable.config import ImageTrainConfig
from servable.preprocessing import ImagePreprocessing
from training.data_images import ImageSplits
from training.image_pipeline import build_model, fine_tune
from training.loop import EpochLog
from training.runtime import seed_everything

ROTATIONS = ("0°", "90°", "180°", "270°")


def rotated_set(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image at the four rotations, shuffled (square uint8 (N, S, S, C)); the label is the rotation."""
    xs = np.concatenate([np.rot90(x, k, axes=(1, 2)) for k in range(len(ROTATIONS))])
    ys = np.repeat(np.arange(len(ROTATIONS), dtype=np.int64), len(x))
    order = np.random.default_rng(seed).permutation(len(ys))
    return np.ascontiguousarray(xs[order]), ys[order]


def pretrain_rotation(
    cfg: ImageTrainConfig, x: np.ndarray, prep: ImagePreprocessing, val_images: int
) -> tuple[dict, list[EpochLog]]:
    """Rotation prediction on the unlabelled images `x` (the first `val_images` held out for early stopping),
    `cfg.epochs_finetune` epochs at `cfg.lr_finetune`: returns the backbone's weights and the history."""
    train_x, train_y = rotated_set(x[val_images:], cfg.seed)
    val_x, val_y = rotated_set(x[:val_images], cfg.seed)
    splits = ImageSplits(list(ROTATIONS), train_x, train_y, val_x, val_y, val_x[:1], val_y[:1])
    model, history, *_ = fine_tune(cfg.model_copy(update={"augment": False, "epochs_head": 0}), splits, prep)
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}, history


def with_backbone(cfg: ImageTrainConfig, backbone: dict, num_classes: int) -> dict:
    """A full state dict for `num_classes`: the pre-trained backbone and a freshly initialised head."""
    seed_everything(cfg.seed)  # the same fresh head for a given seed
    model = build_model(cfg, num_classes)
    model.load_state_dict(backbone, strict=False)
    return model.state_dict()
