"""A registered model looked at again without retraining: its confusion matrix with per-class figures and
the gallery of its most confident test mistakes (`python -m training gallery --model-tag fashion-cnn:latest`).

Kept apart from training/gallery.py, which both pipelines import to write a run's gallery: this module
imports the pipelines to rebuild the test split, so the dependency runs one way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from servable import artifact, explain
from servable.config import ImageTrainConfig, TextTrainConfig
from servable.preprocessing import load_tokenizer
from training import image_pipeline, text_pipeline
from training.gallery import image_gallery, text_gallery
from training.metrics import classification_report, per_class_markdown, plot_confusion
from training.onnx_tools import cpu_session


def for_registered(tag: str, out: Path, n: int) -> dict:
    """Confusion matrix with per-class figures and the gallery of a registered model, without retraining:
    the test split is rebuilt from the artifact's recorded training config, scored by its fp32 ONNX file."""
    art = artifact.load(tag)
    m = art.manifest
    session = cpu_session(art.onnx_path("fp32"))
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in m.training_config.items() if k not in ("version", "runs_dir")}
    if m.task == "image-classification":
        cfg = ImageTrainConfig(**{**fields, "progress": False})
        splits = image_pipeline.load_splits(cfg, m.image_preprocessing)
        y = splits.test_y
        probs = explain.probabilities(image_pipeline.onnx_predict(session, splits.test_x, m.image_preprocessing))
        entries = image_gallery(session, m.image_preprocessing, splits.test_x, y, probs, m.labels, out, n=n)
    else:
        cfg = TextTrainConfig(**{**fields, "progress": False})
        splits = text_pipeline.load_splits(cfg)
        prep = m.text_preprocessing
        tok = load_tokenizer(art.file(prep.tokenizer_file), prep)
        y = np.array([label for _, label in splits.test])
        probs = explain.probabilities(text_pipeline.onnx_predict(session, tok, splits.test, prep))
        entries = text_gallery(session, tok, prep, splits.test, probs, m.labels, out, n=n)
    report = classification_report(y, probs.argmax(1), m.labels)
    plot_confusion(y, probs.argmax(1), m.labels, out / "confusion.png")
    (out / "per_class.md").write_text(per_class_markdown(report))
    summary = {"model": art.tag, "test_examples": len(y), "accuracy": report["accuracy"],
               "recorded_accuracy": m.metrics["test"]["fp32"]["accuracy"], "mistakes_shown": len(entries),
               "command": f"python -m training gallery --model-tag {tag} --out {out}"}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
