"""What every page's figures share: a Figure, the results files' reader, the machines, and the number formats
the pages print."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINES = ("AMD EPYC", "Intel Xeon")


@cache
def results(path: str) -> dict | list:
    """A results file's figures: a JSON file under docs/results/, a markdown one (a model card, a per-class
    table) read by model_card, or a printed report (.txt) read by printed_report."""
    text = (ROOT / path).read_text()
    if path.endswith(".txt"):
        return printed_report(text)
    return model_card(text) if path.endswith(".md") else json.loads(text)


def printed_report(text: str) -> dict:
    """A report a command printed (`python -m loadtest.drift_cost > docs/results/drift_cost.txt`): its first line
    (what, then the machine after the first `;`) and each further line's label and figure."""
    head, *lines = text.splitlines()
    figures = {m[1]: float(m[2]) for m in (re.match(r"\s*(.+?)\s{2,}([\d.]+)\b", line) for line in lines) if m}
    return {"machine": head.split("; ")[1], "figures": figures, "text": text}


def model_card(text: str) -> dict:
    """A markdown results file's figures as it prints them: a model card's tag (None for another file), its tables
    (by the first column's header, in order: each a dict of rows by their first cell, each row by column header)
    and its text."""
    tables: dict[str, list[dict]] = {}
    for block in re.findall(r"(?:^\|.*\|\n)+", text, re.M):
        head, _, *rows = ([c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines())
        tables.setdefault(head[0], []).append({row[0]: dict(zip(head, row, strict=True)) for row in rows})
    tag = re.search(r"^# Model card: `([^`]+)`", text, re.M)
    return {"tag": tag[1] if tag else None, "tables": tables, "text": text}


def machine_of(data: dict | list) -> str | None:
    if not isinstance(data, dict):  # a list of records (a gallery's mistakes) records no machine
        return None
    # a file of several labelled runs (loadtest.memory) or models (documented.json) records each one's machine
    entries = data.get("runs") or data.get("models")
    each_ = [e.get("machine") for e in entries.values() if isinstance(e, dict)] if isinstance(entries, dict) else []
    recorded = data.get("machine") or each_ or None
    text = json.dumps(recorded) if recorded is not None else ""
    return next((m for m in MACHINES if m.split()[-1] in text), None)


BENCH = "docs/results/benchmark/benchmark.json"
DOCUMENTED = "docs/results/training/documented.json"

# The request format of the pages' figures: the first one measured (image uploads, JSON texts, raw ORT's none)
FIRST_FORMAT = ("multipart", "json", "")


@dataclass(frozen=True)
class Figure:
    """A piece of `doc` as the page prints it (`quote` of the source's figures), from the file `source`."""

    doc: str
    source: str
    quote: Callable[[dict], str]
    what: str


def point(data: dict, model: str, config: str, concurrency: int | None = None) -> dict:
    found = [p for m in data["models"] if m["model"] == model for p in m["points"]
             if p["config"] == config and (concurrency is None or p["concurrency"] == concurrency)
             and p.get("request_format") in FIRST_FORMAT]  # fmt: skip
    assert found, (model, config, concurrency)
    return found[0]


def bench_c32(d: dict, model: str, config: str) -> dict:
    return point(d, model, config, 32)


def whole(x: float) -> str:
    """Rounded half up, as a reader rounds (the JSON keeps one decimal: 398.5 req/s is printed 399)."""
    return f"{math.floor(x + 0.5):,}"


def tenths(x: float) -> str:
    """One decimal, rounded half up as the JSON's figure reads (6.05 ms is printed 6.1)."""
    return str(Decimal(str(x)).quantize(Decimal("0.1"), ROUND_HALF_UP))


def span(values, unit: str = "") -> str:
    """Whole numbers, rounded half up: one figure, or the lowest-highest."""
    values = list(values)
    low, high = whole(min(values)), whole(max(values))
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def share(part: float, whole_: float) -> str:
    return f"{part / whole_:.0%}".replace("%", " %")


def rps(d: dict, model: str, config: str) -> str:
    return whole(bench_c32(d, model, config)["rps"])


TWO_THREADS = "served default, 2 ORT threads per worker"


def on_off(d: dict, model: str, variant: str) -> str:
    """req/s at 32 clients, in-process, batching on vs off."""
    return (f"{rps(d, model, f'served {variant} inprocess batching on')} vs "
            f"{rps(d, model, f'served {variant} inprocess batching off')}")  # fmt: skip


def int8_gain(d: dict, models: tuple[str, ...] = ("image", "text")) -> str:
    """int8 over fp32 served, batching on: the served default and the int8 point."""
    fp32 = "served fp32 inprocess batching on"
    ratios = [bench_c32(d, m, c)["rps"] / bench_c32(d, m, fp32)["rps"] for m in models
              for c in ("served default", "served int8 inprocess batching on")]  # fmt: skip
    return f"{min(ratios):.1f}-{max(ratios):.1f}x"
