"""The limited-data study: what each answer to "few labelled images" buys, measured.

At each labelled-set size and seed, on the same labelled images and the same test images:
- models: ImageNet-pretrained EfficientNet-Lite0 (fine-tuned), the same network from scratch, and
  a small CNN from scratch at the native 28 px; the from-scratch learning rates and epochs are
  tuned first on a validation split (held-out training images, never the test set);
- methods, on one model (`method_model`): augmentation off vs on, pseudo-labelling on the
  unlabelled rest of the training set, and active learning (labels chosen by lowest top-1
  probability) vs labels drawn at random at the same budget.

Every run holds out a validation split of max(200, 10 % of the labelled size) further training
images for early stopping (the main job's convention), the same for every arm. Writes JSON, a
Markdown report and a plot with mean ± sd error bars to `cfg.output`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from servable.config import LimitedDataConfig
from servable.machine import describe_machine
from servable.preprocessing import ImagePreprocessing
from training.active_learning import select_labels
from training.data_images import ImageSplits, load_fashion_mnist
from training.image_pipeline import fine_tune, predict_proba
from training.loop import EpochLog
from training.runtime import set_threads
from training.semi_supervised import self_train

SMALL_CNN_SIZE = 28  # Fashion-MNIST's native size
MODELS = {  # arm -> what differs in the training config
    "pretrained": {"architecture": "efficientnet-lite0", "pretrained": True},
    "efficientnet-scratch": {"architecture": "efficientnet-lite0", "pretrained": False, "epochs_head": 0},
    "small-cnn": {"architecture": "small-cnn", "pretrained": False, "epochs_head": 0, "image_size": SMALL_CNN_SIZE},
}
SCRATCH = ("efficientnet-scratch", "small-cnn")
TUNE_VAL_IMAGES = 1000  # a choice among a few settings needs a steadier estimate than 200 images give
METHODS = ("no-augmentation", "pseudo-label", "active")
LABELS = {
    "pretrained": "EfficientNet-Lite0, ImageNet-pretrained",
    "efficientnet-scratch": "EfficientNet-Lite0, from scratch",
    "small-cnn": "small CNN (28 px), from scratch",
    "no-augmentation": "without augmentation",
    "pseudo-label": "+ pseudo-labels (self-training)",
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


def draw(cfg: LimitedDataConfig, n_pool: int, size: int, seed: int, n_val: int | None = None) -> Draw:
    order = np.random.default_rng(seed).permutation(n_pool)
    n_val = n_val or max(200, int(size * cfg.val_fraction))
    rest = order[n_val:-size]
    return Draw(labelled=order[-size:], val=order[:n_val], unlabelled=rest[: cfg.unlabelled_pool])


def arm_config(cfg: LimitedDataConfig, arm: str, seed: int, tuned: dict, **update) -> LimitedDataConfig:
    fields = {**MODELS[arm], "seed": seed}
    if arm in tuned:
        fields.update(lr_finetune=tuned[arm]["lr"], epochs_finetune=tuned[arm]["epochs"])
    return cfg.model_copy(update={**fields, **update})


def splits_of(pool: Pool, train_idx: np.ndarray, val_idx: np.ndarray) -> ImageSplits:
    return ImageSplits(pool.labels, pool.x[train_idx], pool.y[train_idx], pool.x[val_idx], pool.y[val_idx],
                       pool.test_x, pool.test_y)  # fmt: skip


def train(run_cfg: LimitedDataConfig, pool: Pool, train_idx: np.ndarray, val_idx: np.ndarray):
    """One run of the project's own training (image_pipeline.fine_tune) on the chosen images."""
    model, history, *_ = fine_tune(run_cfg, splits_of(pool, train_idx, val_idx), pool.prep)
    return model, history


def run_record(model, pool: Pool, history: list[EpochLog], seed: int, start: float, **extra) -> dict:
    """Test accuracy and the evidence that the run learned: training loss and accuracy, first vs last epoch."""
    accuracy = float((predict_proba(model, pool.test_x, pool.prep).argmax(1) == pool.test_y).mean())
    return {
        "seed": seed, "accuracy": accuracy, "epochs_run": len(history),
        "train_loss": [history[0].train_loss, history[-1].train_loss],
        "train_acc": [history[0].train_acc, history[-1].train_acc],
        "best_val_acc": max(h.val_acc for h in history), "seconds": round(time.perf_counter() - start, 1), **extra,
    }  # fmt: skip


