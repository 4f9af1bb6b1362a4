"""The text domain-transfer study: how many labels does a new domain need?

For each studied domain D, held out in turn: a base model is trained on the other bundled domains (the
project's own fine-tuning, training/text_pipeline.py::fine_tune, on a shortened recipe: `base_limit`
sentences, `epochs_finetune` epochs), once per seed, and cached. D's own sentences are split like every
domain's (stratified by label, the study's `seed`): a pool of candidates to label, a validation split and
a test split. Each cell then adds k labelled sentences of D's pool to the base model, chosen

- at random, or
- as the labelling loop chooses them (serving/feedback/selection.py::balanced): the base model scores
  the pool, and the least confident are taken in turn from each predicted class;

and fine-tunes the base model briefly on them plus a replay sample of its own training sentences (so it
does not forget the domains it knew; the base's domains' test accuracy is recorded to show it). The
epochs kept are chosen on D's validation split; the test split plays no part in any choice. k = 0 is
the base model itself. Progress is saved after every cell (resumable), and the JSON, Markdown and plot
are rewritten after every cell, naming the cells still missing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from servable.config import DomainStudyConfig
from servable.files import write_atomically
from servable.machine import describe_machine
from serving.feedback.selection import balanced
from serving.feedback.store import Item
from training import cell_pool
from training.data_text import BUNDLED_DOMAINS, Row, TextSplits, load_bundled, stratified_split
from training.metrics import by_domain
from training.runtime import prepare_process
from training.text_pipeline import fine_tune, text_batches

ARMS = ("random", "active")
LABELS = {"random": "chosen at random", "active": "chosen by the labelling loop (balanced uncertainty)"}
TEST_FRACTION = 0.15  # load_bundled's: D's test split is cut as any domain's is
SEPARATOR = "|"


@dataclass
class DomainData:
    """One studied domain: the base model's data (the other domains) and the domain's own split."""

    domain: str
    base: TextSplits  # train/val (capped) of the other domains; test: a sample of theirs (forgetting)
    pool: list[Row]  # candidates to label (training split of the domain, capped)
    val: list[Row]
    test: list[Row]


def load_domain(cfg: DomainStudyConfig, domain: str) -> DomainData:
    others = [d for d in BUNDLED_DOMAINS if d != domain]
    base = load_bundled(cfg.datasets_dir, cfg.seed, cfg.val_fraction, domains=others, held_out=domain)
    rows = [(t, y, domain) for t, y in base.ood_test]
    pool, val, test = stratified_split(rows, cfg.seed, cfg.val_fraction, TEST_FRACTION)
    if cfg.base_limit:  # the splits are shuffled: a prefix keeps the mix of domains and labels
        base.truncate("train", cfg.base_limit)
    base.truncate("val", cfg.base_val_limit)
    base.truncate("test", cfg.forgetting_limit)
    base.truncate("ood_test", 0)
    strip = lambda rs: [(r[0], r[1]) for r in rs]  # noqa: E731
    return DomainData(domain, base, strip(pool[: cfg.candidate_pool]), strip(val[: cfg.adapt_val_limit]),
                      strip(test[: cfg.test_limit] if cfg.test_limit else test))  # fmt: skip


def splits_of(labels: list[str], train: list[Row], val: list[Row], train_domains: list[str], domain: str) -> TextSplits:
    return TextSplits(labels=labels, train=train, val=val, test=[],
                      domains={"train": train_domains, "val": [domain] * len(val), "test": []})  # fmt: skip


@torch.no_grad()
def predict_proba(model, tokenizer, rows: list[Row], max_length: int) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(**enc).logits, -1) for enc, _ in text_batches(rows, tokenizer, max_length, 128)]
    return torch.cat(out).numpy() if out else np.zeros((0, 2))


def loop_selection(probs: np.ndarray, labels: list[str], k: int) -> np.ndarray:
    """Positions of the k pool sentences the labelling loop would put on its sheet: each scored by the base
    model as a served prediction is (predicted label, top-1 confidence), then serving/feedback's `balanced`."""
    items = [Item(meta={"id": str(i), "predicted_label": labels[int(p.argmax())], "confidence": float(p.max()),
                        "reason": "low-confidence", "created_ts": float(i)}, path=Path(f"{i}.json"))
             for i, p in enumerate(probs)]  # fmt: skip
    return np.array([int(it.meta["id"]) for it in balanced(items, k)], dtype=int) if k else np.zeros(0, int)


