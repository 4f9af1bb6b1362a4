"""Which queued items go to the labeller: balanced across predicted classes, and the sheet they fill in.

Uncertainty sampling alone (lowest confidence first) asks for labels where the model is least sure, and
those cluster in a few confusable classes: in the limited-data study (docs/training.md) it starved the
rarest class. So `balanced` takes the predicted classes in turn (round-robin, the class with the fewest
candidates first in every round), and within a class by reason (`REASONS`' order: flagged,
shadow-disagree, low-confidence, sampled), then lowest confidence, then oldest. Every class with an
unlabelled item is on the sheet as soon as the count reaches the number of classes.

`write_sheet` writes what a labeller fills in: `labels.csv` with the item's id, reason, predicted label,
confidence, its text (scrubbed) or image file (copied beside the sheet, `images/<id>.png`), and an empty
`label` column. `python -m serving.feedback import-labels labels.csv` applies the filled-in labels (rows
left blank are skipped). No torch, no BentoML.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

from serving.feedback.store import REASONS, FeedbackError, Item

SHEET_FILE = "labels.csv"
SHEET_COLUMNS = ["id", "reason", "predicted_label", "confidence", "created", "text", "image", "label"]


def _priority(item: Item) -> tuple:
    m = item.meta
    reason = REASONS.index(m["reason"]) if m.get("reason") in REASONS else len(REASONS)
    return reason, float(m.get("confidence", 0.0)), float(m.get("created_ts", 0.0))


def balanced(items: list[Item], count: int) -> list[Item]:
    """Up to `count` of the unlabelled `items`, round-robin over their predicted classes."""
    if count < 1:
        raise FeedbackError("the count must be at least 1")
    by_class: dict[str, list[Item]] = {}
    for it in items:
        if not it.meta.get("label"):
            by_class.setdefault(str(it.meta.get("predicted_label")), []).append(it)
    queues = [sorted(by_class[c], key=_priority) for c in sorted(by_class, key=lambda c: (len(by_class[c]), c))]
    chosen: list[Item] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def write_sheet(chosen: list[Item], out: Path) -> Path:
    """The labelling sheet of `chosen` in the new folder `out`: `labels.csv` (+ `images/` for images)."""
    if not chosen:
        raise FeedbackError("no unlabelled items to put on a sheet")
    if out.exists() and any(out.iterdir()):
        raise FeedbackError(f"{out} is not empty; write the sheet into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    with (out / SHEET_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        for it in chosen:
            m, text, image = it.meta, "", ""
            if m["kind"] == "text":
                text = it.content_path.read_text(encoding="utf-8")
            else:
                (out / "images").mkdir(exist_ok=True)
                image = f"images/{m['id']}.png"
                shutil.copyfile(it.content_path, out / image)
            writer.writerow({"id": m["id"], "reason": m.get("reason", ""), "predicted_label": m["predicted_label"],
                             "confidence": m["confidence"], "created": m.get("created", ""), "text": text,
                             "image": image, "label": ""})  # fmt: skip
    return out / SHEET_FILE


def by_class(chosen: list[Item]) -> dict[str, int]:
    """Items per predicted class, for the CLI's summary line."""
    return dict(sorted(Counter(str(it.meta["predicted_label"]) for it in chosen).items()))
