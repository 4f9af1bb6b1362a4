"""The limited-data study: what each answer to "few labelled images" buys, measured.

At each labelled-set size and seed, on the same labelled images and the same test images:
- models: ImageNet-pretrained EfficientNet-Lite0 at the main job's input size, three ways (a linear
  probe: backbone frozen, head only; the probe's head then every layer fine-tuned at one rate; the
  same with the backbone at a tenth of the head's rate), and a small CNN from scratch at the native
  28 px; each arm's learning rate and epochs are tuned first on a validation split (held-out
  training images, never the test set);
- methods, on the small CNN: augmentation off vs on, pseudo-labelling and FixMatch (consistency
  regularisation) on the unlabelled rest of the training set, rotation-prediction pre-training on
  that unlabelled pool, and active learning (labels chosen by lowest top-1 probability) vs labels
  drawn at random at the same budget.

Every run holds out a validation split of max(200, 10 % of the labelled size) further training
images for early stopping (the main job's convention), the same for every arm. A cell is one arm at
one size and seed; progress is saved after each, and the JSON, Markdown report and plot (mean ± sd
error bars) in `cfg.output` are rewritten after each, naming the cells still missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from servable.config import LimitedDataConfig
from servable.files import write_atomically
from servable.machine import describe_machine
from servable.preprocessing import ImagePreprocessing
from training import cell_pool
from training.active_learning import select_labels
from training.data_images import ImageSplits, load_fashion_mnist
from training.fixmatch import fixmatch
from training.image_pipeline import build_model, fine_tune, predict_proba
from training.linear_probe import features, probe_proba, train_probe
from training.loop import EpochLog
from training.runtime import prepare_process
from training.self_supervised import pretrain_rotation, with_backbone
from training.semi_supervised import self_train

SMALL_CNN_SIZE = 28  # Fashion-MNIST's native size
PRETRAINED = {"architecture": "efficientnet-lite0", "pretrained": True, "epochs_head": 0}
SMALL_CNN = {"architecture": "small-cnn", "pretrained": False, "epochs_head": 0, "image_size": SMALL_CNN_SIZE}
MODELS = {"probe": PRETRAINED, "pretrained": PRETRAINED, "slow-backbone": PRETRAINED, "small-cnn": SMALL_CNN}
TRANSFER = ("probe", "pretrained", "slow-backbone")
METHODS = ("no-augmentation", "pseudo-label", "fixmatch", "rotation-ssl", "active")
ARMS = (*MODELS, *METHODS)
TUNED = ("probe", "pretrained", "slow-backbone", "small-cnn", "rotation-ssl")  # each its own lr and epochs
SCRATCH = ("small-cnn",)
TUNE_VAL_IMAGES = 1000  # a choice among a few settings needs a steadier estimate than 200 images give
LABELS = {
    "probe": "EfficientNet-Lite0, ImageNet, linear probe",
    "pretrained": "EfficientNet-Lite0, ImageNet, fine-tuned",
    "slow-backbone": "EfficientNet-Lite0, ImageNet, fine-tuned, backbone at lr/10",
    "small-cnn": "small CNN (28 px), from scratch",
    "no-augmentation": "without augmentation",
    "pseudo-label": "+ pseudo-labels (self-training)",
    "fixmatch": "+ FixMatch (consistency)",
    "rotation-ssl": "rotation pre-training on the unlabelled pool",
    "active": "active learning (least confident)",
}


@dataclass
class Pool:
    """All 60,000 training images at one input size, and the test subset."""

    prep: ImagePreprocessing
    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: list[str]


@dataclass
class Draw:
    """One seed's indices into the pool; the labelled sets of a seed are nested across sizes."""

    labelled: np.ndarray
    val: np.ndarray
    unlabelled: np.ndarray


@dataclass
class Study:
    """What every cell shares: the settings, the pools, the tuned settings and the caches under runs_dir."""

    cfg: LimitedDataConfig
    pools: dict[int, Pool]
    tuned: dict = field(default_factory=dict)
    _features: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def pool(self, arm: str) -> Pool:
        return self.pools[MODELS.get(arm, SMALL_CNN).get("image_size", self.cfg.image_size)]

    def cache(self, name: str) -> Path:
        path = progress_path(self.cfg).parent / f"cache-{config_hash(self.cfg)}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def load_pools(cfg: LimitedDataConfig) -> dict[int, Pool]:
    """One pool per input size, in the same image order (the same seed), so every model sees the same images."""
    pools = {}
    for size in sorted({cfg.image_size, SMALL_CNN_SIZE}):
        prep = ImagePreprocessing(size=size, color_mode="L")
        s = load_fashion_mnist(cfg.fashion_mnist_dir, prep, seed=cfg.seed, val_fraction=cfg.val_fraction,
                               limit=None, test_limit=cfg.test_limit, progress=cfg.progress)  # fmt: skip
        pools[size] = Pool(prep, np.concatenate([s.train_x, s.val_x]), np.concatenate([s.train_y, s.val_y]),
                           s.test_x, s.test_y, s.labels)  # fmt: skip
    return pools


def val_size(cfg: LimitedDataConfig, size: int) -> int:
    return max(200, int(size * cfg.val_fraction))


def draw(cfg: LimitedDataConfig, n_pool: int, size: int, seed: int, n_val: int | None = None) -> Draw:
    order = np.random.default_rng(seed).permutation(n_pool)
    n_val = n_val or val_size(cfg, size)
    rest = order[n_val:-size]
    return Draw(labelled=order[-size:], val=order[:n_val], unlabelled=rest[: cfg.unlabelled_pool])


