"""Figures quoted in the docs are the committed results' figures, and say where they come from.

Each entry of FIGURES is a piece of a page as the page prints it (a phrase, a table row, or a whole table
rendered by the code that wrote the file), built from a results file under docs/results/: the test fails
when the page's figure and the JSON's differ. The page must also name that results file in the same
section (under the same heading), and where the JSON records its machine, the section must name that
machine and the figure's paragraph no other one (figures from an AMD EPYC run are not described as a
Xeon's).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINES = ("AMD EPYC", "Intel Xeon")


@cache
def results(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def machine_of(data: dict) -> str | None:
    # a file of several labelled runs (loadtest.memory) or models (documented.json) records each one's machine
    entries = data.get("runs") or data.get("models")
    each_ = [e.get("machine") for e in entries.values() if isinstance(e, dict)] if isinstance(entries, dict) else []
    recorded = data.get("machine") or each_ or None
    text = json.dumps(recorded) if recorded is not None else ""
    return next((m for m in MACHINES if m.split()[-1] in text), None)


# ---------------------------------------------------------------- reading the results files

BENCH = "docs/results/benchmark/benchmark.json"
SOAK3, SOAK4 = "docs/results/soak-run3.json", "docs/results/soak.json"
EXPLAIN = "docs/results/explain/explain_load.json"
RELIABILITY = "docs/results/reliability.json"
RELIABILITY_OVERLOAD = "docs/results/reliability-overload.json"  # its own run: the admission by predicted wait
LOADTEST = "docs/results/loadtest/local_slo.json"
DOCUMENTED = "docs/results/training/documented.json"
BENCH_QUIET = "docs/results/benchmark-quiet/benchmark.json"  # the split design's history run, 2026-11-25
PROFILES = "docs/results/profiles/profiles.json"
GALLERY = "docs/results/training/gallery/{}/summary.json"
LIMITED = "docs/results/limited_data/limited_data.json"
# training.md's limited-data table: its row labels, the arm of each; bold marks the best of the three models
LIMITED_ROWS = {
    "EfficientNet-Lite0 (32 px), ImageNet-pretrained, fine-tuned": "pretrained",
    "EfficientNet-Lite0 (32 px), from scratch": "efficientnet-scratch",
    "small CNN (28 px), from scratch": "small-cnn",
    "small CNN, without augmentation": "no-augmentation",
    "small CNN + pseudo-labels": "pseudo-label",
    "small CNN, active learning (least confident)": "active",
}
LIMITED_MODELS = ("pretrained", "efficientnet-scratch", "small-cnn")
COMPOSE, COMPOSE_FRESH = "docs/results/compose-up.json", "docs/results/compose-up-fresh-clone.json"
MEMORY, MEMORY_FINAL = "docs/results/memory/memory.json", "docs/results/memory/final-tree.json"
MEMORY_PHASES = (("at_rest", "at rest"), ("after_one_explanation", "after one explanation"))


# The request format of the pages' figures: the first one measured (image uploads, JSON texts, raw ORT's none)
FIRST_FORMAT = ("multipart", "json", "")


def point(data: dict, model: str, config: str, concurrency: int | None = None) -> dict:
    found = [p for m in data["models"] if m["model"] == model for p in m["points"]
             if p["config"] == config and (concurrency is None or p["concurrency"] == concurrency)
             and p.get("request_format") in FIRST_FORMAT]  # fmt: skip
    assert found, (model, config, concurrency)
    return found[0]


def target(data: dict, model: str, name_start: str) -> dict:
    return next(
        t for m in data["models"] if m["model"] == model for t in m["targets"] if t["name"].startswith(name_start)
    )


def minutes_above(data: dict, model: str, ms: float) -> list[dict]:
    return [w for w in data[model]["windows"] if w["p99_ms"] > ms]


def lag_range_s(windows: list[dict]) -> str:
    lags = [w["send_lag_p99_ms"] / 1000 for w in windows]
    return f"{min(lags):.1f}-{max(lags):.1f} s"


def mem(data: dict, model: str, role: str) -> str:
    values = data["models"][model]["resident_memory_mib"][role]
    return f"{min(values):.0f}-{max(values):.0f} MiB"


def endpoint(data: dict, name: str) -> dict:
    return next(e for e in data["endpoints"] if e["name"] == name)


def routes(data: dict) -> list[dict]:
    return [e for e in data["endpoints"] if e["name"] != "Aggregated"]


def hostile_row(figures: dict) -> str:
    statuses = ", ".join(str(c) for c in sorted(set(figures["statuses"].values())))
    return (
        f"| {figures['sent']} | all 4xx with a JSON body ({statuses}) | {figures['max_latency_s']:.3f} s | "
        f"worker tree RSS {figures['rss_mb_before']:.1f} → {figures['rss_mb_after']:.1f} MB |"
    )


def overload_row(o: dict) -> str:
    return (
        f"| overload: {o['callers']} concurrent callers, replica limit `max_concurrency={o['max_concurrency']}`, "
        f"one 32-text request per batch, deadline {o['deadline_ms']:,} ms (3.5 × one batch alone) | "
        f"{o['callers']} callers for {o['seconds']} s (a refused one waits as Retry-After says), after "
        f"{o['learning_s']} s of the same load: "
        f"{o['sent']:,} | {o['ok']:,} × 200 (the slowest {o['max_served_ms']:,.0f} ms in the replica), "
        f"{o['429']:,} × 429 ({o['429_would_miss_deadline']:,} `would_miss_deadline`), **{o['503']} × 503**, "
        f"{o['5xx_other']} other 5xx, {o['no_answer']} unanswered; full service right after | "
        f"refusals ≤ {o['max_refusal_latency_s']:.2f} s |"
    )


def rss(d: dict, run: str, phase: str, model: str) -> float:
    return d["runs"][run]["phases"][phase][model]["rss_mib"]


def share(part: float, whole_: float) -> str:
    return f"{part / whole_:.0%}".replace("%", " %")


def memory_row(model: str, phase: str, label: str) -> Callable[[dict], str]:
    """A row of the memory table: before, after (its share of before), after + the recommended change."""

    def row(d: dict) -> str:
        before, after, rec = (rss(d, run, phase, model) for run in ("before", "after", "after_with_recommended"))
        bold = "**" if phase == "at_rest" else ""
        return (f"| {model}, {label} | {before:.0f} | {bold}{after:.0f} ({share(after, before)}){bold} | "
                f"{rec:.0f} ({share(rec, before)}) |")  # fmt: skip

    return row


def pss_both(d: dict, run: str) -> float:
    return sum(d["runs"][run]["phases"]["at_rest"][m]["pss_mib"] for m in ("image", "text"))


def memory_load_row(model: str) -> Callable[[dict], str]:
    runs = ("before", "after", "after_with_recommended")
    return lambda d: f"| {model}, under load (largest) / after it | " + " | ".join(
        f"{d['runs'][r]['phases']['under_load'][model]['largest_total_rss_mib']:.0f} / "
        f"{rss(d, r, 'after_load', model):.0f}" for r in runs) + " |"  # fmt: skip


def each(d: dict, run: str, phase: str, model: str, role: str) -> str:
    """Each process of a role, its RSS in whole MiB: one figure, or the range."""
    processes = d["runs"][run]["phases"][phase][model]["processes"]
    values = sorted(round(p["rss_mib"]) for p in processes if p["role"] == role)
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def each_pair(d: dict, run: str, role: str, phase: str = "at_rest") -> str:
    return f"{each(d, run, phase, 'image', role)} / {each(d, run, phase, 'text', role)}"


def final_tree_row(model: str, phase: str, label: str) -> Callable[[dict], str]:
    def row(d: dict) -> str:
        before, final = rss(d, "before", phase, model), rss(d, "final", phase, model)
        ratio = f" {share(final, before)} " if phase == "at_rest" else " "
        return f"| {model}, {label} | {before:.0f} | {final:.0f} |{ratio}|"

    return row


def span(values, unit: str = "") -> str:
    """Whole numbers, rounded half up: one figure, or the lowest-highest."""
    values = list(values)
    low, high = whole(min(values)), whole(max(values))
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def replica_memory(d: dict, model: str) -> str:
    def of(key: str) -> str:
        return span(v for k, v in d[key].items() if k.startswith(f"{model}-"))

    return f"{model} {of('memory_at_rest_mib')} / {of('memory_under_load_mib')} MiB"


def rollout_s(d: dict, step: str) -> str:
    return whole(d["rollout"]["durations_s"][step])


def explain_cost(d: dict, model: str) -> dict:
    return d["models"][model]["cost"]


def explanation_cost_row(d: dict) -> str:
    image, text = explain_cost(d, "image"), explain_cost(d, "text")
    grid8, grid16, txt = image["explain"], image["explain_grid16"], text["explain"]
    return (
        "| one explanation, idle server (median / p95) | "
        f"{grid8['median_ms']:.0f} / {grid8['p95_ms']:.0f} ms (grid 8 + overlay, {grid8['model_rows_mean']:.0f} rows): "
        f"**{image['explain_vs_predict']:.2g}x** a prediction; grid 16 "
        f"({grid16['model_rows_mean']:.0f} rows, allowed before `EXPLAIN_MAX_ROWS`): {grid16['median_ms']:.0f} ms | "
        f"{txt['median_ms']:.0f} / {txt['p95_ms']:.0f} ms ({txt['model_rows_mean']:.1f} words on average): "
        f"**{text['explain_vs_predict']:.2g}x** |"
    )


def predict_pcts(d: dict, model: str, phase: str) -> str:
    p = d["models"][model][phase]["predict"]
    return f"{tenths(p['p50_ms'])} / {tenths(p['p95_ms'])} / {tenths(p['p99_ms'])} ms"


def explain_table_row(label: str, phase: str) -> Callable[[dict], str]:
    return lambda d: f"| {label} | {predict_pcts(d, 'image', phase)} | {predict_pcts(d, 'text', phase)} |"


def explained(d: dict, model: str) -> str:
    e = d["models"][model]["with_explain_load_default"]["explain"]
    return f"{e['explanations_per_s']:.0f}/s ({e['by_status']['429']} x 429)"


def p99_rise(d: dict, model: str) -> tuple[float, float]:
    m = d["models"][model]
    return m["predict_alone"]["predict"]["p99_ms"], m["with_explain_load_default"]["predict"]["p99_ms"]


def best_rps(d: dict, model: str, config: str) -> str:
    """The history run's saturation figure: the best of its closed-loop client counts."""
    found = [p["rps"] for m in d["models"] if m["model"] == model for p in m["points"]
             if p["config"] == config and p["concurrency"]]  # fmt: skip
    return whole(max(found))


def raw_best(d: dict, model: str) -> str:
    """raw ORT fp32 items/s at batch 1 / at its best batch (which)."""
    raw = {p["config"].removeprefix("raw ORT fp32 "): p["items_s"] for m in d["models"] if m["model"] == model
           for p in m["points"] if p["config"].startswith("raw ORT fp32")}  # fmt: skip
    best = max(raw, key=raw.get)
    return f"{whole(raw['b1'])} / {whole(raw[best])} ({best})"


def profile_rps(d: dict, model: str, config: str) -> str:
    return whole(next(r["rps"] for r in d["runs"] if r["model"] == model and r["config"] == config))


# A py-spy flame graph's frame: its function (file:line follows) and its place in samples (fg:x, fg:w)
FLAME_FRAME = re.compile(r'<g><title>(?P<name>[^<]*?) \([\d,]+ samples?, [\d.]+%\)</title><rect [^>]*?'
                         r'fg:x="(?P<x>\d+)" fg:w="(?P<w>\d+)"')  # fmt: skip


def flame_share(svg: Path, functions: tuple[str, ...]) -> float:
    """The share of all samples under any frame of these functions, inclusive: a frame inside another counted one
    (recursion, or a chain of them) is not counted twice."""
    text = svg.read_text()
    total = int(re.search(r'total_samples="(\d+)"', text).group(1))
    names = tuple(f"{f} (" for f in functions)
    frames = [(int(m["x"]), int(m["x"]) + int(m["w"])) for m in FLAME_FRAME.finditer(text)
              if m["name"].startswith(names)]  # fmt: skip
    spans = sorted(frames, key=lambda s: (s[0], -s[1]))  # an enclosing frame before those it holds
    counted, end = 0, -1
    for start, stop in spans:
        if start >= end:
            counted, end = counted + stop - start, stop
    return counted / total


