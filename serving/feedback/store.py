"""The labelling queue on disk: one folder per model, each item a content file and a JSON sidecar.

`<dir>/<model>/<id>.png|.txt` + `<id>.json` (id, model, model tag, kind, predicted label,
confidence, created time, reason, label=null, PII counts). The id is random: it is not the
request id and maps to no caller; API keys, key names, request ids and client addresses are
never written here. Texts are PII-scrubbed before they are written; images are re-encoded to PNG
from their decoded pixels, which drops EXIF and other metadata (camera, GPS position).
Items older than `retention_days` (by their recorded creation time) are deleted by `purge`.
Size is bounded twice: no item over `max_item_bytes` is written (`add`), and writers keep the whole
folder under `max_bytes` (`usage` + `add(room=...)`), so an opted-in flood cannot fill the volume.
No torch, no BentoML: the CLI (`python -m serving.feedback`) imports only this.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from servable.config import FeedbackSettings
from servable.files import write_atomically
from serving.feedback.pii import scrub

# Why an item was queued (its sidecar's `reason`). In this order the labelling sheet takes them within a
# predicted class (serving/feedback/selection.py): a caller's flag first, sampled items last.
FLAGGED, SHADOW_DISAGREE, LOW_CONFIDENCE, SAMPLED = "flagged", "shadow-disagree", "low-confidence", "sampled"
REASONS = (FLAGGED, SHADOW_DISAGREE, LOW_CONFIDENCE, SAMPLED)
PROVENANCE_FILE = "feedback_provenance.json"
TEXT_EXPORT_FILE = "feedback.csv"
SUFFIX = {"image": ".png", "text": ".txt"}


class FeedbackError(ValueError):
    """A queue operation cannot be done; the message says why."""


class Dropped(FeedbackError):
    """An item the queue's bounds refuse; `outcome` is its metric label (too_large, bytes_full)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def safe_dir_name(label: str) -> str:
    """A class-folder name for a label (`T-shirt/top` -> `T-shirt_top`)."""
    name = re.sub(r"[^\w.+-]+", "_", label).strip("._") or "_"
    return name


def png_from_image_bytes(blob: bytes, max_pixels: int = 25_000_000, size: int | None = None) -> bytes:
    """Re-encode from decoded pixels: no original container, no EXIF/XMP/ICC metadata survives.
    `size` (the model's input side): shrunk to fit size x size, aspect kept, so a 25 Mpx upload is
    stored at the resolution the model saw, not as a ~100 MB PNG."""
    from PIL import Image

    from servable.preprocessing import decode_image

    img = decode_image(blob, max_pixels=max_pixels)
    img = img.convert("L" if img.mode in ("1", "L") else "RGBA" if "A" in img.getbands() else "RGB")
    if size:
        img.thumbnail((size, size), Image.Resampling.BILINEAR)  # only ever shrinks
    clean = Image.frombytes(img.mode, img.size, img.tobytes())  # pixels only: no info dict carried over
    buf = io.BytesIO()
    clean.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Item:
    meta: dict
    path: Path  # the sidecar
    size: int = 0  # bytes written (content + sidecar), known for items just added

    @property
    def content_path(self) -> Path:
        return self.path.with_suffix(SUFFIX[self.meta["kind"]])