def random_selection(n: int, k: int, seed: int, domain: str) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(n)[:k]


def choose(arm: str, probs: np.ndarray, labels: list[str], k: int, seed: int, domain: str) -> np.ndarray:
    return loop_selection(probs, labels, k) if arm == "active" else random_selection(len(probs), k, seed, domain)


def base_dir(cfg: DomainStudyConfig, domain: str, seed: int) -> Path:
    return cfg.runs_dir / "domain_study" / "base" / f"{domain}-seed{seed}"


def train_base(cfg: DomainStudyConfig, data: DomainData, seed: int) -> dict:
    """The base model of `data.domain` at `seed`, trained once and kept under runs_dir (with its scores of the
    candidate pool); a second call reads it back."""
    out = base_dir(cfg, data.domain, seed)
    if (out / "base.json").is_file():
        cached = json.loads((out / "base.json").read_text())
        if cached["config"] == resume_key(cfg):  # else trained under other settings: train again
            return cached
    start = time.perf_counter()
    trained = sorted(set(data.base.domains["train"]))
    run_cfg = cfg.model_copy(update={"seed": seed, "held_out": data.domain, "domains": trained})
    tokenizer, model, history, *_ = fine_tune(run_cfg, data.base)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "config": resume_key(cfg), "seconds": round(time.perf_counter() - start, 1),
        "train_sentences": len(data.base.train), "epochs_run": len(history),
        "best_val_acc": max(h.val_acc for h in history),
        "pool_probs": predict_proba(model, tokenizer, data.pool, cfg.max_length).round(6).tolist(),
    }  # fmt: skip
    (out / "base.json").write_text(json.dumps(record))
    return record


def adapt(cfg: DomainStudyConfig, data: DomainData, seed: int, chosen: np.ndarray, k: int):
    """The base model fine-tuned on the `chosen` pool sentences plus round(replay × k) of its own training
    sentences; at least `adapt_epochs` epochs and `adapt_min_steps` steps, the epoch with the best validation
    accuracy on the new domain kept."""
    new = [data.pool[i] for i in chosen]
    n_replay = min(round(cfg.replay * k), len(data.base.train))
    pick = np.random.default_rng([seed, k, zlib.crc32(data.domain.encode())]).choice(len(data.base.train), n_replay,
                                                                                       replace=False)  # fmt: skip
    train = new + [data.base.train[i] for i in pick]
    doms = [data.domain] * len(new) + [data.base.domains["train"][i] for i in pick]
    steps_per_epoch = math.ceil(len(train) / cfg.adapt_batch_size)
    epochs = max(cfg.adapt_epochs, math.ceil(cfg.adapt_min_steps / steps_per_epoch))
    run_cfg = cfg.model_copy(update={
        "seed": seed, "backbone": str(base_dir(cfg, data.domain, seed)), "epochs_head": 0, "epochs_finetune": epochs,
        "lr_finetune": cfg.adapt_lr, "batch_size": cfg.adapt_batch_size, "patience": epochs, "monitor": "val_acc",
        "average_last": 0,
    })  # fmt: skip
    splits = splits_of(data.base.labels, train, data.val, doms, data.domain)
    tokenizer, model, history, stopper, *_ = fine_tune(run_cfg, splits)
    best = stopper.best_epoch[1] if stopper.best_epoch else 0
    return tokenizer, model, {"epochs_run": len(history), "best_epoch": best, "replayed": n_replay}


def score(cfg: DomainStudyConfig, data: DomainData, tokenizer, model) -> dict:
    """Accuracy and the two kinds of error on the new domain's test split; accuracy on the base's domains."""
    y = np.array([lab for _, lab in data.test])
    pred = predict_proba(model, tokenizer, data.test, cfg.max_length).argmax(1)
    errors = by_domain(y, pred, [data.domain] * len(y), data.base.labels, in_domain=False)[data.domain]
    yb = np.array([lab for _, lab in data.base.test])
    base_pred = predict_proba(model, tokenizer, data.base.test, cfg.max_length).argmax(1)
    return {"accuracy": float((pred == y).mean()), "false_positive": errors["false_positive"],
            "false_negative": errors["false_negative"],
            "base_domains_accuracy": float((base_pred == yb).mean())}  # fmt: skip


def cell_key(domain: str, seed: int, arm: str, k: int) -> str:
    return SEPARATOR.join((domain, str(seed), arm if k else "base", str(k)))


def all_cells(cfg: DomainStudyConfig) -> list[tuple[str, int, str, int]]:
    """Every (domain, seed, arm, k) of the study, seed by seed (a stopped run has whole seeds of every domain);
    k = 0 once per domain and seed (arm "base")."""
    return [(d, s, a, k) for s in cfg.seeds for d in cfg.held_out_domains for k in cfg.labels_added
            for a in (ARMS if k else ("base",))]  # fmt: skip