def profile_row(label: str, *functions: str) -> Callable[[dict], str]:
    """A row of benchmark.md's profile table: each run's share, from the flame graph profiles.json names."""

    def row(d: dict) -> str:
        cells = []
        for model in ("image", "text"):
            for config in ("default", "split-old-design"):
                run = next(r for r in d["runs"] if r["model"] == model and r["config"] == config)
                found = flame_share(ROOT / Path(PROFILES).parent / run["svg"], functions)
                cells.append(f"{whole(100 * found)} %" if found else "-")
        return f"| {label} | " + " | ".join(cells) + " |"

    return row


def rendered(module: str, name: str) -> Figure:
    """A table of training.md rendered by its module's markdown_table from the JSON the module wrote."""

    def quote(d: dict) -> str:
        return importlib.import_module(f"training.{module}").markdown_table(d)

    return Figure("docs/training.md", f"docs/results/{module}/{name}.json", quote, f"{module} table: {name}")


def beats_both(d: dict, absence: str) -> str:
    return f"{100 * d['absence'][absence]['explanation_beats_both_baselines_share']:.0f} %"


def limited_row(label: str) -> Callable[[dict], str]:
    arm = LIMITED_ROWS[label]

    def row(d: dict) -> str:
        from training.limited_data import fmt  # the report's own cell format (imports torch: only when run)

        summary, cells = d["summary"], []
        for size in map(str, d["config"]["sizes"]):
            best = max(LIMITED_MODELS, key=lambda a: summary[a][size]["mean"])
            cell = fmt(summary[arm][size])
            cells.append(f"**{cell}**" if arm == best else cell)
        return f"| {label} | " + " | ".join(cells) + " |"

    return row


def rss_growth(d: dict) -> str:
    """Run 4's worker RSS column: the growth range, then each worker's first → last reading, by model."""
    w = d["workers"]
    growth = w["rss_growth_mb"].values()

    def first_last(model: str) -> str:
        workers = sorted(k for k in w["rss_start_mb"] if k.startswith(f"{model}-"))
        return " and ".join(f"{w['rss_start_mb'][k]:.1f} → {w['rss_end_mb'][k]:.1f}" for k in workers)

    by_model = {m: first_last(m) for m in ("image", "text")}
    return f"**{span(growth)} MB** (image {by_model['image']} MB, text {by_model['text']} MB) |"


@dataclass(frozen=True)
class Figure:
    doc: str
    source: str
    quote: Callable[[dict], str]
    what: str


def bench_c32(d: dict, model: str, config: str) -> dict:
    return point(d, model, config, 32)


def whole(x: float) -> str:
    """Rounded half up, as a reader rounds (the JSON keeps one decimal: 398.5 req/s is printed 399)."""
    return f"{math.floor(x + 0.5):,}"


def tenths(x: float) -> str:
    """One decimal, rounded half up as the JSON's figure reads (6.05 ms is printed 6.1)."""
    return str(Decimal(str(x)).quantize(Decimal("0.1"), ROUND_HALF_UP))


def rps_p99(d: dict, model: str, config: str) -> str:
    """A row's cell of the reference table: req/s (p99 ms) at 32 clients."""
    p = bench_c32(d, model, config)
    return f"{whole(p['rps'])} ({p['p99_ms']:.0f})"


def rps(d: dict, model: str, config: str) -> str:
    return whole(bench_c32(d, model, config)["rps"])


TWO_THREADS = "served default, 2 ORT threads per worker"


def on_off(d: dict, model: str, variant: str) -> str:
    """req/s at 32 clients, in-process, batching on vs off."""
    return (f"{rps(d, model, f'served {variant} inprocess batching on')} vs "
            f"{rps(d, model, f'served {variant} inprocess batching off')}")  # fmt: skip


SPLIT, PEER = "served fp32 split (old design)", "fastapi+ort peer"


def over(d: dict, model: str, base: str, config: str = "served default") -> str:
    """A config's req/s at 32 clients over another's, as the reading prints it."""
    return f"{bench_c32(d, model, config)['rps'] / bench_c32(d, model, base)['rps']:.1f}x"


def int8_gain(d: dict, models: tuple[str, ...] = ("image", "text")) -> str:
    """int8 over fp32 served, batching on: the served default and the int8 point."""
    fp32 = "served fp32 inprocess batching on"
    ratios = [bench_c32(d, m, c)["rps"] / bench_c32(d, m, fp32)["rps"] for m in models
              for c in ("served default", "served int8 inprocess batching on")]  # fmt: skip
    return f"{min(ratios):.1f}-{max(ratios):.1f}x"


def raw_items_s(d: dict, model: str) -> str:
    """raw ORT fp32 items/s at batch 1 and at its best batch."""
    raw = [p for m in d["models"] if m["model"] == model for p in m["points"] if p["config"].startswith("raw ORT fp32")]
    b1 = next(p for p in raw if p["config"] == "raw ORT fp32 b1")
    return f"{b1['items_s']:,.0f} / {max(p['items_s'] for p in raw):,.0f}"


def bench_row(label: str, cell: Callable[[dict, str], str]) -> Callable[[dict], str]:
    return lambda d: f"| {label} | {cell(d, 'image')} | {cell(d, 'text')} |"


def target_ratio(d: dict, model: str, name_start: str, unit: str = "") -> str:
    """A target's ratio as the table prints it: as measured, then drift-corrected where that differs."""
    ratio = target(d, model, name_start)["ratio"]
    corrected, _, measured = ratio.partition(" drift-corrected, ")
    return f"{measured.removesuffix(' as measured')}{unit} ({corrected} drift-corrected)" if measured else ratio + unit


ADMISSION = "docs/results/benchmark/admission/ratios.json"


def admission_row(model: str, tree: str, label: str) -> Callable[[dict], str]:
    """A row of benchmark.md's admission table: each round's served / peer req/s, and the median ratio."""

    def row(d: dict) -> str:
        rounds = d[f"{model}/{tree}"]
        cells = ", ".join(f"{r['served']:.0f} / {r['peer']:.0f}" for r in rounds)
        return f"| {model}, {label} | {cells} | **{statistics.median(r['ratio'] for r in rounds):.2f}** |"

    return row


