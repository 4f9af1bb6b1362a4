"""The most confident mistakes on the test set, each with its explanation (servable/explain.py, the same
occlusion code the served explain routes use, on the exported ONNX model).

Written with every run (`gallery.png` / `gallery.md` and `gallery.json` next to the model), and for a
registered model without retraining (training/review.py): `python -m training gallery --model-tag fashion-cnn:latest`.
Each mistake is explained toward the class the model wrongly chose: what made it answer that.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from servable import explain
from servable.preprocessing import ImagePreprocessing, TextPreprocessing, encode_texts, normalize


def confident_mistakes(probs: np.ndarray, y_true: np.ndarray, n: int) -> list[int]:
    """Indices of wrong answers, the most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    return [int(i) for i in wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]]


def _logits(session) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda feeds: session.run(["logits"], feeds)[0]


def image_gallery(session, prep: ImagePreprocessing, test_x: np.ndarray, test_y: np.ndarray, probs: np.ndarray,
                  labels: Sequence[str], out: Path, n: int = 8, grid: int = 8,
                  occlusion: explain.Occlusion | None = None) -> list[dict]:  # fmt: skip
    """`gallery.png` (image, heatmap over it, true and predicted class) and `gallery.json`."""
    run = _logits(session)
    fill = explain.normalised_fill(occlusion, prep)
    entries, overlays = [], []
    for i in confident_mistakes(probs, test_y, n):
        pred = int(probs[i].argmax())
        batch = explain.occluded_images(normalize(test_x[i], prep), grid, fill)
        heat = explain.image_heatmap(explain.probabilities(run({prep.input_name: batch})), pred, grid)
        big = Image.fromarray(test_x[i]).resize((4 * test_x.shape[2], 4 * test_x.shape[1]), Image.Resampling.NEAREST)
        png, _ = explain.overlay_png(big, heat)
        overlays.append((big, png))
        entries.append({"test_index": i, "true": labels[int(test_y[i])], "predicted": labels[pred],
                        "confidence": round(float(probs[i, pred]), 4), "grid": grid,
                        "heatmap": np.round(heat.astype(np.float64), 4).tolist()})  # fmt: skip
    if entries:
        fig, axes = plt.subplots(2, len(entries), figsize=(1.9 * len(entries), 4.4), squeeze=False)
        for k, (entry, (big, png)) in enumerate(zip(entries, overlays, strict=True)):
            axes[0, k].imshow(big)
            axes[0, k].set_title(f"true: {entry['true']}\npredicted: {entry['predicted']}\n"
                                 f"({entry['confidence']:.2f})", fontsize=8)  # fmt: skip
            axes[1, k].imshow(Image.open(io.BytesIO(png)))
            for ax in axes[:, k]:
                ax.set_axis_off()
        fig.suptitle("Most confident test mistakes; below: occlusion map toward the predicted class "
                     "(red: supports it, blue: against)", fontsize=9)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / "gallery.png", dpi=100)
        plt.close(fig)
    (out / "gallery.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def _marked(words: list[explain.Word], scores: np.ndarray, top: int = 3) -> str:
    """The text with each word's score; the `top` words that pushed most toward the answer in bold."""
    strongest = set(np.argsort(-scores)[:top].tolist())
    parts = []
    for k, (w, s) in enumerate(zip(words, scores, strict=True)):
        word = w.text.replace("|", "\\|").replace("*", "\\*")
        parts.append(f"**{word}**<sub>{s:+.2f}</sub>" if k in strongest and s > 0 else f"{word}<sub>{s:+.2f}</sub>")
    return " ".join(parts)


def text_gallery(session, tokenizer, prep: TextPreprocessing, rows: Sequence[tuple[str, int]], probs: np.ndarray,
                 labels: Sequence[str], out: Path, n: int = 10, max_words: int = 128,
                 occlusion: explain.Occlusion | None = None) -> list[dict]:  # fmt: skip
    """`gallery.md` (each word with its score toward the wrongly predicted class) and `gallery.json`."""
    run = _logits(session)
    y = np.array([label for _, label in rows])
    entries, lines = [], []
    for i in confident_mistakes(probs, y, n):
        text, pred = rows[i][0], int(probs[i].argmax())
        found = explain.words(text)[:max_words]
        variants = explain.texts_without_each_word(text, found, occlusion.token if occlusion else None)
        scored = np.concatenate([run(encode_texts(tokenizer, variants[j : j + 64], prep))
                                 for j in range(0, len(variants), 64)])  # fmt: skip
        scores = explain.word_scores(explain.probabilities(scored), pred, log_odds=True)
        entries.append({"test_index": i, "text": text, "true": labels[int(y[i])], "predicted": labels[pred],
                        "confidence": round(float(probs[i, pred]), 4),
                        "words": [{"word": w.text, "score": round(float(s), 4)}
                                  for w, s in zip(found, scores, strict=True)]})  # fmt: skip
        lines.append(f"| {labels[int(y[i])]} | {labels[pred]} ({probs[i, pred]:.2f}) | {_marked(found, scores)} |")
    header = ["# Most confident test mistakes, with word occlusion scores", "",
              "Each word's score is how much the log-odds of the predicted (wrong) class drop with it masked "
              "(log-odds rather than probability: these answers are 0.99+ confident, where one word moves the "
              "probability by little): positive words pushed the model toward its mistake; the three "
              "strongest are in bold.", "",
              "| true | predicted (confidence) | text, word scores |", "|---|---|---|"]  # fmt: skip
    (out / "gallery.md").write_text("\n".join(header + lines) + "\n")
    (out / "gallery.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries
