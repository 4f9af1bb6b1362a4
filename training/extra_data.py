"""`--extra-data`: labelled examples ADDED to a run's training split, never to its validation or test splits.

The usual source is an export of the serving feedback queue (`python -m serving.feedback export`), labelled
from a balanced sheet (serving/feedback/selection.py); any data in the same format works:

- image: a folder `root/<class>/<image>`; a class folder is a label of the model, by name, by its folder-safe
  name (`T-shirt/top` -> `T-shirt_top`) or by the export's `label_dirs`. One class alone is fine.
- text: a CSV/TSV/JSONL file with `text,label` columns, or an export folder holding `feedback.csv`.

Labels must be the model's (those of the data it is trained on): an unknown one is a DataError naming the
known ones. The held-out sets stay free of the extra data: an extra example that is a copy of a validation,
test or out-of-domain example (text: the same normalised sentence; image: the same pixels at the model's
size) is dropped and counted, never trained on. The bundled split's counts are untouched (the release gate
compares them); `provenance["extra_data"]` records the path, a checksum of its files, the examples added
per class, those dropped, and the export's `feedback_provenance.json` when there is one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from servable.preprocessing import ImagePreprocessing, InvalidImage
from serving.feedback.store import TEXT_EXPORT_FILE, safe_dir_name
from training.data_images import (
    IMAGE_SUFFIXES,
    DataError,
    ImageSplits,
    decode_training_image,
    feedback_provenance,
)
from training.data_text import MAX_TEXT_CHARS, TextSplits, dedupe, normalise, read_rows

EXTRA_DOMAIN = "extra data"  # a text row's domain when its file has no `domain` column


def checksum(path: Path, files: list[Path]) -> str:
    """sha256 over the files read (their paths relative to `path` and their bytes), in sorted order."""
    digest = hashlib.sha256()
    base = path if path.is_dir() else path.parent
    for f in sorted(files):
        digest.update(f.relative_to(base).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def _record(path: Path, files: list[Path], added: list[int], labels: list[str], read: int, held_out: int,
            duplicates: int) -> dict:  # fmt: skip
    feedback = feedback_provenance(path)
    counts = Counter(labels[i] for i in added)
    return {
        "path": str(path.resolve()), "sha256": checksum(path, files), "added_to": "train", "read": read,
        "added": len(added), "by_label": {lab: counts[lab] for lab in labels if counts[lab]},
        "dropped": {"copies_of_held_out": held_out, "duplicates": duplicates},
        **({"feedback": feedback} if feedback else {}),
    }  # fmt: skip


def _label_index(name: str, labels: list[str], label_dirs: dict[str, str], where: Path) -> int:
    for i, lab in enumerate(labels):
        if name in (lab, safe_dir_name(lab)) or label_dirs.get(name) == lab:
            return i
    raise DataError(f"{where}: class {name!r} is not a label of this model; its labels: {labels}")


def _pixel_key(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


def add_images(splits: ImageSplits, root: Path, prep: ImagePreprocessing, progress: bool = True) -> dict:
    """Decode `root/<class>/*` as training serves it and append it to `splits`' training split only."""
    if not root.is_dir():
        raise DataError(f"extra data {root}: not a folder; expected root/<class>/<image files>")
    label_dirs = (feedback_provenance(root) or {}).get("label_dirs", {})
    found = [(f, _label_index(d.name, splits.labels, label_dirs, root))
             for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
             for f in sorted(d.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    if not found:
        raise DataError(f"extra data {root}: no images in class sub-folders (root/<class>/*.png)")
    held_out = {_pixel_key(x) for x in (*splits.val_x, *splits.test_x)}
    pixels, y, sizes, seen, copies, duplicates, unreadable = [], [], [], set(), 0, 0, []
    for path, ci in tqdm(found, desc="decode extra data", disable=None if progress else True, leave=False):
        try:
            x, size = decode_training_image(path.read_bytes(), prep)
        except InvalidImage as exc:
            unreadable.append(f"{path} ({exc})")
            continue
        key = _pixel_key(x)
        if key in held_out:
            copies += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            pixels.append(x)
            y.append(ci)
            sizes.append(size)
    if unreadable:
        raise DataError(f"extra data: {len(unreadable)} unreadable image(s), fix or remove them: "
                        + "; ".join(unreadable[:5]))  # fmt: skip
    if pixels:
        splits.train_x = np.concatenate([splits.train_x, np.stack(pixels).astype(splits.train_x.dtype)])
        splits.train_y = np.concatenate([splits.train_y, np.asarray(y, dtype=splits.train_y.dtype)])
        if splits.train_sizes is not None:  # one (width, height) per training image, the added ones too
            splits.train_sizes = np.concatenate([splits.train_sizes, np.asarray(sizes, splits.train_sizes.dtype)])
    record = _record(root, [f for f, _ in found], y, splits.labels, len(found), copies, duplicates)
    splits.provenance["extra_data"] = record
    return record


def add_texts(splits: TextSplits, path: Path) -> dict:
    """Read `text,label` rows and append them to `splits`' training split only."""
    file = path / TEXT_EXPORT_FILE if path.is_dir() else path
    rows = read_rows(file)
    if rows and not {"text", "label"} <= set(rows[0]):
        raise DataError(f"extra data {file} lacks column(s) {sorted({'text', 'label'} - set(rows[0]))}")
    ids = {lab: i for i, lab in enumerate(splits.labels)}
    triples = []
    for r in rows:
        text, label = str(r.get("text") or "").strip()[:MAX_TEXT_CHARS], str(r.get("label") or "").strip()
        if not text or not label:
            continue
        if label not in ids:
            raise DataError(f"extra data {file}: label {label!r} is not a label of this model; its labels: "
                            f"{splits.labels}")  # fmt: skip
        triples.append((text, ids[label], str(r.get("domain") or "").strip() or EXTRA_DOMAIN))
    if not triples:
        raise DataError(f"extra data {file} has no row with both a text and a label")
    held_out = {normalise(t) for split in ("val", "test", "ood_test") for t, _ in getattr(splits, split)}
    kept, _ = dedupe(triples, exclude=held_out)
    copies = sum(normalise(t) in held_out for t, _, _ in triples)
    splits.train = splits.train + [(t, lab) for t, lab, _ in kept]
    splits.domains["train"] = splits.domains["train"] + [dom for _, _, dom in kept]
    record = _record(path, [file], [lab for _, lab, _ in kept], splits.labels, len(triples), copies,
                     len(triples) - copies - len(kept))  # fmt: skip
    splits.provenance["extra_data"] = record
    return record
