"""A registered model looked at again without retraining: its confusion matrix with per-class figures and
the gallery of its most confident test mistakes (`python -m training gallery --model-tag fashion-cnn:latest`).

Kept apart from training/gallery.py, which the pipelines import to write a run's gallery: this module has
the model's pipeline (its entry in training/tasks.py) rebuild the test split, so the dependency runs one way.
"""

from __future__ import annotations

import json
from pathlib import Path

from servable import artifact
from training.metrics import classification_report, per_class_markdown, plot_confusion
from training.onnx_tools import cpu_session
from training.tasks import for_task


def for_registered(tag: str, out: Path, n: int) -> dict:
    """Confusion matrix with per-class figures and the gallery of a registered model, without retraining:
    the test split is rebuilt from the artifact's recorded training config, scored by its fp32 ONNX file."""
    art = artifact.load(tag)
    m = art.manifest
    task = for_task(m.task)
    session = cpu_session(art.onnx_path("fp32"))
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in m.training_config.items() if k not in ("version", "runs_dir")}
    cfg = task.config(**{**fields, "progress": False})
    y, probs, entries = task.review(cfg, art, session, out, n)
    report = classification_report(y, probs.argmax(1), m.labels)
    plot_confusion(y, probs.argmax(1), m.labels, out / "confusion.png")
    (out / "per_class.md").write_text(per_class_markdown(report))
    summary = {"model": art.tag, "test_examples": len(y), "accuracy": report["accuracy"],
               "recorded_accuracy": m.metrics["test"]["fp32"]["accuracy"], "mistakes_shown": len(entries),
               "command": f"python -m training gallery --model-tag {tag} --out {out}"}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
