"""One training loop for both models: stages, early stopping, clipping, L1, AMP, progress.

The model-specific part is a `forward(batch) -> (logits, targets)` callable, so the image and
text pipelines share every practice here instead of each keeping its own copy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from servable.config import TrainCommon
from training.runtime import amp_dtype

# forward(batch) -> (logits, targets) or (logits, targets, per-example loss weights)
Forward = Callable[[object], tuple[torch.Tensor, ...]]


@dataclass
class EpochLog:
    stage: str
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    # Gradient health: global L2 norm of the gradients before clipping (mean, median, 99th percentile and
    # max over the epoch's steps) and the share of steps where clipping engaged (0 when clipping is off).
    grad_norm: float = math.nan
    grad_norm_max: float = math.nan
    clipped_fraction: float = 0.0
    grad_norm_p50: float = math.nan
    grad_norm_p99: float = math.nan


class EarlyStopping:
    """Stop after `patience` epochs without gain in the monitored validation metric; keeps the best weights.

    `val_loss` (lower is better) is the default; `val_acc` (higher is better) suits a classifier whose
    later epochs grow over-confident: its loss rises while it still ranks more examples correctly.
    """

    def __init__(self, patience: int, min_delta: float, monitor: Literal["val_loss", "val_acc"] = "val_loss") -> None:
        self.patience, self.min_delta, self.monitor = patience, min_delta, monitor
        self.best_value = math.inf if monitor == "val_loss" else -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: tuple[str, int] | None = None
        self.bad_epochs = 0
        self.weight_average: dict | None = None  # set by keep_weight_average

    def new_stage(self) -> None:
        self.bad_epochs = 0

    def update(self, metrics: dict[str, float], model: nn.Module, where: tuple[str, int]) -> bool:
        """Record an epoch's validation metrics; True means stop now."""
        value = metrics[self.monitor]
        gain = self.best_value - value if self.monitor == "val_loss" else value - self.best_value
        if gain > self.min_delta:
            self.best_value, self.best_epoch, self.bad_epochs = value, where, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up then cosine decay to zero, stepped per batch."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, forward: Forward, device: torch.device, amp: bool):
    """Mean loss, accuracy and the predicted class of every example."""
    model.eval()
    loss_sum, n, preds = 0.0, 0, []
    dtype = amp_dtype(device, amp)
    for batch in batches:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, y = forward(batch)[:2]  # validation loss is never weighted
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(y)
        preds.append(logits.argmax(1).cpu())
    p = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return loss_sum / max(n, 1), p


def val_metrics(model: nn.Module, val_batches: Callable[[], Iterable], val_targets: torch.Tensor, forward: Forward,
                device: torch.device, amp: bool) -> dict[str, float]:  # fmt: skip
    val_loss, val_pred = evaluate(model, val_batches(), forward, device, amp)
    return {"val_loss": val_loss, "val_acc": (val_pred == val_targets).float().mean().item()}


def run_stage(
    model: nn.Module,
    *,
    stage: str,
    params: Sequence[nn.Parameter],
    l1_params: Sequence[nn.Parameter],
    epochs: int,
    lr: float,
    cfg: TrainCommon,
    train_batches: Callable[[], Iterable],
    n_train_batches: int,
    val_batches: Callable[[], Iterable],
    val_targets: torch.Tensor,
    forward: Forward,
    device: torch.device,
    stopper: EarlyStopping,
    history: list[EpochLog],
    on_train_start: Callable[[], None] = lambda: None,
    averager: AveragedModel | None = None,
    lr_groups: Sequence[tuple[Sequence[nn.Parameter], float]] | None = None,
) -> bool:
    """Train `params` for up to `epochs`; returns True when early stopping ended the stage.

    `lr_groups` splits `params` into groups, each at `lr` times its factor (discriminative rates, e.g. a
    backbone slower than its head); the first group's rate is the one logged.

    With an `averager`, the weights at the end of each of the last `cfg.average_last` epochs are
    folded into its running average (see `keep_weight_average`).
    """
    if epochs == 0:
        return False
    groups = [{"params": list(p), "lr": lr * f} for p, f in lr_groups] if lr_groups else [{"params": list(params)}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, epochs * n_train_batches, cfg.warmup_fraction)
    dtype = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    stopper.new_stage()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        on_train_start()
        loss_sum = correct = seen = 0
        grad_norms: list[torch.Tensor] = []
        # disable=None: the bar only on a terminal; a log (CI, `make all > log`) gets the epoch line below.
        bar = tqdm(train_batches(), total=n_train_batches, desc=f"{stage} {epoch}/{epochs}",
                   disable=None if cfg.progress else True, unit="batch", leave=False)  # fmt: skip
        for batch in bar:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits, y, *weights = forward(batch)
                loss = weighted_cross_entropy(logits.float(), y, weights[0] if weights else None)
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * sum(p.abs().sum() for p in l1_params)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # true gradients (a no-op without fp16 loss scaling)
            # Returns the norm before clipping; with clipping off (inf) it only measures.
            grad_norms.append(nn.utils.clip_grad_norm_(params, cfg.clip_norm or math.inf).detach())
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        val = val_metrics(model, val_batches, val_targets, forward, device, cfg.amp)
        val_loss, val_acc = val["val_loss"], val["val_acc"]
        log = EpochLog(stage, epoch, optimizer.param_groups[0]["lr"], loss_sum / seen, correct / seen,
                       val_loss, val_acc, time.perf_counter() - start)  # fmt: skip
        record_grad_health(log, grad_norms, cfg.clip_norm)
        history.append(log)
        tqdm.write(
            f"[{stage} {epoch}/{epochs}] train loss {log.train_loss:.4f} acc {log.train_acc:.3f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.3f} | grad norm {log.grad_norm:.3g} (p99 {log.grad_norm_p99:.3g}, "
            f"max {log.grad_norm_max:.3g}, clipped {clipped_share(log, cfg.clip_norm)}) | {log.seconds:.0f}s"
        )
        if averager is not None and epoch > epochs - cfg.average_last:
            averager.update_parameters(model)
        if stopper.update(val, model, (stage, epoch)):
            tqdm.write(f"early stopping: no {stopper.monitor} gain for {cfg.patience} epoch(s)")
            return True
    return False


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, each example's term weighted (a weighted mean) when `weights` are given."""
    if weights is None:
        return nn.functional.cross_entropy(logits, y)
    per_example = nn.functional.cross_entropy(logits, y, reduction="none")
    return (weights * per_example).sum() / weights.sum()


def record_grad_health(log: EpochLog, grad_norms: list[torch.Tensor], clip_norm: float) -> None:
    """Fill the epoch's gradient-norm fields (one device sync per epoch, not per step)."""
    norms = torch.stack(grad_norms).float().cpu()
    norms = norms[torch.isfinite(norms)]  # an fp16 overflow step (skipped by the scaler) has no norm
    if len(norms):
        log.grad_norm, log.grad_norm_max = norms.mean().item(), norms.max().item()
        log.grad_norm_p50, log.grad_norm_p99 = (torch.quantile(norms, q).item() for q in (0.5, 0.99))
        log.clipped_fraction = (norms > clip_norm).float().mean().item() if clip_norm > 0 else 0.0


def clipped_share(log: EpochLog, clip_norm: float) -> str:
    """The epoch's clipped share as the log shows it: a safety net should read 0 % on a clean run."""
    return "off" if clip_norm <= 0 else f"{100 * log.clipped_fraction:.1f}% at {clip_norm:g}"


CLIP_MARGIN = 1.5


def clip_threshold(history: list[dict], margin: float = CLIP_MARGIN) -> float:
    """A clipping threshold from a clean run's measured gradient norms (its history rows, recorded with
    clipping off or idle): the highest per-epoch 99th percentile (its max, in a history recorded before
    percentiles were: an upper bound), times `margin`, rounded up to two significant figures. A clean run
    hardly reaches it, so clipping leaves ordinary steps alone and catches a blow-up (a safety net, not a
    normaliser that rescales every step)."""
    high = [h.get("grad_norm_p99", h.get("grad_norm_max", math.nan)) for h in history]
    high = [v for v in high if v is not None and math.isfinite(v)]
    if not high:
        raise ValueError("the history has no measured gradient norms")
    value = margin * max(high)
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step) * step


def weight_averager(model: nn.Module, cfg: TrainCommon) -> AveragedModel | None:
    """An equal-weight running average of the model (SWA-style), or None when `--average-last` < 2."""
    # use_buffers: BatchNorm statistics are averaged too, so no extra pass over the data is needed.
    return AveragedModel(model, use_buffers=True) if cfg.average_last >= 2 else None


def keep_weight_average(
    averager: AveragedModel | None, model: nn.Module, stopper: EarlyStopping, *, cfg: TrainCommon,
    val_batches: Callable[[], Iterable], val_targets: torch.Tensor, forward: Forward, device: torch.device, **_: object,
) -> None:  # fmt: skip
    """Offer the averaged weights to the stopper like one more epoch: kept only if they beat every epoch.

    The average is loaded into `model` itself (the forward closures call `model`); `stopper.restore`
    then leaves either the average or the best single epoch in place. The outcome is recorded in
    `stopper.weight_average`.
    """
    if averager is None or int(averager.n_averaged) < 2:
        return
    model.load_state_dict(averager.module.state_dict())
    metrics = val_metrics(model, val_batches, val_targets, forward, device, cfg.amp)
    where = ("average", int(averager.n_averaged))
    stopper.update(metrics, model, where)
    kept = stopper.best_epoch == where
    stopper.weight_average = {"epochs": where[1], **metrics, "kept": kept}
    tqdm.write(
        f"[weight average of the last {where[1]} epochs] val loss {metrics['val_loss']:.4f} "
        f"acc {metrics['val_acc']:.3f} | {'kept' if kept else 'not kept: a single epoch was better'}"
    )


def history_rows(history: list[EpochLog]) -> list[dict]:
    return [asdict(h) for h in history]