def ssl_pool(cfg: LimitedDataConfig, n_pool: int, seed: int) -> np.ndarray:
    """The seed's unlabelled images for rotation pre-training: one pool for every size, clear of every
    validation split (the first images of the seed's order) and of the labelled ones (its last)."""
    order = np.random.default_rng(seed).permutation(n_pool)
    start = max(TUNE_VAL_IMAGES, *(val_size(cfg, s) for s in cfg.sizes))
    return order[start : start + cfg.unlabelled_pool]


def tune_draw(cfg: LimitedDataConfig, pool: Pool) -> Draw:
    return draw(cfg, len(pool.y), cfg.tune_size, cfg.seeds[0], n_val=TUNE_VAL_IMAGES)


def scaled_epochs(cfg: LimitedDataConfig, epochs: int, size: int) -> int:
    """Tuned epochs, or more at a smaller size: at least the optimiser steps the tuning run took."""
    return max(epochs, math.ceil(epochs * cfg.tune_size / size))


def arm_config(cfg: LimitedDataConfig, arm: str, seed: int, tuned: dict, size: int | None = None,
               **update) -> LimitedDataConfig:  # fmt: skip
    """The training config of `arm` (a method trains the small CNN): its tuned lr and epochs (scaled to `size`)."""
    fields = {**MODELS.get(arm, SMALL_CNN), "seed": seed}
    if arm == "probe":
        fields["epochs_head"] = 1  # the probe's stage is the head stage
    key = arm if arm in tuned else "small-cnn"
    if key in tuned:
        epochs = tuned[key]["epochs"] if size is None else scaled_epochs(cfg, tuned[key]["epochs"], size)
        stage = ("lr_head", "epochs_head") if arm == "probe" else ("lr_finetune", "epochs_finetune")
        fields.update(dict(zip(stage, (tuned[key]["lr"], epochs), strict=True)))
    return cfg.model_copy(update={**fields, **update})


def splits_of(pool: Pool, train_idx: np.ndarray, val_idx: np.ndarray) -> ImageSplits:
    return ImageSplits(pool.labels, pool.x[train_idx], pool.y[train_idx], pool.x[val_idx], pool.y[val_idx],
                       pool.test_x, pool.test_y)  # fmt: skip


def train(run_cfg: LimitedDataConfig, pool: Pool, train_idx: np.ndarray, val_idx: np.ndarray, **kwargs):
    """One run of the project's own training (image_pipeline.fine_tune) on the chosen images."""
    model, history, *_ = fine_tune(run_cfg, splits_of(pool, train_idx, val_idx), pool.prep, **kwargs)
    return model, history


def test_accuracy(model, pool: Pool) -> float:
    return float((predict_proba(model, pool.test_x, pool.prep).argmax(1) == pool.test_y).mean())


def run_record(accuracy: float, history: list[EpochLog], seed: int, start: tuple[float, float], **extra) -> dict:
    """Test accuracy and the evidence that the run learned: training loss and accuracy, first vs last epoch;
    wall-clock and CPU seconds (on a shared machine the CPU time is the steadier cost) and the torch threads."""
    return {
        "seed": seed, "accuracy": accuracy, "epochs_run": len(history),
        "train_loss": [history[0].train_loss, history[-1].train_loss],
        "train_acc": [history[0].train_acc, history[-1].train_acc],
        "best_val_acc": max(h.val_acc for h in history), "seconds": round(time.perf_counter() - start[0], 1),
        "cpu_seconds": round(time.process_time() - start[1], 1), "threads": torch.get_num_threads(), **extra,
    }  # fmt: skip


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# --- the transfer arms: features once, the probe, fine-tuning from the probe's head -------------------------


def probe_features(study: Study) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frozen ImageNet backbone's features of every pool image a probe can see (each seed's labelled and
    validation images, the tuning draw's) and of the test images; computed once, cached under runs_dir."""
    if study._features is not None:
        return study._features
    cfg, pool = study.cfg, study.pool("probe")
    path = study.cache(f"features-{cfg.image_size}px.npz")
    if path.is_file():
        with np.load(path) as z:
            study._features = (z["index"], z["train"], z["test"])
            return study._features
    parts = [tune_draw(cfg, pool).val, tune_draw(cfg, pool).labelled]
    for seed in cfg.seeds:
        for size in cfg.sizes:
            d = draw(cfg, len(pool.y), size, seed)
            parts += [d.labelled, d.val]
    index = np.unique(np.concatenate(parts))
    tqdm.write(f"== linear probe: backbone features of {len(index):,} training and {len(pool.test_y):,} test images")
    backbone = build_model(arm_config(cfg, "probe", cfg.seeds[0], {}), len(pool.labels))
    study._features = (index, features(backbone, pool.x[index], pool.prep), features(backbone, pool.test_x, pool.prep))
    np.savez(path, index=index, train=study._features[1], test=study._features[2])
    return study._features


def run_probe(study: Study, run_cfg: LimitedDataConfig, d: Draw):
    """A linear probe on `d`'s labelled images: the pretrained model (backbone untouched) and its history."""
    pool, (index, train_f, _) = study.pool("probe"), probe_features(study)
    rows = lambda idx: train_f[np.searchsorted(index, idx)]  # noqa: E731
    model = build_model(run_cfg, len(pool.labels))
    history = train_probe(run_cfg, model, rows(d.labelled), pool.y[d.labelled], rows(d.val), pool.y[d.val])
    return model, history