def tune(cfg: LimitedDataConfig, pools: dict[int, Pool]) -> dict:
    """Fine-tuning (pretrained) or training (from scratch) learning rate and epochs of each model, chosen by
    validation accuracy at `tune_size`: each model gets its own, none the others' defaults."""
    tuned = {}
    for arm in MODELS:
        max_epochs = {"pretrained": cfg.pretrained_max_epochs, "efficientnet-scratch": cfg.scratch_max_epochs,
                      "small-cnn": cfg.small_cnn_max_epochs}[arm]  # fmt: skip
        lrs = cfg.tune_lrs_pretrained if arm == "pretrained" else cfg.tune_lrs
        pool = pools[MODELS[arm].get("image_size", cfg.image_size)]
        d = draw(cfg, len(pool.y), cfg.tune_size, cfg.seeds[0], n_val=TUNE_VAL_IMAGES)
        curves = {}
        for lr in lrs:
            tqdm.write(f"== tuning {arm}: lr {lr:g}, up to {max_epochs} epochs on {cfg.tune_size} images")
            run_cfg = arm_config(cfg, arm, cfg.seeds[0], {}, lr_finetune=lr, epochs_finetune=max_epochs,
                                   patience=max_epochs)  # fmt: skip
            _, history = train(run_cfg, pool, d.labelled, d.val)
            curves[lr] = [h.val_acc for h in history if h.stage == "finetune"]  # epochs of the tuned stage
        lr, epoch = max(((lr, e) for lr, c in curves.items() for e in range(len(c))), key=lambda k: curves[k[0]][k[1]])
        tuned[arm] = {"lr": lr, "epochs": epoch + 1, "val_acc": curves[lr][epoch], "val_acc_by_lr": curves}
        tqdm.write(f"tuned {arm}: lr {lr:g}, {epoch + 1} epochs (val acc {curves[lr][epoch]:.3f})")
    return tuned


