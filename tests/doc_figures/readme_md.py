"""Figures of README.md and training.md's whole main job: how long the training loops of the run the model cards
come from took, as the cards record it."""

from __future__ import annotations

import re

from tests.doc_figures.common import Figure
from tests.doc_figures.training_md import IMAGE_CARD, TEXT_CARD


def wall(seconds: float) -> str:
    """A duration as the pages print it: 7 min 25 s (whole seconds, rounded half up), or 41 s."""
    whole_s = int(seconds + 0.5)
    return f"{whole_s // 60} min {whole_s % 60} s" if whole_s >= 60 else f"{whole_s} s"


def loop_s(card: dict) -> float:
    """The card's training loop: `- 3 epochs run in 234.9 s; ...`."""
    return float(re.search(r"^- \d+ epochs run in ([\d.]+) s", card["text"], re.M)[1])


FIGURES = [
    *(Figure(doc, IMAGE_CARD, lambda c: f"took {wall(loop_s(c))} (image", f"image training loop ({doc})")
      for doc in ("README.md", "docs/training.md")),
    *(Figure(doc, TEXT_CARD, lambda c: f"and {wall(loop_s(c))} (text", f"text training loop ({doc})")
      for doc in ("README.md", "docs/training.md")),
]  # fmt: skip