def probe_accuracy(study: Study, model) -> float:
    pool = study.pool("probe")
    return float((probe_proba(model, probe_features(study)[2]).argmax(1) == pool.test_y).mean())


def fine_tune_from_probe(study: Study, arm: str, run_cfg: LimitedDataConfig, probe, d: Draw):
    """Fine-tune every layer from the probe's head (linear probe, then fine-tune: the head does not start random
    and so does not wreck the features in the first steps); the slower-backbone arm at cfg.backbone_lr_factor."""
    factor = study.cfg.backbone_lr_factor if arm == "slow-backbone" else 1.0
    return train(
        run_cfg,
        study.pool(arm),
        d.labelled,
        d.val,
        init_state=probe.state_dict(),
        backbone_lr_factor=factor,
        frozen_bn=study.cfg.finetune_frozen_bn,
    )


def ssl_backbone(study: Study, seed: int) -> dict:
    """The small CNN's backbone pre-trained by rotation prediction on the seed's unlabelled pool (cached)."""
    path = study.cache(f"rotation-seed{seed}.pt")
    if path.is_file():
        return torch.load(path)
    cfg, pool = study.cfg, study.pool("small-cnn")
    x = pool.x[ssl_pool(cfg, len(pool.y), seed)]
    tqdm.write(f"== rotation pre-training, seed {seed}: {len(x):,} unlabelled images x 4 rotations")
    start = clock()
    run_cfg = arm_config(cfg, "small-cnn", seed, {}, lr_finetune=cfg.ssl_lr, epochs_finetune=cfg.ssl_epochs,
                         patience=cfg.ssl_epochs)  # fmt: skip
    backbone, history = pretrain_rotation(run_cfg, x, pool.prep, val_images=min(1000, len(x) // 5))
    saved = {"backbone": backbone, "rotation_val_acc": max(h.val_acc for h in history), "epochs": len(history),
             "seconds": round(time.perf_counter() - start[0], 1),
             "cpu_seconds": round(time.process_time() - start[1], 1)}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    write_atomically(path, buffer.getvalue())  # whole or absent: `ready` starts the seed's other rotation cells on it
    return saved


def ssl_init(study: Study, run_cfg: LimitedDataConfig, seed: int) -> dict:
    return with_backbone(run_cfg, ssl_backbone(study, seed)["backbone"], len(study.pool("small-cnn").labels))


# --- tuning ------------------------------------------------------------------------------------------------


def tune(study: Study, on_tuned=lambda: None) -> dict:
    """Learning rate and epochs of each tuned arm, chosen by validation accuracy at `tune_size` (seed 0's draw,
    TUNE_VAL_IMAGES held-out training images): each arm gets its own, none the others' defaults."""
    cfg, tuned = study.cfg, study.tuned
    grids = {
        "probe": (cfg.tune_lrs_probe, cfg.probe_max_epochs),
        "pretrained": (cfg.tune_lrs_pretrained, cfg.pretrained_max_epochs),
        "slow-backbone": (cfg.tune_lrs_slow_backbone, cfg.pretrained_max_epochs),
        "small-cnn": (cfg.tune_lrs, cfg.small_cnn_max_epochs),
        "rotation-ssl": (cfg.tune_lrs, cfg.small_cnn_max_epochs),
    }
    seed = cfg.seeds[0]
    for arm in TUNED:
        if arm in tuned:
            continue
        lrs, max_epochs = grids[arm]
        pool = study.pool(arm)
        d = tune_draw(cfg, pool)
        curves = {}
        for lr in lrs:
            tqdm.write(f"== tuning {arm}: lr {lr:g}, up to {max_epochs} epochs on {cfg.tune_size} images")
            stage = ("lr_head", "epochs_head") if arm == "probe" else ("lr_finetune", "epochs_finetune")
            run_cfg = arm_config(cfg, arm, seed, {}, **dict(zip(stage, (lr, max_epochs), strict=True)),
                                 patience=max_epochs)  # fmt: skip
            history = tuning_run(study, arm, run_cfg, d, seed)
            curves[lr] = [h.val_acc for h in history if h.stage in ("head", "finetune")]
        lr, epoch = max(((lr, e) for lr, c in curves.items() for e in range(len(c))), key=lambda k: curves[k[0]][k[1]])
        tuned[arm] = {"lr": lr, "epochs": epoch + 1, "val_acc": curves[lr][epoch], "val_acc_by_lr": curves}
        tqdm.write(f"tuned {arm}: lr {lr:g}, {epoch + 1} epochs (val acc {curves[lr][epoch]:.3f})")
        on_tuned()  # saved: a stopped study keeps the arms already tuned
    return tuned


def tuning_run(study: Study, arm: str, run_cfg: LimitedDataConfig, d: Draw, seed: int) -> list[EpochLog]:
    if arm == "probe":
        return run_probe(study, run_cfg, d)[1]
    if arm in ("pretrained", "slow-backbone"):
        probe, _ = run_probe(study, arm_config(study.cfg, "probe", seed, study.tuned), d)
        return fine_tune_from_probe(study, arm, run_cfg, probe, d)[1]
    init = ssl_init(study, run_cfg, seed) if arm == "rotation-ssl" else None
    return train(run_cfg, study.pool(arm), d.labelled, d.val, init_state=init)[1]


# --- one cell: an arm at a size and seed ---------------------------------------------------------------------


def run_cell(study: Study, arm: str, size: int, seed: int) -> dict:
    cfg, tuned, pool = study.cfg, study.tuned, study.pool(arm)
    d = draw(cfg, len(pool.y), size, seed)
    run_cfg = arm_config(cfg, arm, seed, tuned, size)
    start = clock()
    if arm == "probe":
        model, history = run_probe(study, run_cfg, d)
        return run_record(probe_accuracy(study, model), history, seed, start)
    if arm in ("pretrained", "slow-backbone"):
        probe, _ = run_probe(study, arm_config(cfg, "probe", seed, tuned, size), d)
        model, history = fine_tune_from_probe(study, arm, run_cfg, probe, d)
        return run_record(test_accuracy(model, pool), history, seed, start)
    if arm == "small-cnn":
        model, history = train(run_cfg, pool, d.labelled, d.val)
        torch.save(model.state_dict(), study.cache(f"small-cnn-{size}-seed{seed}.pt"))  # the methods' teacher
        return run_record(test_accuracy(model, pool), history, seed, start)
    if arm == "no-augmentation":
        model, history = train(run_cfg.model_copy(update={"augment": False}), pool, d.labelled, d.val)
        return run_record(test_accuracy(model, pool), history, seed, start)
    if arm == "rotation-ssl":
        model, history = train(run_cfg, pool, d.labelled, d.val, init_state=ssl_init(study, run_cfg, seed))
        pretext = {k: v for k, v in ssl_backbone(study, seed).items() if k != "backbone"}
        return run_record(test_accuracy(model, pool), history, seed, start, pretext=pretext)
    if arm in ("pseudo-label", "fixmatch"):
        teacher = build_model(run_cfg, len(pool.labels))
        teacher.load_state_dict(torch.load(study.cache(f"small-cnn-{size}-seed{seed}.pt")))
        splits = splits_of(pool, d.labelled, d.val)
        if arm == "pseudo-label":
            second = run_cfg.model_copy(update={"epochs_finetune": cfg.pseudo_epochs})
            model, history, pseudo = self_train(second, splits, pool.prep, teacher.eval(), pool.x[d.unlabelled],
                                                cfg.pseudo_threshold)  # fmt: skip
            extra = {"pseudo_labels": len(pseudo.index), "pseudo_label_accuracy": pseudo.accuracy(pool.y[d.unlabelled])}
        else:
            model, history, extra = fixmatch(
                run_cfg, splits, pool.prep, teacher.state_dict(), pool.x[d.unlabelled], threshold=cfg.pseudo_threshold,
                steps=cfg.fixmatch_steps, mu=cfg.fixmatch_mu, weight=cfg.fixmatch_weight,
                eval_every=cfg.fixmatch_eval_every, unlabelled_y=pool.y[d.unlabelled],
            )  # fmt: skip
        return run_record(test_accuracy(model, pool), history, seed, start, **extra)
    if arm == "active":
        return run_active(cfg, pool, d, size, seed, run_cfg, start)
    raise ValueError(f"unknown arm {arm!r}")


def run_active(cfg: LimitedDataConfig, pool: Pool, d: Draw, size: int, seed: int, run_cfg, start) -> dict:
    """Active learning at the baseline's budget: labels chosen by least confidence, then the baseline's training."""

    def predict(labelled: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        model, _ = train(run_cfg, pool, labelled, d.val)
        return predict_proba(model, pool.x[candidates], pool.prep)

    candidates = np.concatenate([d.labelled, d.unlabelled])  # the random arm's labels come from here too
    chosen = select_labels(candidates, size, int(size * cfg.active_initial), cfg.active_rounds,
                           np.random.default_rng(seed), predict)  # fmt: skip
    model, history = train(run_cfg, pool, chosen, d.val)
    counts = np.bincount(pool.y[chosen], minlength=len(pool.labels))
    return run_record(test_accuracy(model, pool), history, seed, start, smallest_class_share=float(counts.min() / size))


# --- progress ------------------------------------------------------------------------------------------------

# Settings that do not change a result: a stopped study resumes under other values of these.
RESUME_IGNORES = ("output", "runs_dir", "num_threads", "progress", "device", "jobs")


def resume_key(cfg: LimitedDataConfig) -> dict:
    """The settings a saved progress must match to be resumed (those that change a result)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_IGNORES}


def config_hash(cfg: LimitedDataConfig) -> str:
    return hashlib.sha256(json.dumps(resume_key(cfg), sort_keys=True).encode()).hexdigest()[:12]


def progress_path(cfg: LimitedDataConfig) -> Path:
    return cfg.runs_dir / "limited_data" / "progress.json"


def empty_runs(cfg: LimitedDataConfig) -> dict[str, dict[int, list[dict]]]:
    return {arm: {s: [] for s in cfg.sizes} for arm in ARMS}


def load_progress(cfg: LimitedDataConfig) -> dict | None:
    """What a stopped run of the same study finished (tuning, every completed cell), or None."""
    path = progress_path(cfg)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["config"] != resume_key(cfg):
        tqdm.write(f"{path} is from another configuration of the study: starting afresh")
        return None
    # JSON keys are strings: the sizes and the tuned learning rates come back as numbers
    saved["runs"] = {arm: {int(size): rs for size, rs in by.items()} for arm, by in saved["runs"].items()}
    for t in saved["tuned"].values():
        t["val_acc_by_lr"] = {float(lr): accs for lr, accs in t["val_acc_by_lr"].items()}
    return saved


def save_progress(cfg: LimitedDataConfig, tuned: dict, runs: dict, seconds: tuple[float, float]) -> None:
    """`seconds`: wall-clock and CPU seconds spent so far, over every sitting."""
    path = progress_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": resume_key(cfg), "tuned": tuned, "runs": runs, "seconds": seconds[0], "cpu_seconds": seconds[1]}
    write_atomically(path, json.dumps(state).encode())  # a run stopped mid-write keeps the previous state


def has(runs: dict, arm: str, size: int, seed: int) -> bool:
    return any(r["seed"] == seed for r in runs[arm][size])


def cells_to_run(cfg: LimitedDataConfig, runs: dict) -> list[tuple[str, int, int]]:
    """(arm, size, seed) of every cell not run yet, in the study's order: by size, then seed, then arm."""
    return [(arm, size, seed) for size in cfg.sizes for seed in cfg.seeds for arm in ARMS
            if not has(runs, arm, size, seed)]  # fmt: skip


def missing_cells(cfg: LimitedDataConfig, runs: dict) -> list[str]:
    return [f"{arm} {size} seed {seed}" for arm, size, seed in cells_to_run(cfg, runs)]


def run_experiment(cfg: LimitedDataConfig) -> dict:
    """The whole study. Progress is saved after tuning and after each cell (under runs_dir), so a stopped
    run, started again with the same settings, goes on where it stopped; the report is rewritten after each cell."""
    prepare_process(cfg.num_threads)
    cfg.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(cfg, load_pools(cfg))
    saved = load_progress(cfg)
    earlier = (saved["seconds"], saved.get("cpu_seconds", 0.0)) if saved else (0.0, 0.0)
    cpu_started = time.process_time()
    cells_cpu = [0.0]  # CPU of cells run in worker processes, which this process's clock does not see
    elapsed = lambda: (earlier[0] + time.perf_counter() - started,  # noqa: E731
                       earlier[1] + time.process_time() - cpu_started + cells_cpu[0])  # fmt: skip
    runs = saved["runs"] if saved else empty_runs(cfg)
    if saved:
        study.tuned = saved["tuned"]
        tqdm.write(f"resuming from {progress_path(cfg)}: {len(missing_cells(cfg, runs))} cells to go")
    tune(study, lambda: save_progress(cfg, study.tuned, runs, elapsed()))
    save_progress(cfg, study.tuned, runs, elapsed())

    def done(arm: str, size: int, record: dict, in_worker: bool) -> None:
        runs[arm][size].append(record)
        cells_cpu[0] += record["cpu_seconds"] if in_worker else 0.0
        save_progress(cfg, study.tuned, runs, elapsed())
        report(cfg, study.tuned, runs, elapsed(), saved is not None)

    jobs, threads = cell_pool.job_shape(cfg.jobs, cfg.num_threads)
    todo = cells_to_run(cfg, runs)
    if jobs == 1:
        for arm, size, seed in todo:
            tqdm.write(f"== {arm}, {size} labelled images, seed {seed}")
            done(arm, size, run_cell(study, arm, size, seed), in_worker=False)
    elif todo:
        if any(arm in TRANSFER for arm, *_ in todo):
            probe_features(study)  # computed here once, not by every worker at the same time
        run_in_workers(study, runs, todo, jobs, threads, lambda arm, size, seed, record: done(arm, size, record, True))
    results = report(cfg, study.tuned, runs, elapsed(), saved is not None)
    if not results["missing"]:
        progress_path(cfg).unlink()
    return results


# --- cells in parallel: one process per job, each with its share of the cores ----------------------------------


def ready(cell: tuple[str, int, int], runs: dict, running: list[tuple[str, int, int]], study: Study) -> bool:
    """A cell may start once what it reads exists: pseudo-labels and FixMatch start from the small CNN of the
    same size and seed (its saved weights); the first rotation cell of a seed pre-trains and caches the
    backbone the seed's other rotation cells load, so they wait for it."""
    arm, size, seed = cell
    if arm in ("pseudo-label", "fixmatch"):
        return has(runs, "small-cnn", size, seed)
    if arm == "rotation-ssl" and not study.cache(f"rotation-seed{seed}.pt").is_file():
        return not any(a == arm and s == seed for a, _, s in running)
    return True


def largest_first(todo: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The order cells are handed to the workers: the largest labelled sets first, otherwise the study's
    order (a seed's small CNN before the methods that start from it). A cell's cost grows with its size;
    run smallest first, the last 10,000-label cell ran alone for minutes while the other worker sat idle."""
    return sorted(todo, key=lambda cell: -cell[1])  # stable: the study's order within a size


_WORKER: Study | None = None  # a worker process's own copy of the study (pools loaded once per process)


def _start_worker(cfg: LimitedDataConfig, tuned: dict) -> None:
    global _WORKER
    prepare_process(cfg.num_threads)
    _WORKER = Study(cfg, load_pools(cfg), tuned)


def _worker_cell(arm: str, size: int, seed: int) -> dict:
    assert _WORKER is not None
    return run_cell(_WORKER, arm, size, seed)


def run_in_workers(study: Study, runs: dict, todo: list[tuple[str, int, int]], jobs: int, threads: int,
                   on_done) -> None:  # fmt: skip
    """Run `todo`'s cells `jobs` at a time in spawned processes (each with `threads` torch threads), largest
    labelled sets first (`largest_first`) except where a cell waits for another; `on_done(arm, size, seed,
    record)` as each ends (it records the cell in `runs`, which `ready` reads)."""
    # the plain config class: a subclass (the CLI's command) lives in a __main__ the workers do not import
    fields = {**study.cfg.model_dump(), "num_threads": threads, "progress": False}
    worker_cfg = LimitedDataConfig.model_construct(**fields)
    cell_pool.run_in_workers(
        largest_first(todo), jobs, _start_worker, (worker_cfg, study.tuned), _worker_cell,
        ready=lambda cell, running: ready(cell, runs, running, study),
        on_done=lambda cell, record: on_done(*cell, record),
        name=lambda cell: f"{cell[0]}, {cell[1]} labelled images, seed {cell[2]}",
    )  # fmt: skip


def report(cfg: LimitedDataConfig, tuned: dict, runs: dict, seconds: tuple[float, float], resumed: bool) -> dict:
    results = {
        "config": cfg.model_dump(mode="json"), "machine": describe_machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command_line(cfg),
        "minutes": round(seconds[0] / 60, 1), "cpu_minutes": round(seconds[1] / 60, 1), "resumed": resumed,
        "tuned": tuned,
        "missing": missing_cells(cfg, runs), "runs": runs, "summary": summarize(runs),
    }  # fmt: skip
    write_report(cfg, results)
    return results


# --- the report ----------------------------------------------------------------------------------------------


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Mean and sample sd of test accuracy per arm and size (cells with no run yet left out)."""
    out: dict[str, dict[int, dict]] = {}
    for arm, by_size in runs.items():
        for size, records in by_size.items():
            if not records:
                continue
            acc = np.array([r["accuracy"] for r in records])
            sd = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
            out.setdefault(arm, {})[size] = {"mean": float(acc.mean()), "sd": sd, "n": len(acc)}
    return out


def command_line(cfg: LimitedDataConfig) -> str:
    """The command that reproduces this run: as typed, or the settings that differ from the defaults."""
    if sys.argv[0].endswith("__main__.py"):
        return "python -m training " + " ".join(sys.argv[1:])
    default, ours = LimitedDataConfig().model_dump(mode="json"), cfg.model_dump(mode="json")
    flags = [
        f"--{k.replace('_', '-')} '{v if isinstance(v, str) else json.dumps(v)}'"
        for k, v in ours.items()
        if v != default[k]
    ]
    return " ".join(["python -m training limited-data", *flags])


LEARNED_ACC = 0.3  # three times chance for ten classes


def learned_run(record: dict) -> bool:
    return record["train_loss"][1] < record["train_loss"][0] and record["train_acc"][1] > LEARNED_ACC


LEARNED_HEAD = (
    "| baseline | labelled | training loss, epoch 1 (lowest) → last (highest) | training accuracy, last epoch (lowest) "
    "| test accuracy (lowest) | epochs run (mean) |\n|---|---:|---|---:|---:|---:|\n"
)


def fmt(cell: dict | None, seeds: int | None = None) -> str:
    """mean ± sd; with fewer seeds than the study's, how many ran; '–' for a cell not yet run."""
    if cell is None:
        return "–"
    text = f"{cell['mean']:.3f} ± {cell['sd']:.3f}"
    return text if seeds is None or cell.get("n", seeds) >= seeds else f"{text} ({cell['n']} of {seeds} seeds)"


def by_seed(runs: dict, arm: str, size: int) -> dict[int, float]:
    return {r["seed"]: r["accuracy"] for r in runs[arm][size]}


def headline(cfg: LimitedDataConfig, summary: dict) -> list[str]:
    """Per size measured: the best transfer arm against the small CNN and the best small-CNN arm, in words."""
    lines = []
    for s in cfg.sizes:
        transfer = {a: summary[a][s]["mean"] for a in TRANSFER if s in summary.get(a, {})}
        scratch = {a: summary[a][s]["mean"] for a in ("small-cnn", *METHODS) if s in summary.get(a, {})}
        if not transfer or "small-cnn" not in scratch:
            continue
        best_t, best_s = max(transfer, key=transfer.get), max(scratch, key=scratch.get)
        gap = transfer[best_t] - scratch["small-cnn"]
        verdict = "transfer learning is ahead" if gap > 0 else "the small CNN from scratch is ahead"
        lines.append(
            f"- {s:,} labels: {verdict}: best transfer arm {LABELS[best_t]} {transfer[best_t]:.3f} vs the small CNN "
            f"{scratch['small-cnn']:.3f} ({100 * gap:+.1f} points); best small-CNN arm: {LABELS[best_s]} "
            f"{scratch[best_s]:.3f}."
        )
    return lines


BN_FROZEN = (
    "Both keep the backbone's ImageNet BatchNorm statistics (eval mode) while its weights train: "
    "batches of a few hundred labels would re-estimate them noisily."
)
BN_TRAINED = "Both re-estimate the backbone's BatchNorm statistics from the training batches."


def write_report(cfg: LimitedDataConfig, results: dict) -> None:
    summary, runs, tuned, sizes = results["summary"], results["runs"], results["tuned"], cfg.sizes
    n_seeds = len(cfg.seeds)
    plot(cfg, summary)
    head = "| labelled images | " + " | ".join(f"{s:,}" for s in sizes) + " |\n|---|" + "---:|" * len(sizes) + "\n"

    def row(arm: str, label: str | None = None) -> str:
        cells = (fmt(summary.get(arm, {}).get(s), n_seeds) for s in sizes)
        return f"| {label or LABELS[arm]} | " + " | ".join(cells) + " |\n"

    def paired(arm: str, base: str) -> str:
        cells = []
        for s in sizes:
            a, b = by_seed(runs, arm, s), by_seed(runs, base, s)
            d = np.array([a[k] - b[k] for k in sorted(a.keys() & b.keys())])
            cells.append("–" if not len(d) else f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}")
        return (
            f"| {LABELS[arm]} − {LABELS[base] if base != 'small-cnn' else 'baseline'} | " + " | ".join(cells) + " |\n"
        )

    def mean_of(arm: str, key: str, s: int, form: str) -> str:
        values = [r[key] for r in runs[arm][s] if key in r]
        return form.format(np.mean(values)) if values else "–"

    learned = "".join(
        f"| {LABELS[arm]} | {s:,} | {min(r['train_loss'][0] for r in runs[arm][s]):.3f} → "
        f"{max(r['train_loss'][1] for r in runs[arm][s]):.3f} | {min(r['train_acc'][1] for r in runs[arm][s]):.3f} | "
        f"{min(r['accuracy'] for r in runs[arm][s]):.3f} | {np.mean([r['epochs_run'] for r in runs[arm][s]]):.1f} |\n"
        for arm in SCRATCH for s in sizes if runs[arm][s]
    )  # fmt: skip
    scratch_runs = [r for arm in SCRATCH for s in sizes for r in runs[arm][s]]
    failed = [r for r in scratch_runs if not learned_run(r)]
    learned_verdict = (
        f"All {len(scratch_runs)} from-scratch runs learned (loss fell, last training accuracy > {LEARNED_ACC})."
        if not failed else f"{len(failed)} of {len(scratch_runs)} from-scratch runs did NOT learn (seeds "
        f"{sorted({r['seed'] for r in failed})}): training loss did not fall or accuracy stayed ≤ {LEARNED_ACC}."
    )  # fmt: skip
    tuning = "".join(
        f"| {LABELS[arm]} | {', '.join(f'{lr:g}: {max(c):.3f}' for lr, c in t['val_acc_by_lr'].items())} | "
        f"{t['lr']:g} | {t['epochs']} |\n"
        for arm, t in tuned.items()
    )
    pseudo = "; ".join(
        f"{s:,}: {mean_of('pseudo-label', 'pseudo_labels', s, '{:,.0f}')} pseudo-labels, "
        f"{mean_of('pseudo-label', 'pseudo_label_accuracy', s, '{:.3f}')} of them right" for s in sizes
    )  # fmt: skip
    fixm = "; ".join(
        f"{s:,}: {mean_of('fixmatch', 'confident_share', s, '{:.2f}')} of the weak views confident, "
        f"{mean_of('fixmatch', 'pseudo_label_accuracy', s, '{:.3f}')} of those right" for s in sizes
    )  # fmt: skip
    pretext = [r["pretext"] for s in sizes for r in runs["rotation-ssl"][s]]
    pretext_text = (
        f"rotation accuracy on held-out unlabelled images {min(p['rotation_val_acc'] for p in pretext):.3f}-"
        f"{max(p['rotation_val_acc'] for p in pretext):.3f}, {max(p['cpu_seconds'] for p in pretext):.0f} CPU seconds "
        "at most per seed" if pretext else "not run yet"
    )  # fmt: skip
    balance = ", ".join(
        f"{s:,}: {min(r['smallest_class_share'] for r in runs['active'][s]):.3f}" for s in sizes if runs["active"][s]
    )
    cost = "".join(
        f"| {LABELS[arm]} | {sum(len(runs[arm][s]) for s in sizes)} | "
        f"{sum(r['seconds'] for s in sizes for r in runs[arm][s]) / 60:.1f} | "
        f"{sum(r.get('cpu_seconds', 0) for s in sizes for r in runs[arm][s]) / 60:.1f} |\n"
        for arm in ARMS
    )  # fmt: skip
    missing = results["missing"]
    status = "All cells ran." if not missing else (
        f"**Partial: {len(missing)} of {len(ARMS) * len(sizes) * n_seeds} cells not run yet** (the same command "
        f"goes on where it stopped): {', '.join(missing)}."
    )  # fmt: skip
    lines = headline(cfg, summary)
    seeds = ", ".join(map(str, cfg.seeds))
    base = row("small-cnn", LABELS["small-cnn"] + ", augmentation on (baseline, random labels)")
    methods = base + "".join(row(m) for m in METHODS)
    text = f"""# Limited labelled data: what each answer buys

Command: `{results["command"]}` ({results["minutes"]} min wall-clock, {results["cpu_minutes"]} CPU minutes: on a
shared machine the CPU time is the steadier measure of cost; two cores give at most two CPU minutes a minute)
Machine: {results["machine"]}; {results["date"]}.
Fashion-MNIST; test set: the first {cfg.test_limit:,} test images; seeds {seeds} at every size
(mean ± sample sd of test accuracy over the seeds). The labelled images of a seed are nested across
sizes and shared by every arm; each run also holds out max(200, 10 % of the labelled size) further
training images as its validation split (early stopping, best epoch kept), the same for every arm.
EfficientNet-Lite0 runs at {cfg.image_size} px, the small CNN at 28 px.

{status}

## Headline: transfer learning vs the small CNN, per size

{chr(10).join(lines) if lines else "No size has both yet."}

## Transfer learning vs a small CNN from scratch

{head}{"".join(row(a) for a in MODELS)}
- Linear probe: the ImageNet backbone frozen (its BatchNorm statistics too), its pooled features computed
  once per image (no augmentation), a new dropout + linear head trained on them.
- Fine-tuned: the probe's head, then every layer at one tuned rate (linear probe, then fine-tune);
  backbone at lr/10: the same with the backbone at {cfg.backbone_lr_factor:g} × the head's tuned rate.
  {BN_FROZEN if cfg.finetune_frozen_bn else BN_TRAINED}
- Every arm but the probe with augmentation on. Each arm runs its tuned epochs, or more at a smaller size:
  at least as many optimiser steps as its tuning run took at {cfg.tune_size:,} labels (early stopping after
  {cfg.patience} epochs without gain).

### Each arm tuned on the validation split; the from-scratch baseline shown to learn

Learning rate and epochs chosen by validation accuracy (best epoch of each rate) at {cfg.tune_size:,}
labelled images, seed {cfg.seeds[0]}, on {TUNE_VAL_IMAGES:,} held-out training images; the test set plays no part.

| arm | best validation accuracy by learning rate | chosen lr | chosen epochs |
|---|---|---:|---:|
{tuning}
{learned_verdict} Worst seed shown for each figure:

{LEARNED_HEAD}{learned}
## Methods for limited labels, on the {LABELS["small-cnn"]}

{head}{methods}
Paired by seed (same labelled draw and initialisation), difference in test accuracy:

{head}{"".join(paired(m, "small-cnn") for m in METHODS)}
- Augmentation: kornia flips, small affine jitter and random erasing (the main job's), on vs off.
- Pseudo-labelling: the baseline model labels {cfg.unlabelled_pool:,} unlabelled training images; those
  with top-1 probability ≥ {cfg.pseudo_threshold} join the labelled ones for {cfg.pseudo_epochs} more epochs
  from the baseline's weights. Mean per size: {pseudo}.
- FixMatch: from the baseline's weights, {cfg.fixmatch_steps} steps of a labelled batch plus {cfg.fixmatch_mu} times
  as many of the same {cfg.unlabelled_pool:,} unlabelled images; a weak view's prediction with top-1 probability
  ≥ {cfg.pseudo_threshold} is the label a strong view (rotation, shear, contrast, solarisation, cut-out) must get
  (weight {cfg.fixmatch_weight:g}); validation every {cfg.fixmatch_eval_every} steps, best kept. Mean per size: {fixm}.
- Rotation pre-training: the small CNN learns which of 0°, 90°, 180°, 270° each of {cfg.unlabelled_pool:,}
  unlabelled images (one pool per seed, clear of every labelled and validation image) is turned by,
  {cfg.ssl_epochs} epochs at lr {cfg.ssl_lr:g}; then its backbone is fine-tuned under a new head at its own tuned
  rate. Pretext: {pretext_text}.
- Active learning at an equal budget: {cfg.active_initial:.0%} of the labels at random, the rest in
  {cfg.active_rounds} round(s) of the least confident (lowest top-1 probability, the signal the serving
  feedback loop queues) among the unlabelled images, then the baseline's training on the chosen set;
  compared with the baseline, whose labels are all random. Smallest class share of the chosen
  labels (0.100 = balanced), lowest seed: {balance or "not run yet"}.
- Generated (synthetic) data: not measured. A generator good enough to add information (a class-conditional
  diffusion model or GAN trained on the same few labels) costs more than this whole study on two CPU cores.

## Cost of each arm (cells run so far)

| arm | cells | wall-clock minutes | CPU minutes |
|---|---:|---:|---:|
{cost}
![accuracy vs labelled images](limited_data.png)
"""
    (cfg.output / "limited_data.md").write_text(text)
    (cfg.output / "limited_data.json").write_text(json.dumps(results, indent=2))
    tqdm.write(f"wrote {cfg.output / 'limited_data.md'}")


def plot(cfg: LimitedDataConfig, summary: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = ((axes[0], tuple(MODELS), "transfer learning vs from scratch"),
              (axes[1], ("small-cnn", *METHODS), f"methods, {LABELS['small-cnn']}"))  # fmt: skip
    for ax, arms, title in panels:
        for arm in arms:
            sizes = [s for s in cfg.sizes if s in summary.get(arm, {})]
            if not sizes:
                continue
            cells = [summary[arm][s] for s in sizes]
            label = LABELS[arm] + (" (baseline)" if ax is axes[1] and arm == "small-cnn" else "")
            ax.errorbar(sizes, [c["mean"] for c in cells], yerr=[c["sd"] for c in cells], fmt="o-", capsize=3,
                        label=label)  # fmt: skip
        ax.set(xscale="log", xlabel="labelled training images", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a partial study may have nothing to plot in a panel yet
            ax.legend(fontsize=8)
    axes[0].set(ylabel=f"test accuracy (mean ± sd, up to {len(cfg.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(cfg.output / "limited_data.png", dpi=100)
    plt.close(fig)