def run_cell(cfg: DomainStudyConfig, data: DomainData, base: dict, seed: int, arm: str, k: int) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    start = time.perf_counter()
    if k == 0:
        path = base_dir(cfg, data.domain, seed)
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
        extra: dict = {}
        chosen = np.zeros(0, int)
    else:
        chosen = choose(arm, np.array(base["pool_probs"]), data.base.labels, k, seed, data.domain)
        tokenizer, model, extra = adapt(cfg, data, seed, chosen, k)
    labels = np.array([data.pool[i][1] for i in chosen], dtype=int)
    return {"domain": data.domain, "seed": seed, "arm": arm, "k": k, **score(cfg, data, tokenizer, model), **extra,
            "chosen_positive_share": float(labels.mean()) if len(labels) else None,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


# Settings that do not change a result: a stopped study resumes under other values of these.
RESUME_IGNORES = ("output", "runs_dir", "num_threads", "progress", "device", "pause_file", "held_out_domains",
                  "labels_added", "seeds")  # fmt: skip


def resume_key(cfg: DomainStudyConfig) -> dict:
    """The settings saved cells must share to be reused: a cell's own domain, seed and k are in its key, so a
    run with more (or fewer) of them keeps the cells it shares with an earlier one."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_IGNORES}


def progress_path(cfg: DomainStudyConfig) -> Path:
    return cfg.runs_dir / "domain_study" / "progress.json"


def load_progress(cfg: DomainStudyConfig) -> dict:
    path = progress_path(cfg)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["config"] == resume_key(cfg):
            return saved
        tqdm.write(f"{path} is from another configuration of the study: starting afresh")
    return {"config": resume_key(cfg), "cells": {}, "bases": {}, "sizes": {}, "seconds": 0.0}


def save_progress(cfg: DomainStudyConfig, progress: dict) -> None:
    path = progress_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(progress).encode())  # a run stopped mid-write keeps the previous state


def wait_while_paused(cfg: DomainStudyConfig) -> None:
    while cfg.pause_file is not None and cfg.pause_file.exists():
        time.sleep(20)


def run_study(cfg: DomainStudyConfig) -> dict:
    """The whole study, cell by cell; a stopped run started again with the same settings skips the done cells
    (and the cached bases). With `jobs` > 1 the cells run side by side in worker processes (cell_pool.py): a
    seed's base cells (k = 0, which train the bases) first, then its adaptations once their base is there,
    the largest k first."""
    jobs, threads = cell_pool.job_shape(cfg.jobs, cfg.num_threads)
    cfg.output.mkdir(parents=True, exist_ok=True)
    progress = load_progress(cfg)
    if progress["cells"]:
        tqdm.write(f"resuming from {progress_path(cfg)}: {len(progress['cells'])} cells done")
    started, earlier = time.perf_counter(), progress["seconds"]
    progress.setdefault("command", command_line(cfg))  # the first start's: a resumed run reports what began it
    todo = [c for c in all_cells(cfg) if cell_key(*c) not in progress["cells"]]

    def done(cell: tuple[str, int, str, int], record: dict) -> None:
        domain, seed = cell[0], cell[1]
        progress["sizes"][domain] = record.pop("sizes")
        progress["bases"][f"{domain}{SEPARATOR}{seed}"] = record.pop("base")
        progress["cells"][cell_key(*cell)] = record
        progress["seconds"] = round(earlier + time.perf_counter() - started, 1)
        save_progress(cfg, progress)
        write_report(cfg, results_of(cfg, progress))

    if jobs == 1:
        _start_worker(cfg.model_copy(update={"num_threads": threads}))  # this process is the worker
        for cell in todo:
            tqdm.write(f"== {name(cell)}")
            done(cell, _worker_cell(*cell))
    elif todo:
        # the plain config class: a subclass (the CLI's command) lives in a __main__ the workers do not import
        worker_cfg = DomainStudyConfig.model_construct(**{**cfg.model_dump(), "num_threads": threads, "jobs": 1,
                                                           "progress": False})  # fmt: skip
        cell_pool.run_in_workers(start_order(todo), jobs, _start_worker, (worker_cfg,), _worker_cell,
                                 lambda cell, running: ready(cell, progress["bases"]), done, name)  # fmt: skip
    results = results_of(cfg, progress)
    write_report(cfg, results)
    return results


def ready(cell: tuple[str, int, str, int], bases: dict) -> bool:
    """A base cell (k = 0) trains its base; an adaptation starts from it, so it waits until the base is done."""
    domain, seed, _, k = cell
    return k == 0 or f"{domain}{SEPARATOR}{seed}" in bases


def start_order(todo: list[tuple[str, int, str, int]]) -> list[tuple[str, int, str, int]]:
    """Seed by seed (a stopped run still has whole seeds), each seed's bases first, then the largest k first: the
    dearest cells are not left to run alone at the end while the other workers sit idle."""
    return sorted(todo, key=lambda c: (c[1], c[3] != 0, -c[3]))  # stable: the study's order otherwise


def name(cell: tuple[str, int, str, int]) -> str:
    domain, seed, arm, k = cell
    return f"{domain} held out, seed {seed}: {arm}, k = {k}"


_WORKER: dict = {}  # a worker process's settings and the domains' data it has loaded


def _start_worker(cfg: DomainStudyConfig) -> None:
    prepare_process(cfg.num_threads)
    _WORKER.clear()
    _WORKER["cfg"] = cfg


def _worker_cell(domain: str, seed: int, arm: str, k: int) -> dict:
    """One cell, with its base model (trained here when not cached) and its domain's sizes for the report."""
    cfg = _WORKER["cfg"]
    wait_while_paused(cfg)
    if domain not in _WORKER:
        _WORKER[domain] = load_domain(cfg, domain)
    data = _WORKER[domain]
    base = train_base(cfg, data, seed)
    record = run_cell(cfg, data, base, seed, arm, k)
    return {**record, "base": {key: v for key, v in base.items() if key not in ("pool_probs", "config")},
            "sizes": sizes_of(data)}  # fmt: skip


def sizes_of(d: DomainData) -> dict:
    return {"pool": len(d.pool), "val": len(d.val), "test": len(d.test), "base_train": len(d.base.train),
            "base_test": len(d.base.test)}  # fmt: skip


def results_of(cfg: DomainStudyConfig, progress: dict) -> dict:
    wanted = [cell_key(*c) for c in all_cells(cfg)]
    cells = [progress["cells"][key] for key in wanted if key in progress["cells"]]
    return {
        "config": cfg.model_dump(mode="json"), "machine": describe_machine(),
        "command": progress.get("command") or command_line(cfg),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "minutes": round(progress["seconds"] / 60, 1),
        "load_average": [round(x, 1) for x in os.getloadavg()],  # a shared machine stretches the minutes
        "sizes": progress["sizes"],
        "bases": progress["bases"], "cells": cells, "missing": [key for key in wanted if key not in progress["cells"]],
        "summary": summarize(cells),
    }  # fmt: skip


def summarize(cells: list[dict]) -> dict:
    """{domain: {arm: {k: mean, sd, n and the base domains' mean accuracy}}}; k = 0 under every arm."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        for arm in ARMS if c["k"] == 0 else (c["arm"],):
            groups.setdefault((c["domain"], arm, c["k"]), []).append(c)
    out: dict = {}
    for (domain, arm, k), group in sorted(groups.items()):
        acc = np.array([c["accuracy"] for c in group])
        out.setdefault(domain, {}).setdefault(arm, {})[str(k)] = {
            "mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "n": len(acc),
            "base_domains_mean": float(np.mean([c["base_domains_accuracy"] for c in group])),
            "false_negative_mean": float(np.mean([c["false_negative"] for c in group])),
            "false_positive_mean": float(np.mean([c["false_positive"] for c in group])),
        }  # fmt: skip
    return out


def command_line(cfg: DomainStudyConfig) -> str:
    """The command that reproduces this run: as typed, or the settings that differ from the defaults."""
    if sys.argv[0].endswith("__main__.py"):
        return "python -m training " + " ".join(sys.argv[1:])
    default, ours = DomainStudyConfig().model_dump(mode="json"), cfg.model_dump(mode="json")
    flags = [f"--{k.replace('_', '-')} '{v if isinstance(v, str) else json.dumps(v)}'"
             for k, v in ours.items() if v != default[k]]  # fmt: skip
    return " ".join(["python -m training domain-study", *flags])


def fmt(cell: dict | None) -> str:
    return "—" if cell is None else f"{cell['mean']:.3f} ± {cell['sd']:.3f} (n={cell['n']})"


def write_report(cfg: DomainStudyConfig, results: dict) -> None:
    summary, ks = results["summary"], cfg.labels_added
    head = "| arm | " + " | ".join(f"k = {k:,}" for k in ks) + " |\n|---|" + "---:|" * len(ks) + "\n"
    sections = []
    for domain in cfg.held_out_domains:
        by_arm = summary.get(domain, {})
        rows = "".join(f"| {LABELS[arm]} | " + " | ".join(fmt(by_arm.get(arm, {}).get(str(k))) for k in ks) + " |\n"
                       for arm in ARMS)  # fmt: skip
        paired = []
        for k in ks[1:] if ks and ks[0] == 0 else ks:
            by_seed = {a: {c["seed"]: c["accuracy"] for c in results["cells"]
                           if c["domain"] == domain and c["arm"] == a and c["k"] == k} for a in ARMS}  # fmt: skip
            seeds = sorted(set(by_seed["random"]) & set(by_seed["active"]))
            d = np.array([by_seed["active"][s] - by_seed["random"][s] for s in seeds])
            paired.append(f"k = {k:,}: {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f} (n={len(d)})"
                          if len(d) else f"k = {k:,}: —")  # fmt: skip
        forget = "; ".join(f"{LABELS[arm].split(' (')[0]}, k = {k}: {c['base_domains_mean']:.3f}"
                           for arm in ARMS for k, c in by_arm.get(arm, {}).items())  # fmt: skip
        errors = "; ".join(f"k = {k}: {c['false_negative_mean']:.1f} positives called negative, "
                           f"{c['false_positive_mean']:.1f} negatives called positive"
                           for k, c in by_arm.get("random", {}).items())  # fmt: skip
        size = results["sizes"].get(domain, {})
        sections.append(f"""## {domain} held out

Base model: the other domains ({size.get("base_train", "?")} training sentences); {domain}'s own split:
{size.get("pool", "?")} candidates to label, {size.get("val", "?")} validation, {size.get("test", "?")} test
sentences. Test accuracy on {domain} (mean ± sample sd over seeds):

{head}{rows}
Active − random, paired by seed: {"; ".join(paired)}.

Accuracy on the base's own domains (a sample of their test splits, mean over seeds), which replay is
there to keep: {forget or "—"}.

Errors on {domain}'s test split, random arm (mean over seeds): {errors or "—"}.
""")
    missing = results["missing"]
    base_s = [b["seconds"] for b in results["bases"].values()]
    cell_s = [c["seconds"] for c in results["cells"] if c["k"]]
    cost = (f"Cost: a base model {np.mean(base_s) / 60:.1f} min on average, an adaptation cell "
            f"{np.mean(cell_s) / 60:.1f} min (k = 0 cells only score)." if base_s and cell_s else "")  # fmt: skip
    text = f"""# Text: how many labels does a new domain need?

Command: `{results["command"]}` ({results["minutes"]} min)
Machine: {results["machine"]}; {results["date"]} (load average {", ".join(map(str, results["load_average"]))}
at the end: the minutes stretch with other work on the machine). Results: domain_study.json.
{"All cells done." if not missing else f"**{len(missing)} cells missing**: {', '.join(missing)}."} {cost}

For each domain, held out of a base model trained on the other bundled domains ({cfg.base_limit or "all"}
training sentences, epochs: {cfg.epochs_finetune} of the text recipe at lr {cfg.lr_finetune:g}, one base per
seed: {", ".join(map(str, cfg.seeds))}), k labelled sentences of the domain are added, chosen at random or
as the labelling loop chooses them (balanced across predicted classes, least confident first, from the
base model's scores of {cfg.candidate_pool:,} candidates), and the base is fine-tuned on them plus
{cfg.replay:g} × k replayed sentences of its own training data at lr {cfg.adapt_lr:g}, batch
{cfg.adapt_batch_size}, for at least {cfg.adapt_min_steps} steps (and epochs: {cfg.adapt_epochs}), keeping the epoch
with the best accuracy on the domain's validation split. The test split plays no part in any choice.

{"".join(sections)}
![accuracy vs labels added](domain_study.png)
"""
    (cfg.output / "domain_study.md").write_text(text)
    (cfg.output / "domain_study.json").write_text(json.dumps(results, indent=2))
    plot(cfg, summary)


def plot(cfg: DomainStudyConfig, summary: dict) -> None:
    domains = cfg.held_out_domains
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    pos = np.arange(len(cfg.labels_added))
    for ax, domain in zip(axes[0], domains, strict=True):
        for arm in ARMS:
            cells = [summary.get(domain, {}).get(arm, {}).get(str(k)) for k in cfg.labels_added]
            have = [i for i, c in enumerate(cells) if c]
            ax.errorbar(pos[have], [cells[i]["mean"] for i in have], yerr=[cells[i]["sd"] for i in have],
                        fmt="o-", capsize=3, label=LABELS[arm])  # fmt: skip
        ax.set(xticks=pos, xticklabels=[f"{k:,}" for k in cfg.labels_added],
               xlabel=f"labelled {domain} sentences added", title=f"{domain} held out",
               ylabel=f"{domain} test accuracy (mean ± sd)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cfg.output / "domain_study.png", dpi=100)
    plt.close(fig)