class FeedbackStore:
    def __init__(self, settings: FeedbackSettings | None = None) -> None:
        self.settings = settings or FeedbackSettings()
        self.root = self.settings.dir

    # ---------------------------------------------------------------- writing (service side)

    def model_dir(self, model: str) -> Path:
        if not model or safe_dir_name(model) != model:
            raise FeedbackError(f"unusable model name {model!r}")
        return self.root / model

    def add(self, *, model: str, model_tag: str, kind: str, content: bytes | str, predicted_label: str,
            confidence: float, reason: str, now: float | None = None, room: int | None = None) -> Item:  # fmt: skip
        """Store one item. Text is scrubbed here, so no caller can write raw text by mistake. Raises `Dropped`
        when the item is over `max_item_bytes`, or its files would not fit in `room` bytes (the budget left)."""
        if kind not in SUFFIX:
            raise FeedbackError(f"unknown kind {kind!r}")
        if reason not in REASONS:
            raise FeedbackError(f"unknown reason {reason!r}; one of {', '.join(REASONS)}")
        now = time.time() if now is None else now
        pii: dict[str, int] = {}
        if kind == "text":
            if not isinstance(content, str):
                raise FeedbackError("text content must be a str")
            content, pii = scrub(content)
            data = content.encode("utf-8")
        else:
            if not isinstance(content, bytes):
                raise FeedbackError("image content must be PNG bytes")
            data = content
        if len(data) > self.settings.max_item_bytes:
            raise Dropped("too_large", f"item of {len(data)} bytes over the cap {self.settings.max_item_bytes}")
        folder = self.model_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        item_id = uuid.uuid4().hex
        meta = {
            "id": item_id, "model": model, "model_tag": model_tag, "kind": kind,
            "predicted_label": predicted_label, "confidence": round(float(confidence), 6), "reason": reason,
            "created": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), "created_ts": now,
            "label": None, "labelled_at": None, "pii_redacted": pii,
        }  # fmt: skip
        sidecar, meta_bytes = folder / f"{item_id}.json", json.dumps(meta, indent=1).encode()
        if room is not None and len(data) + len(meta_bytes) > room:
            raise Dropped("bytes_full", f"the queue's byte budget ({self.settings.max_bytes}) is full")
        write_atomically(sidecar.with_suffix(SUFFIX[kind]), data)
        write_atomically(sidecar, meta_bytes)  # last: its presence means complete
        return Item(meta, sidecar, len(data) + len(meta_bytes))

    # ---------------------------------------------------------------- reading

    def items(self, model: str | None = None) -> list[Item]:
        folders = [self.model_dir(model)] if model else sorted(p for p in self.root.glob("*") if p.is_dir())
        out = []
        for folder in folders:
            for sidecar in sorted(folder.glob("*.json")):
                try:
                    out.append(Item(json.loads(sidecar.read_text()), sidecar))
                except (OSError, ValueError):
                    continue  # being deleted by a purge, or damaged: not an item
        return sorted(out, key=lambda it: it.meta.get("created_ts", 0))

    def count(self, model: str) -> int:
        folder = self.model_dir(model)
        return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0

    def usage(self, model: str) -> tuple[int, int]:
        """(items of `model`, bytes of the whole queue folder: every model's files, leftovers included)."""
        items, total = 0, 0
        for folder in (p for p in self.root.glob("*") if p.is_dir()):
            with os.scandir(folder) as entries:
                for e in entries:
                    try:
                        total += e.stat().st_size
                    except OSError:
                        continue  # deleted by a purge meanwhile
                    items += folder.name == model and e.name.endswith(".json")
        return items, total

    def get(self, item_id: str) -> Item:
        if not re.fullmatch(r"[0-9a-f]{32}", item_id):
            raise FeedbackError(f"not an item id: {item_id!r}")
        for sidecar in self.root.glob(f"*/{item_id}.json"):
            return Item(json.loads(sidecar.read_text()), sidecar)
        raise FeedbackError(f"no item {item_id} in {self.root}")

    # ---------------------------------------------------------------- labelling

    def label(self, item_id: str, label: str) -> Item:
        label = label.strip()
        if not label:
            raise FeedbackError("the label is empty")
        item = self.get(item_id)
        item.meta.update(label=label, labelled_at=datetime.now(UTC).isoformat(timespec="seconds"))
        write_atomically(item.path, json.dumps(item.meta, indent=1).encode())
        return item

    def import_labels(self, csv_path: Path) -> tuple[int, list[str]]:
        """Apply `id,label` rows; returns (labelled, ids not found). Blank labels are skipped."""
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"id", "label"} <= set(rows[0]):
            raise FeedbackError(f"{csv_path} needs id,label columns; it has {sorted(rows[0])}")
        done, missing = 0, []
        for row in rows:
            item_id, label = (row.get("id") or "").strip(), (row.get("label") or "").strip()
            if not item_id or not label:
                continue
            try:
                self.label(item_id, label)
                done += 1
            except FeedbackError:
                missing.append(item_id)
        return done, missing

    # ---------------------------------------------------------------- retention

    def purge(self, now: float | None = None) -> int:
        """Delete items older than retention_days, and leftovers of interrupted writes. Returns items deleted."""
        now = time.time() if now is None else now
        cutoff = now - self.settings.retention_days * 86400
        deleted = 0
        for folder in (p for p in self.root.glob("*") if p.is_dir()):
            for sidecar in folder.glob("*.json"):
                try:
                    created = float(json.loads(sidecar.read_text())["created_ts"])
                except (OSError, ValueError, KeyError, TypeError):
                    created = sidecar.stat().st_mtime if sidecar.exists() else now
                if created < cutoff:
                    for suffix in SUFFIX.values():
                        sidecar.with_suffix(suffix).unlink(missing_ok=True)
                    sidecar.unlink(missing_ok=True)
                    deleted += 1
            for tmp in folder.glob(".*.tmp"):
                if tmp.stat().st_mtime < now - 3600:
                    tmp.unlink(missing_ok=True)
        return deleted

    # ---------------------------------------------------------------- export

    def export(self, model: str, out: Path) -> dict:
        """Labelled items as a training set: image folder `out/<label>/<id>.png`, or `out/feedback.csv`
        (text,label); plus `out/feedback_provenance.json`, which the training pipelines record."""
        labelled = [it for it in self.items(model) if it.meta.get("label")]
        if not labelled:
            raise FeedbackError(f"model {model} has no labelled items in {self.root}")
        if out.exists() and any(out.iterdir()):
            raise FeedbackError(f"{out} is not empty; export into a new folder")
        out.mkdir(parents=True, exist_ok=True)
        kinds = {it.meta["kind"] for it in labelled}
        if len(kinds) != 1:
            raise FeedbackError(f"model {model} has items of several kinds: {sorted(kinds)}")
        kind = kinds.pop()
        provenance: dict = {"source": "feedback queue", "queue_dir": str(self.root.resolve()), "model": model,
                            "model_tags": sorted({it.meta["model_tag"] for it in labelled}), "kind": kind,
                            "counts": {"items": len(labelled),
                                       "by_label": dict(Counter(it.meta["label"] for it in labelled)),
                                       "by_reason": dict(Counter(it.meta.get("reason") for it in labelled))},
                            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                            "retention_days": self.settings.retention_days}  # fmt: skip
        if kind == "image":
            dirs: dict[str, str] = {}
            for it in labelled:
                name = safe_dir_name(it.meta["label"])
                if dirs.setdefault(name, it.meta["label"]) != it.meta["label"]:
                    raise FeedbackError(f"labels {dirs[name]!r} and {it.meta['label']!r} map to one folder {name}")
                (out / name).mkdir(exist_ok=True)
                shutil.copyfile(it.content_path, out / name / f"{it.meta['id']}.png")
            provenance.update(layout="image folder root/<label>/<id>.png", label_dirs=dirs)
        else:
            with (out / TEXT_EXPORT_FILE).open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                for it in labelled:
                    writer.writerow([it.content_path.read_text(encoding="utf-8"), it.meta["label"]])
            provenance.update(file=TEXT_EXPORT_FILE, layout="CSV with text,label columns", pii_scrubbed=True)
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
        return provenance
