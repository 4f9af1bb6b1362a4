"""Consistency regularisation on unlabelled images, FixMatch-style (Sohn et al., 2020).

Each step takes a batch of labelled images and `mu` times as many unlabelled ones. A weakly augmented
view of an unlabelled image (flip, shift) gives the pseudo-label when its top-1 probability reaches
the threshold (0.95); a strongly augmented view of the same image (rotation, shear, scale, contrast
and brightness, solarisation, a cut-out square) must then be classified as that label. Loss:
cross-entropy on the labelled batch + `weight` × the masked cross-entropy on the strong views (mean
over all unlabelled images of the batch, the masked ones counting zero).

The augmentations are batched torch ops (one affine grid for the whole batch): kornia's per-sample
versions cost more than the small CNN's step itself on a CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from servable.config import ImageTrainConfig
from servable.preprocessing import ImagePreprocessing
from training.data_images import ImageSplits
from training.image_model import BackboneHead, channels_last, to_default_layout, to_training_layout
from training.image_pipeline import build_model, recompute_batchnorm
from training.loop import EarlyStopping, EpochLog, val_metrics, warmup_cosine
from training.runtime import seed_everything


def unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def standardise(x: torch.Tensor, prep: ImagePreprocessing) -> torch.Tensor:
    return (x - torch.tensor(prep.mean).view(1, -1, 1, 1)) / torch.tensor(prep.std).view(1, -1, 1, 1)


def augment(x: torch.Tensor, gen: torch.Generator, strong: bool) -> torch.Tensor:
    """Weak: random horizontal flip and a shift of up to 12.5 %. Strong: also rotation ±30°, shear ±0.3,
    scale 0.8-1.2, contrast ×0.6-1.4 and brightness ±0.2, solarisation (one in five) and a cut-out of half the side."""
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    tx, ty = uniform(-0.25, 0.25), uniform(-0.25, 0.25)  # grid units: 0.25 of the [-1, 1] span is 12.5 %
    angle, shear, scale = (uniform(-math.pi / 6, math.pi / 6), uniform(-0.3, 0.3), uniform(0.8, 1.2)) if strong else (
        torch.zeros(n), torch.zeros(n), torch.ones(n))  # fmt: skip
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)  # Fashion-MNIST's background is 0
    if not strong:
        return x
    x = (x * uniform(0.6, 1.4).view(-1, 1, 1, 1) + uniform(-0.2, 0.2).view(-1, 1, 1, 1)).clamp_(0, 1)
    solarise = (torch.rand(n, generator=gen) < 0.2).view(-1, 1, 1, 1)
    x = torch.where(solarise & (x > 0.5), 1 - x, x)
    side = h // 2
    top, left = (
        torch.randint(0, h - side + 1, (n,), generator=gen),
        torch.randint(0, w - side + 1, (n,), generator=gen),
    )
    rows, cols = torch.arange(h).view(1, -1, 1), torch.arange(w).view(1, 1, -1)
    cut = ((rows >= top.view(-1, 1, 1)) & (rows < (top + side).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + side).view(-1, 1, 1)))  # fmt: skip
    return x.masked_fill(cut.unsqueeze(1), 0.5)


@dataclass
class FixMatchStats:
    """What the unlabelled images contributed: how many were drawn, the share confident enough to
    teach, and (where their labels are known, in a study) how many of the confident pseudo-labels were right."""

    unlabelled_seen: set = field(default_factory=set)
    confident: int = 0
    drawn: int = 0
    right: int = 0
    unlabelled_loss: list = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "unlabelled_images_drawn": len(self.unlabelled_seen),
            "confident_share": self.confident / max(self.drawn, 1),
            "pseudo_label_accuracy": self.right / self.confident if self.confident else float("nan"),
            "unlabelled_loss_mean": float(np.mean(self.unlabelled_loss)) if self.unlabelled_loss else 0.0,
        }


def fixmatch(
    cfg: ImageTrainConfig, splits: ImageSplits, prep: ImagePreprocessing, init_state: dict, unlabelled_x: np.ndarray,
    *, threshold: float, steps: int, mu: int, weight: float, eval_every: int, unlabelled_y: np.ndarray | None = None,
) -> tuple[BackboneHead, list[EpochLog], dict]:  # fmt: skip
    """`steps` FixMatch steps from `init_state` at `cfg.lr_finetune` (warm-up + cosine), validation every
    `eval_every` steps with early stopping (`cfg.patience` evaluations), best evaluation's weights kept.
    `unlabelled_y` only scores the pseudo-labels; it never reaches the loss."""
    gen = seed_everything(cfg.seed)
    model = build_model(cfg, len(splits.labels))
    model.load_state_dict(init_state)
    model = to_training_layout(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_finetune, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, steps, cfg.warmup_fraction)
    stopper, history, stats = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor), [], FixMatchStats()
    cpu, b, bu = torch.device("cpu"), cfg.batch_size, cfg.batch_size * mu

    def forward(batch):
        x, y = batch
        return model(channels_last(standardise(unit(x.numpy()), prep))), y

    def val_batches():
        recompute_batchnorm(model, splits.train_x, prep, cpu)
        return ((torch.from_numpy(splits.val_x[i : i + 256]), torch.from_numpy(splits.val_y[i : i + 256]))
                for i in range(0, len(splits.val_y), 256))  # fmt: skip

    def draws(n: int, k: int):
        while True:
            order = torch.randperm(n, generator=gen).numpy()
            yield from (order[i : i + k] for i in range(0, n - k + 1 if n >= k else 1, k))

    lab, unl = draws(len(splits.train_y), b), draws(len(unlabelled_x), bu)
    start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
    for step in range(1, steps + 1):
        model.train()
        li, ui = next(lab), next(unl)
        stats.unlabelled_seen.update(ui.tolist())
        xl, yl, xu = unit(splits.train_x[li]), torch.from_numpy(splits.train_y[li]), unit(unlabelled_x[ui])
        views = torch.cat([augment(xl, gen, False), augment(xu, gen, False), augment(xu, gen, True)])
        logits = model(channels_last(standardise(views, prep)))
        l_lab, l_weak, l_strong = logits[: len(li)], logits[len(li) : len(li) + len(ui)], logits[len(li) + len(ui) :]
        conf, pseudo = torch.softmax(l_weak.detach(), 1).max(1)
        mask = (conf >= threshold).float()
        loss_u = (F.cross_entropy(l_strong, pseudo, reduction="none") * mask).mean()
        loss = F.cross_entropy(l_lab, yl) + weight * loss_u
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm or math.inf)
        optimizer.step()
        scheduler.step()
        stats.drawn += len(ui)
        stats.confident += int(mask.sum())
        stats.unlabelled_loss.append(loss_u.item())
        if unlabelled_y is not None:
            stats.right += int(((pseudo.numpy() == unlabelled_y[ui]) & (mask.numpy() > 0)).sum())
        loss_sum, correct, seen = (
            loss_sum + loss.item() * len(li),
            correct + int((l_lab.argmax(1) == yl).sum()),
            seen + len(li),
        )
        if step % eval_every == 0 or step == steps:
            val = val_metrics(model, val_batches, torch.from_numpy(splits.val_y), forward, cpu, False)
            log = EpochLog("fixmatch", len(history) + 1, scheduler.get_last_lr()[0], loss_sum / seen, correct / seen,
                           val["val_loss"], val["val_acc"], time.perf_counter() - start)  # fmt: skip
            history.append(log)
            start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            if stopper.update(val, model, ("fixmatch", len(history))):
                break
    stopper.restore(model)
    return to_default_layout(model).eval(), history, stats.summary()
