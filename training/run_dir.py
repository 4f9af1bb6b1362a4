"""Run outputs shared by both pipelines: run folder, history/metrics/plots, registration."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from servable.artifact import ModelManifest, default_version, register
from servable.config import TrainCommon
from training import gates
from training.loop import EarlyStopping, EpochLog, history_rows
from training.metrics import plot_confusion, plot_curves
from training.model_card import write_model_card
from training.onnx_tools import library_versions


def make_run_dir(cfg: TrainCommon) -> tuple[str, Path]:
    """runs/<name>/<version>/artifact is the staging folder that becomes the stored model."""
    version = cfg.version or default_version()
    staging = cfg.runs_dir / cfg.name / version / "artifact"
    staging.mkdir(parents=True, exist_ok=True)
    return version, staging


def training_summary(history: list[EpochLog], stopper: EarlyStopping, stopped_early: bool) -> dict:
    return {
        "epochs_run": len(history),
        "monitor": stopper.monitor,
        "best_value": stopper.best_value,
        "best_epoch": list(stopper.best_epoch) if stopper.best_epoch else None,
        "stopped_early": stopped_early,
        "weight_average": stopper.weight_average,
        "seconds": round(sum(h.seconds for h in history), 1),
        # gradient clipping as a safety net: the share of steps it caught, per epoch (0 on a clean run)
        "clipped_fraction_by_epoch": [round(h.clipped_fraction, 4) for h in history],
        "grad_norm_p99_max": max((h.grad_norm_p99 for h in history if math.isfinite(h.grad_norm_p99)), default=None),
    }


def write_outputs(
    staging: Path, history: list[EpochLog], y_true: np.ndarray, y_pred: np.ndarray, labels: list[str],
    metrics: dict,
) -> None:  # fmt: skip
    rows = history_rows(history)
    (staging / "history.json").write_text(json.dumps(rows, indent=2))
    if rows:
        with (staging / "history.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot_curves(rows, staging / "curves.png")
    plot_confusion(y_true, y_pred, labels, staging / "confusion.png")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))


def finish(cfg: TrainCommon, manifest: ModelManifest, staging: Path) -> str | None:
    """Gate the run against the figures its documentation states (training/gates.py), register the staged
    artifact with its model card (unless --register-model false) and say where everything is. A default
    run that misses its figures raises GateFailed and is not registered."""
    manifest.versions.update(library_versions())
    manifest.metrics["gate"] = gate = gates.check(manifest)
    for line in gate["lines"]:
        tqdm.write(line)
    # Before registering, so the card is checksummed and stored with the model; a run that fails its gate
    # or is not registered keeps it beside its other outputs.
    write_model_card(manifest, staging)
    if gate.get("passed") is False:
        raise gates.GateFailed(f"{gates.failure_message(gate)}\nnot registered; the run's outputs: {staging}")
    tag = register(manifest, staging) if cfg.register_model else None
    tqdm.write(f"run outputs: {staging}")
    tqdm.write(f"registered: {tag}" if tag else "not registered (--register-model false)")
    return tag