def run_methods(cfg: LimitedDataConfig, pool: Pool, d: Draw, size: int, seed: int, tuned: dict, teacher) -> dict:
    """Augmentation off, pseudo-labelling and active learning on `cfg.method_model` at one size and seed."""
    arm, out = cfg.method_model, {}
    base_cfg = arm_config(cfg, arm, seed, tuned)

    start = time.perf_counter()
    model, history = train(base_cfg.model_copy(update={"augment": False}), pool, d.labelled, d.val)
    out["no-augmentation"] = run_record(model, pool, history, seed, start)

    start = time.perf_counter()
    second = base_cfg.model_copy(update={"epochs_head": 0, "epochs_finetune": cfg.pseudo_epochs})
    splits = splits_of(pool, d.labelled, d.val)
    student, history, pseudo = self_train(
        second, splits, pool.prep, teacher, pool.x[d.unlabelled], cfg.pseudo_threshold
    )
    out["pseudo-label"] = run_record(student, pool, history, seed, start, pseudo_labels=len(pseudo.index),
                                     pseudo_label_accuracy=pseudo.accuracy(pool.y[d.unlabelled]))  # fmt: skip

    start = time.perf_counter()

    def predict(labelled: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        model, _ = train(base_cfg, pool, labelled, d.val)
        return predict_proba(model, pool.x[candidates], pool.prep)

    candidates = np.concatenate([d.labelled, d.unlabelled])  # the random arm's labels come from here too
    chosen = select_labels(candidates, size, int(size * cfg.active_initial), cfg.active_rounds,
                           np.random.default_rng(seed), predict)  # fmt: skip
    model, history = train(base_cfg, pool, chosen, d.val)
    counts = np.bincount(pool.y[chosen], minlength=len(pool.labels))
    out["active"] = run_record(model, pool, history, seed, start, smallest_class_share=float(counts.min() / size))
    return out


# Settings that do not change a result: a stopped study resumes under other values of these.
RESUME_IGNORES = ("output", "runs_dir", "num_threads", "progress", "device")


def resume_key(cfg: LimitedDataConfig) -> dict:
    """The settings a saved progress must match to be resumed (those that change a result)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_IGNORES}


def progress_path(cfg: LimitedDataConfig) -> Path:
    return cfg.runs_dir / "limited_data" / "progress.json"


def load_progress(cfg: LimitedDataConfig) -> dict | None:
    """What a stopped run of the same study finished (tuning, every completed size and seed), or None."""
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


def save_progress(cfg: LimitedDataConfig, tuned: dict, runs: dict, seconds: float) -> None:
    path = progress_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": resume_key(cfg), "tuned": tuned, "runs": runs, "seconds": seconds}))
    tmp.replace(path)  # atomic: a run stopped mid-write keeps the previous state


def done(runs: dict, size: int, seed: int) -> bool:
    return all(any(r["seed"] == seed for r in by_size[size]) for by_size in runs.values())


def run_experiment(cfg: LimitedDataConfig) -> dict:
    """The whole study. Progress is saved after tuning and after each size and seed (under runs_dir),
    so a stopped run, started again with the same settings, goes on where it stopped."""
    set_threads(cfg.num_threads)
    cfg.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pools = load_pools(cfg)
    saved = load_progress(cfg)
    earlier = saved["seconds"] if saved else 0.0
    elapsed = lambda: earlier + time.perf_counter() - started  # noqa: E731
    tuned = saved["tuned"] if saved else tune(cfg, pools)
    runs: dict[str, dict[int, list[dict]]] = {arm: {s: [] for s in cfg.sizes} for arm in (*MODELS, *METHODS)}
    if saved:
        runs = saved["runs"]
        finished = sum(done(runs, z, e) for z in cfg.sizes for e in cfg.seeds)
        tqdm.write(f"resuming from {progress_path(cfg)}: tuning and {finished} size-seed pairs done")
    save_progress(cfg, tuned, runs, elapsed())
    for size in cfg.sizes:
        for seed in cfg.seeds:
            if done(runs, size, seed):
                continue
            for arm in MODELS:
                pool = pools[MODELS[arm].get("image_size", cfg.image_size)]
                d = draw(cfg, len(pool.y), size, seed)
                tqdm.write(f"== {arm}, {size} labelled images, seed {seed}")
                start = time.perf_counter()
                model, history = train(arm_config(cfg, arm, seed, tuned), pool, d.labelled, d.val)
                runs[arm][size].append(run_record(model, pool, history, seed, start))
                if arm == cfg.method_model:
                    tqdm.write(f"== methods on {arm}, {size} labelled images, seed {seed}")
                    for method, record in run_methods(cfg, pool, d, size, seed, tuned, model).items():
                        runs[method][size].append(record)
            save_progress(cfg, tuned, runs, elapsed())
    results = {
        "config": cfg.model_dump(mode="json"), "machine": describe_machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command_line(cfg),
        "minutes": round(elapsed() / 60, 1), "resumed": saved is not None, "tuned": tuned,
        "runs": runs, "summary": summarize(runs),
    }  # fmt: skip
    write_report(cfg, results)
    progress_path(cfg).unlink()
    return results


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Mean and sample sd of test accuracy per arm and size."""
    out: dict[str, dict[int, dict]] = {}
    for arm, by_size in runs.items():
        for size, records in by_size.items():
            acc = np.array([r["accuracy"] for r in records])
            sd = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
            out.setdefault(arm, {})[size] = {"mean": float(acc.mean()), "sd": sd, "n": len(acc)}
    return out


def crossings(summary: dict, a: str, b: str, sizes: list[int]) -> str:
    """Where the mean curves of `a` and `b` change order, in words."""
    diff = [summary[a][s]["mean"] - summary[b][s]["mean"] for s in sizes]
    cross = [f"between {sizes[i]:,} and {sizes[i + 1]:,}" for i in range(len(sizes) - 1) if diff[i] * diff[i + 1] < 0]
    if cross:
        return f"{LABELS[a]} vs {LABELS[b]}: the curves cross {', '.join(cross)} labelled images."
    ahead = LABELS[a] if diff[0] > 0 else LABELS[b]
    return f"{LABELS[a]} vs {LABELS[b]}: no crossing; {ahead} is ahead at every size measured."


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


def fmt(cell: dict) -> str:
    return f"{cell['mean']:.3f} ± {cell['sd']:.3f}"


def write_report(cfg: LimitedDataConfig, results: dict) -> None:
    summary, runs, tuned, sizes = results["summary"], results["runs"], results["tuned"], cfg.sizes
    plot(cfg, summary)
    method = cfg.method_model
    head = "| labelled images | " + " | ".join(f"{s:,}" for s in sizes) + " |\n|---|" + "---:|" * len(sizes) + "\n"

    def row(arm: str, label: str | None = None) -> str:
        return f"| {label or LABELS[arm]} | " + " | ".join(fmt(summary[arm][s]) for s in sizes) + " |\n"

    def paired(arm: str, base: str) -> str:
        cells = []
        for s in sizes:
            d = np.array([r["accuracy"] for r in runs[arm][s]]) - np.array([r["accuracy"] for r in runs[base][s]])
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}")
        return f"| {LABELS[arm]} − {LABELS[base] if base != method else 'baseline'} | " + " | ".join(cells) + " |\n"

    learned = "".join(
        f"| {LABELS[arm]} | {s:,} | {min(r['train_loss'][0] for r in runs[arm][s]):.3f} → "
        f"{max(r['train_loss'][1] for r in runs[arm][s]):.3f} | {min(r['train_acc'][1] for r in runs[arm][s]):.3f} | "
        f"{min(r['accuracy'] for r in runs[arm][s]):.3f} | {np.mean([r['epochs_run'] for r in runs[arm][s]]):.1f} |\n"
        for arm in SCRATCH for s in sizes
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
        f"{s:,}: {np.mean([r['pseudo_labels'] for r in runs['pseudo-label'][s]]):,.0f} pseudo-labels, "
        f"{np.mean([r['pseudo_label_accuracy'] for r in runs['pseudo-label'][s]]):.3f} of them right"
        for s in sizes
    )
    balance = ", ".join(f"{s:,}: {min(r['smallest_class_share'] for r in runs['active'][s]):.3f}" for s in sizes)
    cross = "\n".join(f"- {crossings(summary, 'pretrained', b, sizes)}" for b in SCRATCH)
    seeds = ", ".join(map(str, cfg.seeds))
    base = row(method, LABELS[method] + ", augmentation on (baseline, random labels)")
    methods = base + "".join(row(m) for m in METHODS)
    text = f"""# Limited labelled data: what each answer buys

Command: `{results["command"]}` ({results["minutes"]} min)
Machine: {results["machine"]}; {results["date"]}.
Fashion-MNIST; test set: the first {cfg.test_limit:,} test images; seeds {seeds} at every size
(mean ± sample sd of test accuracy over the seeds). The labelled images of a seed are nested across
sizes and shared by every arm; each run also holds out max(200, 10 % of the labelled size) further
training images as its validation split (early stopping, best epoch kept), the same for every arm.
EfficientNet-Lite0 runs at {cfg.image_size} px, the small CNN at 28 px.

## Pretrained vs two from-scratch baselines

{head}{row("pretrained")}{row("efficientnet-scratch")}{row("small-cnn")}
{cross}

Pretrained: {cfg.epochs_head} head epoch at lr {cfg.lr_head:g} with the backbone frozen, then the tuned
epochs of everything at the tuned rate; all arms with augmentation on.

### Each model tuned on the validation split; the from-scratch ones shown to learn

Learning rate and epochs (of fine-tuning, for the pretrained network) chosen by validation accuracy
(best epoch of each rate) at {cfg.tune_size:,}
labelled images, seed {cfg.seeds[0]}, on {TUNE_VAL_IMAGES:,} held-out training images; the test set plays no part.

| model | best validation accuracy by learning rate | chosen lr | chosen epochs |
|---|---|---:|---:|
{tuning}
{learned_verdict} Worst seed shown for each figure:

{LEARNED_HEAD}{learned}
## Methods for limited labels, on the {LABELS[method]}

{head}{methods}
Paired by seed (same labelled draw and initialisation), difference in test accuracy:

{head}{paired("no-augmentation", method)}{paired("pseudo-label", method)}{paired("active", method)}
- Augmentation: kornia flips, small affine jitter and random erasing (the main job's), on vs off.
- Pseudo-labelling: the baseline model labels {cfg.unlabelled_pool:,} unlabelled training images; those
  with top-1 probability ≥ {cfg.pseudo_threshold} join the labelled ones for {cfg.pseudo_epochs} more epochs
  from the baseline's weights. Mean per size: {pseudo}.
- Active learning at an equal budget: {cfg.active_initial:.0%} of the labels at random, the rest in
  {cfg.active_rounds} round(s) of the least confident (lowest top-1 probability, the signal the serving
  feedback loop queues) among the unlabelled images, then the baseline's training on the chosen set;
  compared with the baseline, whose labels are all random. Smallest class share of the chosen
  labels (0.100 = balanced), lowest seed: {balance}.

![accuracy vs labelled images](limited_data.png)
"""
    (cfg.output / "limited_data.md").write_text(text)
    (cfg.output / "limited_data.json").write_text(json.dumps(results, indent=2))
    tqdm.write(f"wrote {cfg.output / 'limited_data.md'}")


def plot(cfg: LimitedDataConfig, summary: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = ((axes[0], (*MODELS,), "pretrained vs from scratch"),
              (axes[1], (cfg.method_model, *METHODS), f"methods, {LABELS[cfg.method_model]}"))  # fmt: skip
    for ax, arms, title in panels:
        for arm in arms:
            cells = [summary[arm][s] for s in cfg.sizes]
            label = LABELS[arm] + (" (baseline)" if ax is axes[1] and arm == cfg.method_model else "")
            ax.errorbar(cfg.sizes, [c["mean"] for c in cells], yerr=[c["sd"] for c in cells], fmt="o-",
                        capsize=3, label=label)  # fmt: skip
        ax.set(xscale="log", xlabel="labelled training images", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(ylabel=f"test accuracy (mean ± sd, {len(cfg.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(cfg.output / "limited_data.png", dpi=100)
    plt.close(fig)