FIGURES = [
    *(Figure("docs/benchmark.md", ADMISSION, admission_row(m, t, label), f"admission: {m} {t}")
      for m in ("image", "text") for t, label in (("old", "before (`c2b50c1`)"), ("new", "with admission and timing"))),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"| {bench_c32(d, 'image', 'served default')['rps']:,.0f}: met | {bench_c32(d, 'text', 'served default')['rps']:,.0f}: met |"),  # noqa: E501
        "req/s at 32 clients"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"{bench_c32(d, 'image', 'served default')['p99_ms']:.0f} vs {bench_c32(d, 'image', 'fastapi+ort peer')['p99_ms']:.0f} ms: met | "  # noqa: E501
        f"{bench_c32(d, 'text', 'served default')['p99_ms']:.0f} vs {bench_c32(d, 'text', 'fastapi+ort peer')['p99_ms']:.0f} ms: met"),  # noqa: E501
        "p99 at 32 clients against the peer"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"{point(d, 'image', 'served default', 1)['p50_ms']:.2f} vs {point(d, 'image', 'fastapi+ort peer', 1)['p50_ms']:.2f} ms: met | "  # noqa: E501
        f"{point(d, 'text', 'served default', 1)['p50_ms']:.2f} vs {point(d, 'text', 'fastapi+ort peer', 1)['p50_ms']:.2f} ms: met"),  # noqa: E501
        "p50 at one client against the peer"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"the [reference models](index.md#reference-models) `{d['models'][0]['tag']}` and `{d['models'][1]['tag']}`"),
        "reference models"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"int8 on CPU (`VARIANT=auto`: {int8_gain(d, ('image',))} for images, {int8_gain(d, ('text',))} for text "
        "served"),
        "int8 gain"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"with its defaults serves {rps(d, 'image', 'served default')} and {rps(d, 'text', 'served default')}-"
        f"{rps(d, 'text', 'served int8 inprocess batching on')}: {over(d, 'image', SPLIT)} and "
        f"{over(d, 'text', SPLIT, 'served default').removesuffix('x')}-"
        f"{over(d, 'text', SPLIT, 'served int8 inprocess batching on')} on "
        f"the same machine. Against the server a user would write (FastAPI + ORT), {over(d, 'image', PEER)} for images "
        f"and {over(d, 'text', PEER)} for text"), "the request path was the bottleneck"),
    # the reference run's table (docs/benchmark.md), row by row
    Figure("docs/benchmark.md", BENCH, bench_row(
        "**served default**", lambda d, m: f"**{rps_p99(d, m, 'served default')}**"),
        "reference table: served default"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"(`int8 inprocess batching on`) | {rps_p99(d, 'image', 'served int8 inprocess batching on')} | "
        f"{rps_p99(d, 'text', 'served int8 inprocess batching on')} |"), "reference table: second measurement"),
    Figure("docs/benchmark.md", BENCH, bench_row("served fp32, in-process, batching on / off", lambda d, m: (
        f"{rps(d, m, 'served fp32 inprocess batching on')} / {rps(d, m, 'served fp32 inprocess batching off')}")),
        "reference table: fp32 batching on / off"),
    Figure("docs/benchmark.md", BENCH, bench_row("served fp32 split (old design)", lambda d, m: rps_p99(
        d, m, "served fp32 split (old design)")), "reference table: split"),
    Figure("docs/benchmark.md", BENCH, bench_row("FastAPI + ORT peer, no batching", lambda d, m: rps_p99(
        d, m, "fastapi+ort peer")), "reference table: peer"),
    Figure("docs/benchmark.md", BENCH, bench_row("PyTorch eager peer", lambda d, m: rps_p99(
        d, m, "pytorch eager (FastAPI)")), "reference table: eager peer"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"(items/s, in-process, no HTTP) | {raw_items_s(d, 'image')} | {raw_items_s(d, 'text')} |"),
        "reference table: raw ORT"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        "the FastAPI + ORT peer at 32 clients | "
        f"{target_ratio(d, 'image', 'served default req/s at 32 clients ≥ 1.6x', 'x')}: met | "
        f"{target_ratio(d, 'text', 'served default req/s at 32 clients ≥ 1.1x', 'x')}: met |"),
        "targets: against the peer"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"vs raw best batch) | {target_ratio(d, 'image', '≥ 0.85 of raw ORT (fp32 inprocess batching on')}: not met | "
        f"{target_ratio(d, 'text', '≥ 0.85 of raw ORT (fp32 inprocess batching on')}: met |"), "targets: raw ORT"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"at 70 % of saturation | {float(target_ratio(d, 'image', 'p99 ≤ 3x p50')):.1f}"
        f" (p99 {point(d, 'image', 'served default @70%')['p99_ms']:.0f} ms): not met | "
        f"{float(target_ratio(d, 'text', 'p99 ≤ 3x p50')):.1f}: met |"), "targets: tail at 70 %"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        "2 threads per worker (4 threads on 2 cores) gave "
        f"{rps(d, 'image', 'served default, 2 ORT threads per worker')} vs {rps(d, 'image', 'served default')} "
        "images/s and a p99 of "
        f"{bench_c32(d, 'image', 'served default, 2 ORT threads per worker')['p99_ms']:.0f} vs "
        f"{bench_c32(d, 'image', 'served default')['p99_ms']:.0f} ms; for text it was within run-to-run noise "
        f"({rps(d, 'text', 'served default, 2 ORT threads per worker')} vs {rps(d, 'text', 'served default')}-"
        f"{rps(d, 'text', 'served int8 inprocess batching on')})"), "one intra-op thread"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"({rps(d, 'image', 'served default, ORT spinning on')} vs {rps(d, 'image', 'served default')} images/s, "
        f"{rps(d, 'text', 'served default, ORT spinning on')} vs {rps(d, 'text', 'served default')}-"
        f"{rps(d, 'text', 'served int8 inprocess batching on')} texts/s"), "spinning"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"served {rps(d, 'image', 'served fp32 split (old design)')} images/s and "
        f"{rps(d, 'text', 'served fp32 split (old design)')} texts/s in this run"), "old design"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"at 32 clients (int8 text: {rps(d, 'text', 'served int8 inprocess batching on')} vs "
        f"{rps(d, 'text', 'served int8 inprocess batching off')})"), "batching on / off, int8 text"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"batching on vs off, {d['models'][0]['ratios_as_measured']['batching_on/off']:.2f}x for images and "
        f"{d['models'][1]['ratios_as_measured']['batching_on/off']:.2f}x for text"), "batching on / off"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"the open-loop point had {point(d, 'image', 'served default @70%')['errors']} failed requests of "
        f"{point(d, 'image', 'served default @70%')['requests']:,}"), "open-loop errors"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"| {target(d, 'text', '0 errors')['measured'].removesuffix(' requests')} |"), "text errors of all requests"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"for images sent {point(d, 'image', 'served default @70%')['target_rps']:,.0f} req/s; its p99 was "
        f"{point(d, 'image', 'served default @70%')['p99_ms']:.0f} ms and {point(d, 'image', 'served default @70%')['errors']} requests"),  # noqa: E501
        "open-loop point"),
    # the soak table of docs/reliability.md: runs 3 and 4
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"| {d['image']['saturation_rps']:.0f}, {d['text']['saturation_rps']:.0f} | {d['image']['target_rps']:.0f}, "
        f"{d['text']['target_rps']:.0f} | {d['image']['errors']}, {d['text']['errors']} | "
        f"{d['image']['p99_first_window_ms']:.0f} → {d['image']['p99_last_window_ms']:.0f} ms; "
        f"{d['text']['p99_first_window_ms']:.0f} → {d['text']['p99_last_window_ms']:.0f} ms, above 1 s in "
        f"{len(minutes_above(d, 'image', 1000))} (images) and {len(minutes_above(d, 'text', 1000))} (texts) of the "
        f"{d['minutes']:.0f} minutes |"), "soak run 3"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"p99 rose above 1 s in {len(minutes_above(d, 'text', 1000))} of the {d['minutes']:.0f} minutes "
        f"({len(minutes_above(d, 'image', 1000))} for images)"), "soak run 3, above 1 s"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"in those minutes the generator was {lag_range_s(minutes_above(d, 'image', 1000) + minutes_above(d, 'text', 1000))} late"),  # noqa: E501
        "soak run 3, generator lag"),
    Figure("docs/reliability.md", SOAK4, lambda d: (
        f"| {d['image']['saturation_rps']:.0f}, {d['text']['saturation_rps']:.0f} | {d['image']['target_rps']:.0f}, "
        f"{d['text']['target_rps']:.0f} | **{d['image']['errors']}, {d['text']['errors']}** "
        f"({d['image']['requests']:,} and {d['text']['requests']:,} requests) | "
        f"**{d['image']['p99_first_window_ms']:.0f} → "
        f"{d['image']['p99_last_window_ms']:.0f} ms; {d['text']['p99_first_window_ms']:.0f} → "
        f"{d['text']['p99_last_window_ms']:.0f} ms, every minute between "
        f"{min(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f} and "
        f"{max(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f} ms"), "soak run 4"),
    Figure("docs/reliability.md", SOAK4, rss_growth, "soak run 4, worker RSS"),
    Figure("docs/reliability.md", SOAK4, lambda d: (
        "generator lag at most "
        f"{max(w['send_lag_p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.1f} ms in any minute; the "
        f"{d['load_generator_cores']:.1f} of a core it used"), "soak run 4, generator"),
    Figure("docs/deployment-answers.md", SOAK4, lambda d: (
        f"p99 {min(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f}-"
        f"{max(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f} ms in every minute with no trend, "
        f"worker RSS growth {span(d['workers']['rss_growth_mb'].values())} MB"), "soak row, p99 and RSS"),
    Figure("docs/deployment-answers.md", SOAK4, lambda d: (
        f"{d['image']['target_rps']:.0f} images/s and {d['text']['target_rps']:.0f} texts/s for {d['minutes']:.0f} "
        f"minutes, {d['image']['errors'] + d['text']['errors']} errors in "
        f"{d['image']['requests'] + d['text']['requests']:,} requests"), "soak row"),
    # the reliability suite's table (docs/reliability.md), from make reliability
    Figure("docs/reliability.md", RELIABILITY, lambda d: (
        f"| {d['fuzz_image']['requests']} (image) and {d['fuzz_text']['requests']} (text) requests, "
        f"{d['fuzz_image']['operations']} and {d['fuzz_text']['operations']} operations |"), "fuzzing"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: f"| {d['hostile_options']['requests']} (both services) |",
           "hostile options"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: f"| {d['hostile_v2_numbers']['requests']} (both services; ",
           "hostile V2 numbers"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: (
        f"| {d['hostile_numbers_fuzz_image']['requests']} (image) and {d['hostile_numbers_fuzz_text']['requests']} "
        f"(text), {d['hostile_numbers_fuzz_image']['operations']} and {d['hostile_numbers_fuzz_text']['operations']} "
        "operations (predict, explain, V2 infer and its version route) |"), "property test"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: (
        f"`make reliability` on {d['date'].split()[0]} on an Intel Xeon machine (2 cores, no GPU, Python 3.11), shared "
        f"with other test suites at a load average of about {d['load_average_1m']:.0f}"), "suite run"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: (
        f"the single-replica SIGTERM test failed: {d['sigterm_single_replica']['outcomes']['200']} × 200 and "
        f"{d['sigterm_single_replica']['outcomes']['refused']} refused"), "SIGTERM run"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: hostile_row(d["hostile_images"]), "hostile images"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: hostile_row(d["hostile_texts"]), "hostile texts"),
    Figure("docs/reliability.md", RELIABILITY_OVERLOAD, lambda d: overload_row(d["overload"]), "overload"),
    # benchmark.md: memory at rest, from make memory (three labelled runs), and on the redesigned core
    *(Figure("docs/benchmark.md", MEMORY, memory_row(m, phase, label), f"memory: {m}, {label}")
      for m in ("image", "text") for phase, label in MEMORY_PHASES),
    *(Figure("docs/benchmark.md", MEMORY, memory_load_row(m), f"memory: {m}, under load") for m in ("image", "text")),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"what the machine really gives them) | {pss_both(d, 'before'):,.0f} | **{pss_both(d, 'after'):,.0f} "
        f"({share(pss_both(d, 'after'), pss_both(d, 'before'))})** | {pss_both(d, 'after_with_recommended'):,.0f} |"),
        "memory: PSS"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"| arbiter (`bentoml serve`) | {each_pair(d, 'before', 'arbiter')} | {each_pair(d, 'after', 'arbiter')} "
        f"({each_pair(d, 'after_with_recommended', 'arbiter')} with the recommended change) |"), "memory: arbiter"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"| HTTP worker, each | {each_pair(d, 'before', 'http_worker')} | {each_pair(d, 'after', 'http_worker')} |"),
        "memory: HTTP worker"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"| explain process, each (2 before, none after) | {each_pair(d, 'before', 'explain_process')} | none; "
        f"{each_pair(d, 'after', 'explain_process', 'after_one_explanation')} once started |"),
        "memory: explain process"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"| resource tracker, each (2 before, none after) | {each_pair(d, 'before', 'resource_tracker')} | none; "
        f"{each(d, 'after', 'after_one_explanation', 'image', 'resource_tracker')} once an explain process started |"),
        "memory: resource tracker"),
    *(Figure("docs/benchmark.md", MEMORY_FINAL, final_tree_row(m, phase, label), f"memory, core redesign: {m}, {label}")
      for phase, label in MEMORY_PHASES for m in ("image", "text")),
    # benchmark.md: the profiles' load, the core redesign's arbiter, and the split design's history run
    Figure("docs/benchmark.md", PROFILES, lambda d: (
        "| req/s during the profile | " + " | ".join(profile_rps(d, m, c) for m in ("image", "text")
                                                     for c in ("default", "split-old-design")) + " |"),
        "profiles: req/s"),
    Figure("docs/benchmark.md", PROFILES, profile_row(
        "ONNX Runtime (`Session.run`, model thread or process)", "Session.run"), "profiles: ONNX Runtime"),
    Figure("docs/benchmark.md", PROFILES, profile_row(
        "HTTP worker event loop (`Server.run`: everything below)", "Server.run"), "profiles: event loop"),
    Figure("docs/benchmark.md", PROFILES, profile_row(
        "... our middleware chain and the routes (`AccessLogMiddleware` inclusive)", "AccessLogMiddleware.__call__"),
        "profiles: middleware and routes"),
    Figure("docs/benchmark.md", PROFILES, profile_row(
        "... the request's reading, checks and pre-processing (`Adapter.read` + `decode`)",
        *(f"{kind}Adapter.{step}" for kind in ("Image", "Text") for step in ("read", "decode"))),
        "profiles: reading and pre-processing"),
    Figure("docs/benchmark.md", PROFILES, profile_row(
        "... of which image decode, resize, normalise (`preprocess_image`)", "preprocess_image"),
        "profiles: image pre-processing"),
    Figure("docs/benchmark.md", MEMORY_FINAL, lambda d: (
        f"At rest the redesign holds the arbiter ({each(d, 'final', 'at_rest', 'image', 'arbiter')} MiB, was "
        f"{each(d, 'before', 'at_rest', 'image', 'arbiter')}:"), "memory, core redesign: arbiter"),
    Figure("docs/benchmark.md", BENCH_QUIET, bench_row("raw ORT fp32, batch 1 / best batch", raw_best),
           "history: raw ORT"),
    Figure("docs/benchmark.md", BENCH_QUIET, bench_row("served fp32, batching on / off", lambda d, m: (
        f"{best_rps(d, m, 'served fp32 batching on')} / {best_rps(d, m, 'served fp32 batching off')}")),
        "history: served fp32"),
    Figure("docs/benchmark.md", BENCH_QUIET, bench_row("served int8, batching on", lambda d, m: best_rps(
        d, m, "served int8 batching on")), "history: served int8"),
    Figure("docs/benchmark.md", BENCH_QUIET, bench_row("PyTorch-eager FastAPI peer", lambda d, m: best_rps(
        d, m, "pytorch eager (FastAPI)")), "history: eager peer"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        f"| served / raw best batch (target ≥ 0.85) | {d['models'][0]['ratios']['served_on/raw_best_batch']:.2f} — not "
        f"met | {d['models'][1]['ratios']['served_on/raw_best_batch']:.2f} — not met |"), "history: served / raw"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        "| best served / PyTorch eager (target ≥ 2) | "
        f"{d['models'][0]['ratios']['served_best/pytorch_eager']:.1f} — met | "
        f"{d['models'][1]['ratios']['served_best/pytorch_eager']:.1f} — not met |"), "history: served / eager"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        f"| batching on / off | {d['models'][0]['ratios']['batching_on/off']:.2f} | "
        f"{d['models'][1]['ratios']['batching_on/off']:.2f} |"), "history: batching on / off"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: "| int8 / fp32, raw / served | " + " | ".join(
        f"{r['int8/fp32 raw']:.2f} / {r['int8/fp32 served']:.2f}" for r in (m["ratios"] for m in d["models"])) + " |",
        "history: int8 / fp32"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        f"| ORT-optimised / fp32, raw (BERT) | — | {d['models'][1]['ratios']['optimized/fp32 raw']:.2f} |"),
        "history: ORT-optimised / fp32"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        "| p99 / p50 at 70 % of saturation, batching on (target ≤ 3) | "
        f"{d['models'][0]['tail_ratios']['p99/p50 served fp32 batching on @70%']:.0f} — not met | "
        f"{d['models'][1]['tail_ratios']['p99/p50 served fp32 batching on @70%']:.1f} — not met |"), "history: tail"),
    # index.md: the reference models (benchmark.json's tags and machine) and today's documented runs
    *(Figure("docs/index.md", BENCH, lambda d, i=i: (
        f"| `{d['models'][i]['tag']}` | {d['machine'].split(', Python')[0]} | [benchmark]"), f"reference model {i}")
      for i in (0, 1)),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"| `{d['models']['image']['run']}` | {d['models']['image']['figures']['test_accuracy']:.4f} (Fashion-MNIST "
        f"test, {d['models']['image']['data_counts']['test']:,} images) | - |"), "documented image run"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"| `{d['models']['text']['run']}` | {d['models']['text']['figures']['test_accuracy']:.4f} "
        f"({d['models']['text']['data_counts']['test']:,} held-out sentences) | "
        f"{d['models']['text']['figures']['out_of_domain_accuracy']:.4f} "
        f"({d['models']['text']['data_counts']['ood_test']:,} Amazon review sentences) |"), "documented text run"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"holds every default run to, within {100 * d['models']['image']['tolerance']:.1f} points"), "gate tolerance"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"loses more than {100 * d['models']['image']['int8_max_drop']:.0f} point of test accuracy"), "int8 bound"),
    # training.md: the documented default runs' headline figures and data counts
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"{d['models']['image']['data_counts']['train']:,} training / {d['models']['image']['data_counts']['val']:,} "
        f"validation images at 64 px"), "image data counts"),
    Figure("docs/training.md", DOCUMENTED, lambda d: f"Run `{d['models']['image']['run']}` (2026-11-30, AMD EPYC",
           "image run"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, full {d['models']['image']['data_counts']['test']:,}-image test set | "
        f"**{d['models']['image']['figures']['test_accuracy']:.4f}** |"), "image test accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"lifted test accuracy by 5 points, to {d['models']['image']['figures']['test_accuracy']:.4f},"),
        "image test accuracy, prose"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"with seed 42, {d['models']['text']['data_counts']['train']:,} training / "
        f"{d['models']['text']['data_counts']['val']:,} validation / "
        f"{d['models']['text']['data_counts']['test']:,} test sentences"), "text data counts"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"the Amazon out-of-domain set has {d['models']['text']['data_counts']['ood_test']:,} sentences"),
        "text out-of-domain count"),
    Figure("docs/training.md", DOCUMENTED, lambda d: f"(run `{d['models']['text']['run']}`, seed 42", "text run"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, in-domain test, pooled ({d['models']['text']['data_counts']['test']:,}) | "
        f"**{d['models']['text']['figures']['test_accuracy']:.4f}** |"), "text test accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, out-of-domain Amazon ({d['models']['text']['data_counts']['ood_test']:,}) | "
        f"**{d['models']['text']['figures']['out_of_domain_accuracy']:.4f}** |"), "text out-of-domain accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"int8 agrees with fp32 on {100 * d['models']['text']['figures']['int8_agreement']:.1f} % of the in-domain "
        "test sentences"), "text int8 agreement"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"**In domain: {d['models']['text']['figures']['test_accuracy']:.3f} pooled on seed 42**"), "text, prose"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"**Out of domain, seed 42: 0.833 → {d['models']['text']['figures']['out_of_domain_accuracy']:.3f}**"),
        "text out of domain, prose"),
    # serving.md: the defaults per device, from the benchmark's reference run
    Figure("docs/serving.md", BENCH, lambda d: (
        f"(fp32: {on_off(d, 'image', 'fp32')} images/s, {on_off(d, 'text', 'fp32')} texts/s; int8 text "
        f"{on_off(d, 'text', 'int8')})"), "defaults: batching"),
    Figure("docs/serving.md", BENCH, lambda d: (
        f"the batcher has no window: {point(d, 'image', 'served default', 1)['p50_ms']:.1f} ms p50 for an image"),
        "defaults: one client"),
    Figure("docs/serving.md", BENCH, lambda d: (
        f"worker lost ({rps(d, 'image', TWO_THREADS)} vs {rps(d, 'image', 'served default')} images/s, p99 "
        f"{bench_c32(d, 'image', TWO_THREADS)['p99_ms']:.0f} vs "
        f"{bench_c32(d, 'image', 'served default')['p99_ms']:.0f} ms)"),
        "defaults: threads"),
    Figure("docs/serving.md", BENCH, lambda d: f"{int8_gain(d)} the fp32 throughput served", "defaults: int8"),
    # serving.md: make explain-load's measured run
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"| | image (`/classify`, {d['settings']['rate']['image']:.0f} req/s) | text (`/sentiment`, "
        f"{d['settings']['rate']['text']:.0f} req/s) |"), "explain load: rates"),
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"| one prediction, idle server (median) | {explain_cost(d, 'image')['predict']['median_ms']:.1f} ms | "
        f"{explain_cost(d, 'text')['predict']['median_ms']:.1f} ms |"), "explain load: one prediction"),
    Figure("docs/serving.md", EXPLAIN, explanation_cost_row, "explain load: one explanation"),
    Figure("docs/serving.md", EXPLAIN, explain_table_row("predict p50 / p95 / p99 alone", "predict_alone"),
           "explain load: predict alone"),
    Figure("docs/serving.md", EXPLAIN, explain_table_row(
        "... with 8 clients sending explanations back to back", "with_explain_load_default"),
        "explain load: predict with explanations"),
    Figure("docs/serving.md", EXPLAIN, explain_table_row(
        "... the same, explain process at the predict path's priority (`EXPLAIN_NICE=0`)",
        "with_explain_load_explain_nice_0"), "explain load: nice 0"),
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"| explanations answered meanwhile (the rest: 429) | {explained(d, 'image')} | {explained(d, 'text')} |"),
        "explain load: explanations answered"),
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"predict p99 rose by {p99_rise(d, 'image')[1] - p99_rise(d, 'image')[0]:.2g} ms "
        f"({p99_rise(d, 'image')[0]:.1f} → {p99_rise(d, 'image')[1]:.1f} ms); for text by "
        f"{p99_rise(d, 'text')[1] - p99_rise(d, 'text')[0]:.2g} ms ({p99_rise(d, 'text')[0]:.1f} → "
        f"{p99_rise(d, 'text')[1]:.1f} ms)"), "explain load: p99 rise"),
    # serving.md: how often an answer below the abstention threshold is right, on each model's test set
    *(Figure("docs/serving.md", f"docs/results/calibration/{name}.json", lambda d, what=what: (
        f"{whole(100 * d['sets']['test']['accuracy_below_threshold'])} % {what} "
        f"({whole(100 * d['sets']['test']['accuracy_above_threshold'])} % above it)"), f"abstention: {name}")
      for name, what in (("fashion-cnn", "of the time for images"), ("sentiment-bert", "for text"))),
    # deploy.md: the compose stack's last runs (tests/test_compose_up.py's figures)
    Figure("docs/deploy.md", COMPOSE, lambda d: f"**9 passed in {whole(d['durations_s']['total'])} s**", "compose run"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        "| images (cached; a first build takes minutes more, its timings not kept) | "
        f"{whole(d['durations_s']['images'])} s |"), "compose: images"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        f"(the replicas first, then nginx and Prometheus) | {whole(d['durations_s']['up_to_healthy'])} s |"),
        "compose: up"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        f"four replicas starting at once on 2 cores) | {span(d['replica_start_to_ready_s'].values(), ' s')} |"),
        "compose: replica start"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        f"Prometheus saw the target down after {whole(d['replica_kill']['target_down_after_s'])} s; "
        f"`ServableReplicaDown` (severity `page`) in Alertmanager after "
        f"{whole(d['replica_kill']['alert_in_alertmanager_after_s'])} s"), "compose: replica killed"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        f"| {d['rollout']['requests']:,} requests, all 200; p50 {1000 * d['rollout']['p50_s']:.0f} ms, p99 "
        f"{1000 * d['rollout']['p99_s']:.0f} ms; image {rollout_s(d, 'rollout image')} s, text "
        f"{rollout_s(d, 'rollout text')} s, back {rollout_s(d, 'rollback image')} s and "
        f"{rollout_s(d, 'rollback text')} s |"), "compose: roll-out"),
    Figure("docs/deploy.md", COMPOSE, lambda d: f"| `down -v` | {whole(d['durations_s']['down'])} s;", "compose: down"),
    Figure("docs/deploy.md", COMPOSE, lambda d: (
        f"| {whole(d['images']['servable']['size_mb'])} MB | {d['images']['servable']['user']}, read-only root | "
        f"{replica_memory(d, 'image')}; {replica_memory(d, 'text')} |"), "compose: replica image"),
    Figure("docs/deploy.md", COMPOSE, lambda d: f"the CPU image is {whole(d['images']['servable']['size_mb'])} MB in",
           "compose: CPU image, Dockerfile section"),
    *(Figure("docs/deploy.md", COMPOSE, lambda d, name=name: f"| {whole(d['images'][name]['size_mb'])} MB |",
             f"compose: {name} image") for name in ("nginx", "prometheus", "alertmanager")),
    Figure("docs/deploy.md", COMPOSE_FRESH, lambda d: (
        f"(images cached: {whole(d['durations_s']['images'])} s). Every service healthy "
        f"{whole(d['durations_s']['up_to_healthy'])} s after `up`, each replica ready in "
        f"{span(d['replica_start_to_ready_s'].values(), ' s')}, the revoked key refused at once, the killed replica's "
        f"target down after {whole(d['replica_kill']['target_down_after_s'])} s and its alert in Alertmanager after "
        f"{whole(d['replica_kill']['alert_in_alertmanager_after_s'])} s, roll-out and back under load "
        f"{d['rollout']['requests']:,} requests all 200 (p99 {1000 * d['rollout']['p99_s']:.0f} ms), `down -v` "
        f"{whole(d['durations_s']['down'])} s with nothing left"), "compose from a fresh clone"),
    # training.md: the calibration and faithfulness tables, rendered from their JSON, and the gallery's runs
    *(rendered(module, name) for module in ("calibration", "faithfulness")
      for name in ("fashion-cnn", "sentiment-bert")),
    Figure("docs/training.md", "docs/results/faithfulness/fashion-cnn.json", lambda d: (
        f"it beats both baselines on {beats_both(d, 'background [0.0, 0.0, 0.0]')} of the images). With the image mean "
        f"as the mask, its order beats both baselines ({beats_both(d, 'image mean (older)')} of the images)"),
        "faithfulness: image wins"),
    Figure("docs/training.md", "docs/results/faithfulness/sentiment-bert.json", lambda d: (
        f"the explanation beats both baselines on {beats_both(d, 'token [MASK]')} of the texts either way"),
        "faithfulness: text wins"),
    Figure("docs/training.md", GALLERY.format("image"), lambda d: (
        f"({d['accuracy']:.4f} on the {d['test_examples']:,} Fashion-MNIST test images for `{d['model']}`"),
        "gallery: image run"),
    Figure("docs/training.md", GALLERY.format("text"), lambda d: (
        f"{d['accuracy']:.4f} on the {d['test_examples']:,} test sentences for `{d['model']}`)"), "gallery: text run"),
    # training.md: make limited-data's table
    *(Figure("docs/training.md", LIMITED, limited_row(label), f"limited data: {LIMITED_ROWS[label]}")
      for label in LIMITED_ROWS),
    # loadtest.md: the published run of make loadtest (its verdict file records no machine)
    Figure("docs/loadtest.md", LOADTEST, lambda d: (
        f"{endpoint(d, 'Aggregated')['requests']} requests, {endpoint(d, 'Aggregated')['failures']} failures, "
        f"**SLO {'PASSED' if d['passed'] else 'FAILED'}**; p95 from {min(e['p95_ms'] for e in routes(d))} ms "
        f"(image upload) to {max(e['p95_ms'] for e in routes(d))} ms (eight sentences), p99 at most "
        f"{max(e['p99_ms'] for e in routes(d))} ms"), "published load test"),
    # serving.md: an explain process's memory, from make explain-load
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"each explain process held {mem(d, 'image', 'explain_processes')} (image) and "
        f"{mem(d, 'text', 'explain_processes')} (text), beside {mem(d, 'image', 'http_workers')} and "
        f"{mem(d, 'text', 'http_workers')} for each HTTP worker"), "explain process memory"),
]  # fmt: skip


def sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{1,4} )", text)


def cited(section: str, source: str) -> bool:
    """The section names the results file: its path, or a link relative to docs/."""
    return source in section or source.removeprefix("docs/") in section


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f"{Path(f.doc).name}: {f.what}")
def test_quoted_figure_is_the_results_figure(figure):
    data = results(figure.source)
    quote = re.sub(r"\s*\n\s*", " ", figure.quote(data))  # a rendered table's rows, as the page reads flat
    text = (ROOT / figure.doc).read_text()
    flat = re.sub(r"\s*\n\s*", " ", text)
    assert quote in flat, f"{figure.doc} does not quote {figure.source} as it is: expected\n  {quote}"
    section = next(s for s in sections(text) if quote in re.sub(r"\s*\n\s*", " ", s))
    assert cited(section, figure.source), f"{figure.doc}: the section quoting '{quote}' never names {figure.source}"
    machine = machine_of(data)
    if machine:
        assert machine in section, f"{figure.doc}: {figure.source} was measured on {machine}; its section says not"
        # a paragraph, a list item or a table row; a whole table (rendered) is its own block
        pieces = re.split(r"\n\s*\n|\n(?=\s*- |\|)", text) + re.split(r"\n\s*\n", text)
        paragraph = next(p for p in pieces if quote in re.sub(r"\s*\n\s*", " ", p))
        others = [m for m in MACHINES if m != machine and m in paragraph and machine not in paragraph]
        assert not others, f"{figure.doc}: a figure of {machine} ({figure.source}) in a paragraph naming {others}"


def test_every_results_file_the_docs_cite_is_committed():
    """A page that cites docs/results/<file>.json as a source must have it in the repository."""
    missing = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for path in re.findall(r"(?:docs/)?results/[\w./-]+\.json", doc.read_text()):
            full = path if path.startswith("docs/") else f"docs/{path}"
            if not (ROOT / full).exists():
                missing.add(f"{doc.name}: {full}")
    assert not missing, sorted(missing)
