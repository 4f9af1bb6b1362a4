"""Linear probe: a pretrained backbone kept frozen (eval mode, its ImageNet BatchNorm statistics) and only a
new head trained, on features computed once per image.

Without augmentation an image's features never change, so the backbone runs once per image instead of
once per epoch; the head trains with the project's loop (AdamW, warm-up + cosine, early stopping, best
epoch kept), stage "head".
"""

from __future__ import annotations

import numpy as np
import torch

from servable.config import ImageTrainConfig
from servable.preprocessing import ImagePreprocessing
from training.image_model import BackboneHead, normalize_batch
from training.image_pipeline import batches
from training.loop import EarlyStopping, EpochLog, run_stage
from training.runtime import seed_everything


@torch.no_grad()
def features(model: BackboneHead, x: np.ndarray, prep: ImagePreprocessing, batch: int = 256) -> np.ndarray:
    """The frozen backbone's pooled features of uint8 pixels, float32 (N, D)."""
    model.backbone.eval()
    out = [model.backbone(normalize_batch(torch.from_numpy(x[i : i + batch]), prep)).numpy()
           for i in range(0, len(x), batch)]  # fmt: skip
    return np.concatenate(out).astype(np.float32)


def train_probe(
    cfg: ImageTrainConfig, model: BackboneHead, train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray,
    val_y: np.ndarray,
) -> list[EpochLog]:  # fmt: skip
    """Train `model.head` alone on features, `cfg.epochs_head` epochs at `cfg.lr_head`; the backbone is untouched."""
    gen = seed_everything(cfg.seed)
    head, cpu = model.head, torch.device("cpu")
    model.freeze_backbone(True)
    history: list[EpochLog] = []
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor)
    run_stage(
        head, stage="head", params=list(head.parameters()), l1_params=list(head.parameters()), epochs=cfg.epochs_head,
        lr=cfg.lr_head, cfg=cfg, train_batches=lambda: batches(train_f, train_y, cfg.batch_size, gen),
        n_train_batches=-(-len(train_y) // cfg.batch_size), val_batches=lambda: batches(val_f, val_y, 1024),
        val_targets=torch.from_numpy(val_y), forward=lambda b: (head(b[0]), b[1]), device=cpu, stopper=stopper,
        history=history,
    )  # fmt: skip
    stopper.restore(head)
    model.freeze_backbone(False)
    model.eval()
    return history


@torch.no_grad()
def probe_proba(model: BackboneHead, f: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.softmax(model.head(torch.from_numpy(f)), 1).numpy()
