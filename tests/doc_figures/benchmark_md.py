"""Figures of benchmark.md: the reference run, its targets and history, memory, profiles, admission."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from tests.doc_figures.common import BENCH, ROOT, Figure, bench_c32, int8_gain, point, results, rps, share, whole

BENCH_QUIET = "docs/results/benchmark-quiet/benchmark.json"  # the split design's history run, 2026-11-25
PROFILES = "docs/results/profiles/profiles.json"

MEMORY, MEMORY_FINAL = "docs/results/memory/memory.json", "docs/results/memory/final-tree.json"
MEMORY_PHASES = (("at_rest", "at rest"), ("after_one_explanation", "after one explanation"))

ADMISSION = "docs/results/benchmark/admission/ratios.json"


def target(data: dict, model: str, name_start: str) -> dict:
    return next(
        t for m in data["models"] if m["model"] == model for t in m["targets"] if t["name"].startswith(name_start)
    )


def rss(d: dict, run: str, phase: str, model: str) -> float:
    return d["runs"][run]["phases"][phase][model]["rss_mib"]


def memory_row(model: str, phase: str, label: str) -> Callable[[dict], str]:
    """A row of the memory table: before, after (its share of before), after + the recommended change."""

    def row(d: dict) -> str:
        before, after, rec = (rss(d, run, phase, model) for run in ("before", "after", "after_with_recommended"))
        bold = "**" if phase == "at_rest" else ""
        return (f"| {model}, {label} | {before:.0f} | {bold}{after:.0f} ({share(after, before)}){bold} | "
                f"{rec:.0f} ({share(rec, before)}) |")  # fmt: skip

    return row


def role_rss(d: dict, run: str, phase: str, model: str, role: str) -> float:
    """The RSS of every process of a role in a replica, together."""
    return sum(p["rss_mib"] for p in d["runs"][run]["phases"][phase][model]["processes"] if p["role"] == role)


def memory_reading(d: dict) -> str:
    """benchmark.md's reading of the memory table: what the change took away at rest."""
    at_rest = {m: (rss(d, "before", "at_rest", m), rss(d, "after", "at_rest", m)) for m in ("image", "text")}
    gone = " / ".join(whole(role_rss(d, "before", "at_rest", m, "explain_process")) for m in ("image", "text"))
    trackers = {whole(role_rss(d, "before", "at_rest", m, "resource_tracker")) for m in ("image", "text")}
    (tracker,) = trackers  # one figure for both models, as the page says it
    return (f"(image {at_rest['image'][0]:.0f} → {at_rest['image'][1]:.0f} MiB, text {at_rest['text'][0]:.0f} → "
            f"{at_rest['text'][1]:.0f} MiB): the two explain processes ({gone} MiB) and their resource trackers "
            f"({tracker} MiB) are gone, nothing else moved. PSS falls less "
            f"({share(pss_both(d, 'after'), pss_both(d, 'before'))} for both replicas)")  # fmt: skip


def admission_spread(d: dict) -> str:
    """How far apart the rounds of one tree are: the old tree's image ratios."""
    old = [r["ratio"] for r in d["image/old"]]
    return (f"The rounds of one tree differ by up to {100 * (max(old) / min(old) - 1):.0f} % (the old tree's image "
            f"runs: {min(old):.2f} and {max(old):.2f})")  # fmt: skip


def admission_new(d: dict, model: str, key: str, form: str = ".2f") -> str:
    return " and ".join(f"{r[key]:{form}}" for r in d[f"{model}/new"])


def admission_first_100(d: dict) -> str:
    """The first 100 requests' p99 after ready against the steady p99, each round."""
    worst = max(r["first_over_steady"] for m in ("image", "text") for r in d[f"{m}/new"])
    return (
        f"image p99 {admission_new(d, 'image', 'first100_p99', '.0f')} ms against the steady "
        f"{admission_new(d, 'image', 'served_p99', '.0f')} ms; text {admission_new(d, 'text', 'first100_p99', '.0f')} "
        f"ms against {admission_new(d, 'text', 'served_p99', '.0f')} ms; at most {worst:.2f} times the steady p99"
    )


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


def final_tree_row(model: str, phase: str, label: str, run: str = "final") -> Callable[[dict], str]:
    def row(d: dict) -> str:
        before, final = rss(d, "before", phase, model), rss(d, run, phase, model)
        ratio = f" {share(final, before)} " if phase == "at_rest" else " "
        return f"| {model}, {label} | {before:.0f} | {final:.0f} |{ratio}|"

    return row


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


def rps_p99(d: dict, model: str, config: str) -> str:
    """A row's cell of the reference table: req/s (p99 ms) at 32 clients."""
    p = bench_c32(d, model, config)
    return f"{whole(p['rps'])} ({p['p99_ms']:.0f})"


SPLIT, PEER = "served fp32 split (old design)", "fastapi+ort peer"


def over(d: dict, model: str, base: str, config: str = "served default") -> str:
    """A config's req/s at 32 clients over another's, as the reading prints it."""
    return f"{bench_c32(d, model, config)['rps'] / bench_c32(d, model, base)['rps']:.1f}x"


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
    # benchmark.md: the admission rounds' reading
    Figure("docs/benchmark.md", ADMISSION, admission_spread, "admission: spread of rounds"),
    Figure("docs/benchmark.md", ADMISSION, lambda d: (
        f"image {admission_new(d, 'image', 'on_over_off')}, text {admission_new(d, 'text', 'on_over_off')}. The "
        "target of"), "admission: timing headers on / off"),
    Figure("docs/benchmark.md", ADMISSION, admission_first_100, "admission: first 100 requests"),
    # benchmark.md: how long the reference run took, and the readings of its figures in the prose
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"--out docs/results/benchmark` ({d['elapsed_s'] / 60:.1f} min), AMD EPYC"), "reference run: duration"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"({d['elapsed_s'] / 60:.1f} min on the reference machine, an AMD EPYC: elapsed_s in {BENCH})"),
        "reference run: duration, make benchmark"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"one client sees {point(d, 'image', 'served default', 1)['p50_ms']:.1f} ms for an image"),
        "batcher without a window: one client"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"took the p99 to {bench_c32(d, 'image', 'served default')['p99_ms']:.0f} ms"), "gc.freeze: p99 after"),
    Figure("docs/benchmark.md", BENCH, lambda d: (
        f"the same settings measured {rps(d, 'text', 'served default')} and "
        f"{rps(d, 'text', 'served int8 inprocess batching on')} texts/s in this run"), "text: two runs of the default"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        f"`python -m loadtest.benchmark --out docs/results/benchmark-quiet` ({d['elapsed_s'] / 60:.1f} min)"),
        "history: duration"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        "without batching it was far worse (p99 {:.1f} s, {} errors)".format(*next(
            (p["p99_ms"] / 1000, p["errors"]) for m in d["models"] if m["model"] == "text" for p in m["points"]
            if p["config"] == "served fp32 batching off @70%"))), "history: text at 70 %, batching off"),
    Figure("docs/benchmark.md", BENCH_QUIET, lambda d: (
        "much faster than under load ({} images/s, {} texts/s at batch 1)".format(
            *(whole(p["items_s"]) for m in d["models"] for p in m["points"] if p["config"] == "raw ORT fp32 b1"))),
        "history: raw ORT at batch 1"),
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
    Figure("docs/benchmark.md", MEMORY, memory_reading, "memory: at rest, reading"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"one worker has its child ({each(d, 'after', 'after_one_explanation', 'image', 'explain_process')} MiB "
        f"image, {each(d, 'after', 'after_one_explanation', 'text', 'explain_process')} MiB text, plus "
        f"{each(d, 'after', 'after_one_explanation', 'image', 'resource_tracker')} MiB for the tracker)"),
        "memory: after one explanation, reading"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        "load reached both workers: "
        f"{d['runs']['after_with_recommended']['phases']['under_load']['image']['largest_total_rss_mib']:.0f} MiB;"),
        "memory: both workers explaining"),
    Figure("docs/benchmark.md", MEMORY, lambda d: (
        f"the arbiter goes from {each(d, 'after', 'at_rest', 'image', 'arbiter')} to "
        f"{each(d, 'after_with_recommended', 'at_rest', 'image', 'arbiter')} MiB and a replica at rest to "
        f"{share(rss(d, 'after_with_recommended', 'at_rest', 'image'), rss(d, 'before', 'at_rest', 'image'))} (image) "
        f"and {share(rss(d, 'after_with_recommended', 'at_rest', 'text'), rss(d, 'before', 'at_rest', 'text'))} (text) "
        "of before"), "memory: the recommended change, reading"),
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
]  # fmt: skip


# The photo mix, the production topology and even connections (2026-12-06): the tree with balanced accept, and
# the commit before it (the event loop's accept), each one run of the same command.
PHOTO_PROXY = "docs/results/benchmark/photo-proxy/after/benchmark.json"
PHOTO_PROXY_BEFORE = "docs/results/benchmark/photo-proxy/before/benchmark.json"
PHOTO_PROXY_TARGETS = (  # (model, the target's name as the report writes it, up to its goal; the page's words)
    ("image", "served default req/s at 32 clients ≥ 1.6x", "bundled images: req/s ≥ 1.6 × the peer's"),
    ("image", "served default p99 at 32 clients ≤", "bundled images: p99 ≤ the peer's"),
    ("image", "served default [photo mix] req/s at 32 clients ≥", "photo mix: req/s ≥ 2.2 × the peer's"),
    ("image", "served default [photo mix] p99 at 32 clients ≤", "photo mix: p99 ≤ the peer's"),
    ("image", "p99 ≤ 3x p50 at 70 % of saturation (served default)", "bundled images: p99 ≤ 3 × p50 at 70 %"),
    ("image", "p99 ≤ 3x p50 at 70 % of saturation (served default [photo mix])", "photo mix: p99 ≤ 3 × p50 at 70 %"),
    ("image", "served default via nginx TLS x2 at 32", "behind nginx (TLS), 2 replicas: ≥ 0.9 of direct"),
    ("image", "served default via nginx TLS x2 / ", "behind nginx: the lead over the peer ≥ 0.9 of direct"),
    ("text", "served default req/s at 32 clients ≥ 2.5x", "req/s ≥ 2.5 × the peer's"),
    ("text", "served default p99 at 32 clients ≤", "p99 ≤ the peer's"),
    ("text", "p99 ≤ 3x p50 at 70 % of saturation (served default)", "p99 ≤ 3 × p50 at 70 %"),
    ("text", "served default via nginx TLS x2 at 32", "behind nginx (TLS), 2 replicas: ≥ 0.9 of direct"),
    ("text", "served default via nginx TLS x2 / ", "behind nginx: the lead over the peer ≥ 0.9 of direct"),
)


def photo_proxy_target(model: str, name_start: str, words: str) -> Callable[[dict], str]:
    """A row of the section's targets table: the target's figures compared, its ratio and verdict."""

    def row(d: dict) -> str:
        t = target(d, model, name_start)
        met = {True: "yes", False: "no", None: "n/a"}[t["met"]]
        return f"| {model} | {words} | {t['measured']} | {t['ratio']} | {met} |"

    return row


def open_loop_row(label: str) -> Callable[[dict], str]:
    """A row of the section's before/after table: each open-loop point at 70 %, p50 / p99 and failed requests."""

    def row(d: dict) -> str:
        cells = [f"{p['p50_ms']:.0f} / {p['p99_ms']:.0f} ({p['p99_ms'] / p['p50_ms']:.1f}), {p['errors']}"
                 for m in d["models"] for p in m["points"] if p["kind"] == "served-open"]  # fmt: skip
        return f"| {label} | " + " | ".join(cells) + " |"

    return row


def host_cpu(d: dict) -> str:
    """The host's CPU share during the proxied points, lowest-highest."""
    shares = [p["host_cpu"] for m in d["models"] for p in m["points"] if p.get("host_cpu") is not None]
    low, high = f"{100 * min(shares):.0f}", f"{100 * max(shares):.0f}"
    return f"{low} %" if low == high else f"{low}-{high} %"


def served_32(d: dict, model: str, config: str) -> dict:
    """A closed-loop point at 32 clients, whatever its request format."""
    return next(p for m in d["models"] if m["model"] == model for p in m["points"]
                if p["config"] == config and p["concurrency"] == 32)  # fmt: skip


def tails(d: dict) -> str:
    """Each open-loop point's p99 / p50 at 70 %, in the page's order: bundled images, photo mix, text."""
    return ", ".join(f"{p['p99_ms'] / p['p50_ms']:.1f}" for m in d["models"] for p in m["points"]
                     if p["kind"] == "served-open")  # fmt: skip


def photo_mix_cost(d: dict) -> str:
    served, photo = (served_32(d, "image", c) for c in ("served default", "served default [photo mix]"))
    peer, peer_photo = (served_32(d, "image", c) for c in ("fastapi+ort peer", "fastapi+ort peer [photo mix]"))
    lead = target(d, "image", "served default [photo mix] req/s at 32 clients ≥")["ratio"].split(", ")[1]
    return (
        f"throughput ({whole(photo['rps'])} against {whole(served['rps'])} req/s) and the peer about "
        f"{100 * (1 - peer_photo['rps'] / peer['rps']):.0f} %. Its lead over the peer is {lead} (target 2.2: not "
        f"met), with a lower p99 ({photo['p99_ms']:.0f} against {peer_photo['p99_ms']:.0f} ms)"
    )


def proxied(d: dict, model: str, name_start: str) -> list[str]:
    """A proxied target's ratios: [drift-corrected, as measured] or its one ratio."""
    return [r.split(" ")[0] for r in target(d, model, name_start)["ratio"].split(", ")]


FIGURES += [
    Figure("docs/benchmark.md", PHOTO_PROXY_BEFORE, lambda d: (
        f"reached {rps(d, 'image', 'served default')} req/s at 32 clients against"), "accept fix: before"),
    Figure("docs/benchmark.md", PHOTO_PROXY, lambda d: f"against {rps(d, 'image', 'served default')} after it",
           "accept fix: after"),
    Figure("docs/benchmark.md", PHOTO_PROXY, lambda d: (
        "p99 / p50 was {} for the bundled images, {} for the photo mix and {} for text.".format(*tails(d).split(", "))),
        "tails at 70 %, after"),
    Figure("docs/benchmark.md", PHOTO_PROXY_BEFORE, lambda d: (
        "Before the fix the figures were {}, {} and {}, so".format(*tails(d).split(", "))), "tails at 70 %, before"),
    Figure("docs/benchmark.md", PHOTO_PROXY, photo_mix_cost, "photo mix: its cost"),
    Figure("docs/benchmark.md", PHOTO_PROXY, lambda d: (
        f"kept {proxied(d, 'image', 'served default via nginx TLS x2 at 32')[1]} of the direct figure (target 0.9: "
        f"not met). Text kept {proxied(d, 'text', 'served default via nginx TLS x2 at 32')[1]} as measured, but "
        f"{proxied(d, 'text', 'served default via nginx TLS x2 at 32')[0]} after the machine-drift correction, so its "
        "target is not met either. The lead over the peer behind the same nginx was "
        f"{proxied(d, 'image', 'served default via nginx TLS x2 / ')[0]} of the direct lead for images and "
        f"{proxied(d, 'text', 'served default via nginx TLS x2 / ')[0]} for text"), "behind nginx: reading"),
    *(Figure("docs/benchmark.md", PHOTO_PROXY, photo_proxy_target(*t), f"photo/proxy target: {t[2]}")
      for t in PHOTO_PROXY_TARGETS),
    Figure("docs/benchmark.md", PHOTO_PROXY, open_loop_row("balanced accept"), "open loop at 70 %, after"),
    Figure("docs/benchmark.md", PHOTO_PROXY_BEFORE, open_loop_row("the event loop's accept (`2350bc8`)"),
           "open loop at 70 %, before"),
    Figure("docs/benchmark.md", PHOTO_PROXY, lambda d: f"the host's CPU was {host_cpu(d)} busy", "host CPU, proxied"),
]  # fmt: skip


def raw_speed(d: dict, model: str) -> dict[str, float]:
    """raw ORT fp32 items/s by batch (b1, b4, ...) of one model."""
    return {p["config"].removeprefix("raw ORT fp32 "): p["items_s"] for m in d["models"] if m["model"] == model
            for p in m["points"] if p["config"].startswith("raw ORT fp32")}  # fmt: skip


def slower_machine(d: dict) -> str:
    """How much slower the history run's machine (benchmark-quiet) was per raw ORT call than the reference run's."""
    quiet = results(BENCH_QUIET)
    ratios = {(m, b): raw_speed(d, m)[b] / raw_speed(quiet, m)[b] for m in ("image", "text") for b in ("b1", "best")
              if b == "b1"} | {(m, "best"): max(raw_speed(d, m).values()) / max(raw_speed(quiet, m).values())
                               for m in ("image", "text")}  # fmt: skip
    text = max(ratios["text", "b1"], ratios["text", "best"])
    return (f"{min(ratios.values()):.1f}-{max(ratios.values()):.1f}x slower per raw ORT fp32 call than this AMD EPYC: "
            f"{ratios['image', 'b1']:.1f}x for an image at batch 1, {ratios['image', 'best']:.1f}x at its best batch, "
            f"{text:.1f}x for text")  # fmt: skip


CORE_REDESIGN = "docs/results/core-redesign/"


def rounds_row(label: str, key: str, with_ratio: bool = True) -> Callable[[dict], str]:
    """A row of a core-redesign table: each round's served / peer req/s (= ratio), and the median ratio."""

    def row(d: dict) -> str:
        rounds = d[key]["rounds"]
        cells = [f"{whole(r['served_rps'])} / {whole(r['peer_rps'])}" + (f" = {r['ratio']:.2f}" if with_ratio else "")
                 for r in rounds]  # fmt: skip
        joined = " | ".join(cells) if with_ratio else ", ".join(cells)
        return f"| {label} | {joined} | **{d[key]['median_ratio']:.2f}** |"

    return row


def own_drop(d: dict) -> str:
    """The image served default's own req/s, new against old, lower by this much in the rounds where it fell."""
    drops = [1 - n["served_rps"] / o["served_rps"] for n, o in zip(d["image/new"]["rounds"], d["image/old"]["rounds"],
                                                                   strict=True)]  # fmt: skip
    fell = [x for x in drops if x >= 0.05]
    return f"{100 * min(fell):.0f}-{100 * max(fell):.0f} %"


def core_run(name: str) -> dict:
    return results(f"{CORE_REDESIGN}{name}.json")


def c32(d: dict, model: str, config: str) -> float:
    return next(p["rps"] for m in d["models"] if m["model"] == model for p in m["points"]
                if p["config"] == config and p["concurrency"] == 32)  # fmt: skip


def header_once(d: dict) -> str:
    """The two alternating rounds of the header-once change, old → new, and the peer's range across the four runs."""
    runs = [d] + [core_run(f"header-once-{n}") for n in ("new-1", "old-2", "new-2")]
    served = [whole(c32(r, "image", "served default")) for r in runs]
    peer = [c32(r, "image", "fastapi+ort peer") for r in runs]
    return (
        f"served default {served[0]} → {served[1]} and {served[2]} → {served[3]} req/s at 32 clients. The FastAPI "
        f"peer's own figures moved from {whole(min(peer))} to {whole(max(peer))} req/s across these four runs"
    )


def served_peer(d: dict, model: str) -> str:
    served, peer = c32(d, model, "served default"), c32(d, model, "fastapi+ort peer")
    return f"{whole(served)} / {whole(peer)} = {served / peer:.2f}"


FIGURES += [
    Figure("docs/benchmark.md", BENCH, slower_machine, "the history run's machine against the reference run's"),
    *(Figure("docs/benchmark.md", f"{CORE_REDESIGN}{file}.json", rounds_row(label, key, file != "loop-mend-ratios"),
             f"core redesign {file}: {label}")
      for file, rows in (
          ("ratios", (("image, before", "image/old"), ("image, redesign", "image/new"),
                      ("text, before", "text/old"), ("text, redesign", "text/new"))),
          ("final-ratios", (("image, before the redesign", "image/old"), ("image, final tree", "image/new"),
                            ("text, before the redesign", "text/old"), ("text, final tree", "text/new"))),
          ("loop-mend-ratios", (("image, before the redesign", "image/old"), ("image, mended tree", "image/new"),
                                ("text, before the redesign", "text/old"), ("text, mended tree", "text/new"))))
      for label, key in rows),
    Figure("docs/benchmark.md", f"{CORE_REDESIGN}ratios.json", lambda d: (
        f"the served default's own req/s {own_drop(d)} lower in rounds 1 and 3"), "core redesign: image's own drop"),
    Figure("docs/benchmark.md", f"{CORE_REDESIGN}final-ratios.json", lambda d: (
        f"its own req/s {own_drop(d)} lower in every round"), "final tree: image's own drop"),
    Figure("docs/benchmark.md", f"{CORE_REDESIGN}header-once-old-1.json", header_once, "header once: rounds"),
    Figure("docs/benchmark.md", f"{CORE_REDESIGN}calibrated-head-new.json", lambda d: (
        f"image {served_peer(d, 'image')} against {served_peer(core_run('calibrated-head-old'), 'image')}, "
        f"text {served_peer(d, 'text')} against {served_peer(core_run('calibrated-head-old'), 'text')}"),
        "calibrated head"),
]  # fmt: skip

FIGURES += [
    Figure("docs/deployment-answers.md", BENCH, lambda d: (
        f"the default serves {over(d, 'image', PEER)} the FastAPI + ORT peer's images/s and "
        f"{over(d, 'text', PEER)} its texts/s at 32 clients"), "the default against the FastAPI + ORT peer"),
]  # fmt: skip

# shadow scoring's cost: the served default with and without a 10 % shadow share, and the peer, in one run
SHADOW_RUNS = {"1": "docs/results/benchmark/shadow-cost/benchmark.json",
               "2": "docs/results/benchmark/shadow-cost/run2/benchmark.json",
               "3": "docs/results/benchmark/shadow-cost/run3/benchmark.json"}  # fmt: skip
SHADOW_NICE0 = "docs/results/benchmark/shadow-cost/run3-nice0/benchmark.json"
SHADOW = "served default, shadow 10%"


def shadow_row(run: str, model: str) -> Callable[[dict], str]:
    def quote(d: dict) -> str:
        cells = [bench_c32(d, model, c) for c in ("served default", SHADOW, PEER)]
        return f"| {run} | {model} | " + " | ".join(f"{whole(p['rps'])}, {whole(p['p99_ms'])} ms" for p in cells) + " |"

    return quote


def shadow_change(d: dict, model: str, key: str) -> float:
    return bench_c32(d, model, SHADOW)[key] / bench_c32(d, model, "served default")[key] - 1


FIGURES += [
    *(Figure("docs/benchmark.md", path, shadow_row(run, model), f"shadow cost, run {run}, {model}")
      for run, path in SHADOW_RUNS.items() for model in ("image", "text")),
    Figure("docs/benchmark.md", SHADOW_RUNS["1"], lambda d: (
        f"(image {-shadow_change(d, 'image', 'rps'):.1%} lower, text {shadow_change(d, 'text', 'rps'):.0%} higher: "
        f"noise) and raised p99 by\n{shadow_change(d, 'image', 'p99_ms'):.0%} (image) and "
        f"{shadow_change(d, 'text', 'p99_ms'):.0%} (text)").replace("%", " %"), "shadow cost, run 1 changes"),
    Figure("docs/benchmark.md", SHADOW_RUNS["3"], lambda d: (
        f"the image throughput ({shadow_change(d, 'image', 'rps'):.0%} higher) and p99 "
        f"({shadow_change(d, 'image', 'p99_ms'):.0%} higher), and it cost texts "
        f"{-shadow_change(d, 'text', 'rps'):.0%} of their\nthroughput and "
        f"{shadow_change(d, 'text', 'p99_ms'):.0%} on p99").replace("%", " %"),
        "shadow cost, run 3 changes"),
    Figure("docs/benchmark.md", SHADOW_NICE0, lambda d: (
        f"{whole(bench_c32(d, 'text', 'served default')['rps'])} → "
        f"{whole(bench_c32(d, 'text', SHADOW)['rps'])} texts/s "
        f"and p99 {whole(bench_c32(d, 'text', 'served default')['p99_ms'])} → "
        f"{whole(bench_c32(d, 'text', SHADOW)['p99_ms'])} ms"), "shadow cost, lane at nice 0"),
]  # fmt: skip

# shadow scoring's cost in alternating rounds (python -m loadtest.setting_cost --shadow-share 0.1)
SHADOW_ROUNDS = "docs/results/benchmark/shadow-cost/rounds/shadow_cost.json"
SHADOW_WAIT50 = "docs/results/benchmark/shadow-cost/rounds-wait50/shadow_cost.json"  # an experiment, not kept


def shadow_on(d: dict, model: str) -> list[dict]:
    return [p for p in d["models"][model]["points"] if p["label"] == "on"]


def shadow_lane_share(d: dict, model: str) -> float:
    on = shadow_on(d, model)
    return sum(p["worker_cpu_s"].get("nice 19", 0) for p in on) / sum(sum(p["worker_cpu_s"].values()) for p in on)


def shadow_scored(d: dict, model: str) -> tuple[float, float]:
    on = shadow_on(d, model)
    scored = sum(p["shadow"]["servable_shadow_scored_total"] for p in on)
    return scored, scored + sum(p["shadow"]["servable_shadow_dropped_total"] for p in on)


def shadow_rounds_row(model: str) -> Callable[[dict], str]:
    def quote(d: dict) -> str:
        s = d["models"][model]["summary"]
        scored, sampled = shadow_scored(d, model)
        return (f"| {model} | {whole(s['off']['rps'])}, {s['off']['p99_ms']} ms | {whole(s['on']['rps'])}, "
                f"{s['on']['p99_ms']} ms | {s['rps_on_over_off']:.3f}, {s['p99_on_over_off']:.3f} | "
                f"{100 * shadow_lane_share(d, model):.1f} % | {scored:,.0f} of {sampled:,.0f} |")  # fmt: skip

    return quote


FIGURES += [
    *(Figure("docs/benchmark.md", SHADOW_ROUNDS, shadow_rounds_row(m), f"shadow rounds, {m}")
      for m in ("image", "text")),
    Figure("docs/benchmark.md", SHADOW_ROUNDS, lambda d: (
        f"(image {1 - d['models']['image']['summary']['rps_on_over_off']:.0%} lower, text "
        f"{1 - d['models']['text']['summary']['rps_on_over_off']:.0%}); **p99 sits at its edge**\n"
        f"  ({d['models']['image']['summary']['p99_on_over_off'] - 1:.0%} and "
        f"{d['models']['text']['summary']['p99_on_over_off'] - 1:.0%} higher)").replace("%", " %"),
        "shadow rounds, changes"),
    Figure("docs/benchmark.md", SHADOW_ROUNDS, lambda d: (
        f"the lane scored only {shadow_scored(d, 'text')[0] / shadow_scored(d, 'text')[1]:.0%} of the sampled text rows"
    ).replace("%", " %"), "shadow rounds, the text lane starves"),
    Figure("docs/benchmark.md", SHADOW_WAIT50, lambda d: (
        f"image {d['models']['image']['summary']['rps_on_over_off']:.3f} of the throughput and "
        f"{d['models']['image']['summary']['p99_on_over_off']:.3f} times the p99 of shadow off, text "
        f"{d['models']['text']['summary']['rps_on_over_off']:.3f} and "
        f"{d['models']['text']['summary']['p99_on_over_off']:.3f}"), "shadow rounds, a 50 ms gathering wait"),
    Figure("docs/serving.md", SHADOW_ROUNDS, lambda d: (
        f"throughput {d['models']['image']['summary']['rps_on_over_off']:.3f}\n(image) and "
        f"{d['models']['text']['summary']['rps_on_over_off']:.3f} (text) of shadow off, p99 "
        f"{d['models']['image']['summary']['p99_on_over_off']:.3f} and "
        f"{d['models']['text']['summary']['p99_on_over_off']:.3f} times; the saturated text lane scored "
        f"{shadow_scored(d, 'text')[0] / shadow_scored(d, 'text')[1]:.0%}").replace("%", " %"),
        "shadow rounds in serving.md"),
]  # fmt: skip

# the commit before the redesign against the current tree, the peer in each round (loadtest.setting_cost --off-rev)
TEXT_ROUNDS = "docs/results/core-redesign/text-rounds.json"
IMAGE_ROUNDS = "docs/results/core-redesign/image-rounds.json"
ROUNDS_LABELS = (
    ("off", "before the redesign (`9e95637`)"), ("on", "current tree"), ("peer", "FastAPI + ORT peer"),
)  # fmt: skip


def rounds_row(side: str, label: str, model: str) -> Callable[[dict], str]:
    def quote(d: dict) -> str:
        s = d["models"][model]["summary"]
        ratio = "1" if side == "peer" else f"{s[f'{side}_over_peer']:.2f}"
        return f"| {label} | {whole(s[side]['rps'])} | {s[side]['p99_ms']:.1f} ms | {ratio} |"

    return quote


def peer_change(s: dict) -> float:
    """A setting_cost summary's change in the ratio to the peer, on side against off (-0.06: 6 % lower)."""
    return s["on_over_peer"] / s["off_over_peer"] - 1


def text_rounds_keep(d: dict) -> str:
    s = d["models"]["text"]["summary"]
    change = peer_change(s)
    return (
        f"{s['on_over_peer']:.2f} against {s['off_over_peer']:.2f}\n  before the redesign ({change:+.1%}; "
        f"the target was at most 5 % lower), and req/s {s['rps_on_over_off']:.2f} times the older tree's"
    ).replace("%;", " %;")


def image_rounds_lost(d: dict) -> str:
    s = d["models"]["image"]["summary"]
    change = peer_change(s)
    return (
        f"{s['on_over_peer']:.2f} against {s['off_over_peer']:.2f} ({change:+.0%}), its own req/s "
        f"{s['rps_on_over_off']:.2f} times the older tree's"
    ).replace("%)", " %)")


FIGURES += [
    *(Figure("docs/benchmark.md", path, rounds_row(side, label, model), f"{model} rounds, {side}")
      for model, path in (("text", TEXT_ROUNDS), ("image", IMAGE_ROUNDS)) for side, label in ROUNDS_LABELS),
    Figure("docs/benchmark.md", TEXT_ROUNDS, text_rounds_keep, "text rounds, the ratio kept"),
    Figure("docs/benchmark.md", IMAGE_ROUNDS, image_rounds_lost, "image rounds, the ratio lost"),
    Figure("docs/benchmark.md", TEXT_ROUNDS, lambda d: (
        f"{d['models']['text']['summary']['on']['p99_ms']:.1f} against "
        f"{d['models']['text']['summary']['off']['p99_ms']:.1f} ms"), "text rounds, p99"),
]  # fmt: skip

# the timing headers' cost: their rendering over the workers' CPU per answer (loadtest.timing_cost)
TIMING_COST = "docs/results/benchmark/timing-cost/timing_cost.json"


def timing_table(d: dict) -> str:
    rows = ["| model | headers, µs per answer | worker CPU per answer | headers' share |", "|---|---:|---:|---:|"]
    rows += [f"| {m} | {d['headers_us_per_answer']:.1f} | {v['worker_cpu_ms_per_answer']:.2f} ms | "
             f"{100 * v['headers_share_of_cpu']:.2f} % |" for m, v in d["models"].items()]  # fmt: skip
    return "\n".join(rows)


FIGURES += [
    Figure("docs/benchmark.md", TIMING_COST, timing_table, "timing headers, table"),
    Figure("docs/benchmark.md", TIMING_COST, lambda d: (
        f"at most {100 * max(v['headers_share_of_cpu'] for v in d['models'].values()):.2f} % of an answer's worker "
        "CPU"), "timing headers, the bound"),
    Figure("docs/benchmark.md", TIMING_COST, lambda d: ", ".join(
        f"{m} {v['rounds_rps_on_over_off']:.3f}" for m, v in d["models"].items()), "timing headers, the rounds"),
]  # fmt: skip

# open loop at 70 % and 85 % of saturation (loadtest.benchmark --open-loop-loads 0.7 0.85)
OPEN_LOOP_LOADS = "docs/results/benchmark/open-loop-loads/benchmark.json"


def open_loop_rows(d: dict) -> list[dict]:
    return [dict(p, model=m["model"]) for m in d["models"] for p in m["points"] if p["kind"] == "served-open"]


def open_loop_table(d: dict) -> str:
    rows = ["| model | point | req/s | p50 | p99 | p99 / p50 | failed |", "|---|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {p['model']} | {p['config']} | {p['rps']:.0f} | {p['p50_ms']:.1f} ms | {p['p99_ms']:.1f} ms | "
             f"{p['p99_ms'] / p['p50_ms']:.1f} | {p['errors']} of {p['requests']:,} |"
             for p in open_loop_rows(d)]  # fmt: skip
    return "\n".join(rows)


def open_loop_tails(d: dict) -> str:
    at70 = [p for p in open_loop_rows(d) if p["config"].endswith("@70%")]
    name = lambda p: p["config"].removesuffix(" @70%").removeprefix("served default").strip() or "bundled"  # noqa: E731
    return ", ".join(f"{p['model']} {name(p)} {p['p99_ms'] / p['p50_ms']:.1f}" for p in at70)


FIGURES += [
    Figure("docs/benchmark.md", OPEN_LOOP_LOADS, open_loop_table, "open loop 70/85, table"),
    Figure("docs/benchmark.md", OPEN_LOOP_LOADS, open_loop_tails, "open loop 70/85, tails"),
    Figure("docs/benchmark.md", OPEN_LOOP_LOADS, lambda d: next(
        f"{p['p99_ms']:.0f} ms against a p50 of {p['p50_ms']:.0f} ms" for p in open_loop_rows(d)
        if p["model"] == "text" and p["config"].endswith("@85%")), "open loop 70/85, text at 85"),
]  # fmt: skip

# where the slow answers wait (python -m loadtest.tail_parts)
TAIL_PARTS = "docs/results/benchmark/tail-parts/tail_parts.json"
TAIL_COLUMNS = (("latency_ms", "latency"), ("outside_server_ms", "before the route"), ("decode_ms", "decode"),
                ("queue_ms", "queue"), ("model_ms", "model"), ("batch", "batch rows"))  # fmt: skip


def tail_table(d: dict) -> str:
    rows = ["| model, answers | " + " | ".join(label for _, label in TAIL_COLUMNS) + " |",
            "|---|" + "---:|" * len(TAIL_COLUMNS)]  # fmt: skip
    for model, m in d["models"].items():
        for key, label in (("middle", "middle 40-60 %"), ("slowest_1pct", "slowest 1 %")):
            cells = [f"{m[key][c]:.1f}" + ("" if c == "batch" else " ms") for c, _ in TAIL_COLUMNS]
            rows.append(f"| {model}, {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def tail_model(d: dict) -> str:
    return "; ".join(
        f"{model}: {m['middle']['batch']:.1f} rows in {m['middle']['model_ms']:.1f} ms, "
        f"{m['slowest_1pct']['batch']:.1f} in {m['slowest_1pct']['model_ms']:.1f} ms"
        for model, m in d["models"].items())  # fmt: skip


FIGURES += [
    Figure("docs/benchmark.md", TAIL_PARTS, tail_table, "tail parts, table"),
    Figure("docs/benchmark.md", TAIL_PARTS, tail_model, "tail parts, batch and model time"),
    Figure("docs/benchmark.md", TAIL_PARTS, lambda d: (
        f"{d['models']['image']['slowest_1pct']['outside_server_ms']:.1f} ms against "
        f"{d['models']['image']['middle']['outside_server_ms']:.1f} ms"), "tail parts, before the route"),
    Figure("docs/benchmark.md", TAIL_PARTS, lambda d: " and ".join(
        f"{m['p99_ms'] / m['p50_ms']:.1f} ({model})" for model, m in d["models"].items()), "tail parts, ratios"),
]  # fmt: skip

# image in slices (loadtest.setting_cost --slices): every server up, loaded in turn; paired medians
IMAGE_SLICES = "docs/results/core-redesign/image-slices.json"
IMAGE_SLICES_SINCE = "docs/results/core-redesign/image-slices-since-redesign.json"


PAIRED = (
    ("rps_on_over_off_paired", ".3f"),
    ("cpu_per_answer_on_over_off_paired", ".3f"),
    ("p99_on_over_off_paired", ".3f"),
)  # a setting_cost summary's paired medians: req/s, CPU per answer, p99


def summary_row(model: str, label: str, keys) -> Callable[[dict], str]:
    """A table row of a setting_cost summary's figures: `label`, then each (key, format) of `keys`."""

    def quote(d: dict) -> str:
        s = d["models"][model]["summary"]
        return f"| {label} | " + " | ".join(f"{s[k]:{form}}" for k, form in keys) + " |"

    return quote


def slices_row(label: str) -> Callable[[dict], str]:
    return summary_row("image", label, PAIRED)


FIGURES += [
    Figure("docs/benchmark.md", IMAGE_SLICES, slices_row("before the redesign (`9e95637`)"), "image slices, before"),
    Figure("docs/benchmark.md", IMAGE_SLICES_SINCE, slices_row("the redesigned tree before the later work (`c2b50c1`)"),
           "image slices, since the redesign"),
    Figure("docs/benchmark.md", IMAGE_SLICES, lambda d: (
        f"{d['models']['image']['summary']['on_over_peer']:.2f} against "
        f"{d['models']['image']['summary']['off_over_peer']:.2f} before the redesign"), "image slices, peer ratios"),
]  # fmt: skip


def slices_split(d: dict) -> str:
    """The redesign's own CPU cost (before->current over since->current) and the later work's (since->current)."""
    total = d["models"]["image"]["summary"]["cpu_per_answer_on_over_off_paired"]
    later = results(IMAGE_SLICES_SINCE)["models"]["image"]["summary"]["cpu_per_answer_on_over_off_paired"]
    text = (f"costs about {total / later - 1:.0%} of CPU per answer**; the work since it (admission and the\n"
            "  timing record, even accept, the version label, the drift statistics) "
            f"about {later - 1:.0%}")  # fmt: skip
    return text.replace("%", " %")


def slices_loss(d: dict) -> str:
    return f"the loss there is {-peer_change(d['models']['image']['summary']):.0%}".replace("%", " %")


FIGURES += [
    Figure("docs/benchmark.md", IMAGE_SLICES, slices_split, "image slices, the redesign's share and the later work's"),
    Figure("docs/benchmark.md", IMAGE_SLICES, slices_loss, "image slices, the loss in the ratio"),
]

# shadow 10 % on against off in slices (setting_cost --shadow-share 0.1 --slices 12): paired medians
SHADOW_SLICES = {"image": "docs/results/benchmark/shadow-cost/slices-image/shadow_cost.json",
                 "text": "docs/results/benchmark/shadow-cost/slices/shadow_cost.json"}  # fmt: skip


def shadow_slices_row(model: str) -> Callable[[dict], str]:
    return summary_row(model, model, (PAIRED[0], PAIRED[2], PAIRED[1]))


FIGURES += [Figure("docs/benchmark.md", path, shadow_slices_row(m), f"shadow slices, {m}")
            for m, path in SHADOW_SLICES.items()]  # fmt: skip

# both models against the commit before the redesign, in slices, after the drift statistics went to chunks
SLICES_CHUNKED = "docs/results/core-redesign/slices-drift-chunked.json"


def chunked_row(model: str) -> Callable[[dict], str]:
    return summary_row(model, model, (("on_over_peer", ".2f"), ("off_over_peer", ".2f"), *PAIRED))


FIGURES += [Figure("docs/benchmark.md", SLICES_CHUNKED, chunked_row(m), f"slices, drift in chunks, {m}")
            for m in ("image", "text")]  # fmt: skip
FIGURES.append(Figure("docs/benchmark.md", "docs/results/drift_cost.txt", lambda d: (
    f"{d['figures']['image drift in all, counted in chunks (statistics, window, PSI)']} µs per image request in all, "
    f"where the statistics alone cost {d['figures']['image statistics, one request alone']}\nµs"),
    "drift cost in chunks"))  # fmt: skip

# memory at the end of the later work, with the arena shrunk after the warm-up (loadtest.memory, two labels)
MEMORY_NOW = "docs/results/memory/later-work.json"
FIGURES += [Figure("docs/benchmark.md", MEMORY_NOW, final_tree_row(m, phase, label, "current"),
                   f"memory, current tree: {m}, {label}")
            for phase, label in MEMORY_PHASES for m in ("image", "text")]  # fmt: skip
FIGURES.append(Figure("docs/benchmark.md", MEMORY_NOW, lambda d: "held {} (image) and {} (text)".format(
    *(share(rss(d, "before_arena", "at_rest", m), rss(d, "before", "at_rest", m)) for m in ("image", "text"))),
    "memory, before the arena change"))  # fmt: skip
FIGURES.append(Figure("docs/deployment-answers.md", MEMORY_NOW, lambda d: "hold {} (image) and {} (text) of the".format(
    *(share(rss(d, "current", "at_rest", m), rss(d, "before", "at_rest", m)) for m in ("image", "text"))),
    "deployment answers: memory at rest"))  # fmt: skip

# the benchmark after the arena change: the first 100 requests after ready against the steady p99
ARENA_BENCH = "docs/results/benchmark/arena-shrink/benchmark.json"
FIGURES.append(Figure("docs/benchmark.md", ARENA_BENCH, lambda d: "image {} ({}x), text {} ({}x)".format(
    *(x for m in ("image", "text") for t in [target(d, m, "first 100 requests")] for x in (t["measured"], t["ratio"]))),
    "arena change: first 100 requests"))  # fmt: skip

# tails at 70 % with Poisson arrivals, 5 points per input set (python -m loadtest.tail_parts --repeats 5)
TAILS_POISSON = "docs/results/benchmark/tail-parts-poisson/tail_parts.json"
POISSON_PARTS = (("latency_ms", "latency", " ms"), ("outside_server_ms", "before the route", " ms"),
                 ("generator_late_ms", "of it, the generator late", " ms"), ("decode_ms", "decode", " ms"),
                 ("queue_ms", "queue", " ms"), ("model_ms", "model", " ms"), ("batch", "batch rows", ""))  # fmt: skip


def poisson_table(d: dict) -> str:
    rows = ["| input set | points | share sent (median) | p50 | p99 | p99 / p50 | each point's p99 / p50 | failed |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for name, m in d["models"].items():
        s = m["summary"]
        rows.append(f"| {name} | {s['points']} | {s['median_share_sent']:.2f} | {s['median_p50_ms']:.1f} ms | "
                    f"{s['median_p99_ms']:.1f} ms | **{s['median_p99_over_p50']:.2f}** | "
                    f"{', '.join(f'{r:.2f}' for r in s['p99_over_p50_each'])} | {s['failed']} |")  # fmt: skip
    return "\n".join(rows)


def poisson_parts(d: dict) -> str:
    """Medians over the points of the middle and slowest answers' parts."""
    rows = ["| input set, answers | " + " | ".join(label for _, label, _ in POISSON_PARTS) + " |",
            "|---|" + "---:|" * len(POISSON_PARTS)]  # fmt: skip
    for name, m in d["models"].items():
        for key, label in (("middle", "middle 40-60 %"), ("slowest_1pct", "slowest 1 %")):
            cells = [f"{statistics.median(p[key][c] for p in m['each']):.1f}{unit}" for c, _, unit in POISSON_PARTS]
            rows.append(f"| {name}, {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def poisson_floor(d: dict) -> str:
    floor = d["fifo_floor_p99_over_p50"]
    return (
        f"{floor['one queue (M/D/1)']:.2f} for one queue (M/D/1) and "
        f"{floor['two servers, one queue (M/D/2)']:.2f} for two servers sharing one queue (M/D/2)"
    )


def poisson_connections(d: dict) -> str:
    """How many points' slowest answers opened new connections, and what that cost them at most."""
    slow = [p["slowest_1pct"] for m in d["models"].values() for p in m["each"]]
    hit = [s for s in slow if s["new_connection_share"] > 0]
    return (f"in {len(hit)} of {len(slow)} points some of the slowest answers opened a new connection, at most "
            f"{100 * max(s['new_connection_share'] for s in hit):.0f} % of them, costing at most "
            f"{max(s['new_connection_ms'] for s in hit):.1f} ms on average")  # fmt: skip


FIGURES += [
    Figure("docs/benchmark.md", TAILS_POISSON, poisson_table, "poisson tails, table"),
    Figure("docs/benchmark.md", TAILS_POISSON, poisson_parts, "poisson tails, parts"),
    Figure("docs/benchmark.md", TAILS_POISSON, poisson_floor, "poisson tails, fifo floor"),
    Figure("docs/benchmark.md", TAILS_POISSON, poisson_connections, "poisson tails, connections"),
]  # fmt: skip

# tracing on (every request; a 10 % sample) against off, in slices (setting_cost --slices 12): paired medians
TRACING = {"every request": "docs/results/benchmark/tracing-cost/slices.json",
           "10 % sampled": "docs/results/benchmark/tracing-cost/slices-sampled-10pct.json"}  # fmt: skip
FIGURES += [Figure("docs/benchmark.md", path, summary_row(m, f"{m}, {traced}", PAIRED), f"tracing cost, {m}, {traced}")
            for traced, path in TRACING.items() for m in ("image", "text")]  # fmt: skip
TRACING_NONE = "docs/results/benchmark/tracing-cost/slices-sampled-none.json"  # tracing on, sampler ratio 0; image
FIGURES.append(Figure("docs/benchmark.md", TRACING_NONE, summary_row("image", "image, none sampled (ratio 0)", PAIRED),
                      "tracing cost, image, none sampled"))  # fmt: skip
FIGURES.append(Figure("docs/benchmark.md", TRACING["every request"], lambda d: " and ".join(
    f"{d['models'][m]['summary']['on_over_peer']:.2f} against {d['models'][m]['summary']['off_over_peer']:.2f} ({m})"
    for m in ("image", "text")), "tracing cost, ratios to the peer"))  # fmt: skip

# the benchmark on Poisson arrivals: before the lateness cap (poisson-targets) and with it (late-cap), same command
POISSON_TARGETS, LATE_CAP_RUN = (
    "docs/results/benchmark/poisson-targets/benchmark.json",
    "docs/results/benchmark/late-cap/benchmark.json",
)
# the section's targets of the photo-mix section's list, less the rows met by a wide margin (p99 against the peer's,
# bundled images against 1.6 x the peer's)
TWO_RUN_TARGETS = tuple(t for t in PHOTO_PROXY_TARGETS if "p99 at 32 clients ≤" not in t[1] and "1.6x" not in t[1])


def two_run_target(model: str, name_start: str, words: str) -> Callable[[dict], str]:
    """A target's ratio and verdict in the run before the cap and in the run with it (this figure's source)."""

    def cell(d: dict) -> str:
        t = target(d, model, name_start)
        return f"{t['ratio']} ({ {True: 'met', False: 'not met', None: 'n/a'}[t['met']] })"

    return lambda d: f"| {model} | {words} | {cell(results(POISSON_TARGETS))} | {cell(d)} |"


def photo_failures(label: str) -> Callable[[dict], str]:
    """A run's failed requests on the photo mix: closed loop at 128 clients, open loop at 85 %."""

    def row(d: dict) -> str:
        pts = {p["config"] + (f" c={p['concurrency']}" if p["kind"] != "served-open" else ""): p
               for m in d["models"] if m["model"] == "image" for p in m["points"]}  # fmt: skip
        at128, at85 = pts["served default [photo mix] c=128"], pts["served default [photo mix] @85%"]
        return f"| {label} | {at128['errors']} of {at128['requests']:,} | {at85['errors']} of {at85['requests']:,} |"

    return row


FIGURES += [Figure("docs/benchmark.md", LATE_CAP_RUN, two_run_target(*t), f"two runs: {t[0]}, {t[2]}")
            for t in TWO_RUN_TARGETS]  # fmt: skip
FIGURES += [
    Figure("docs/benchmark.md", POISSON_TARGETS, photo_failures("before the cap (`7f464de`)"), "late cap: before"),
    Figure("docs/benchmark.md", LATE_CAP_RUN, photo_failures("with the cap"), "late cap: after"),
]
LATE_CAP_SLICES = "docs/results/benchmark/late-cap/slices.json"
FIGURES += [
    Figure("docs/benchmark.md", LATE_CAP_SLICES, chunked_row(m), f"late cap slices, {m}") for m in ("image", "text")
]

# the text model alone, timed by variant and batch size: the ceiling of text's ratio to the peer
TEXT_CEILING = "docs/results/benchmark/text-ceiling/text_ceiling.json"
CEILING_BATCHES = ("1", "2", "4", "8", "16", "32")


def ceiling_table(d: dict) -> str:
    rows = ["| variant | fused attention nodes | " + " | ".join(f"batch {b}" for b in CEILING_BATCHES) + " |",
            "|---|---:|" + "---:|" * len(CEILING_BATCHES)]  # fmt: skip
    for name, by in d["one_thread"].items():
        cells = " | ".join(f"{by[b]['wall_ms']:.2f}" for b in CEILING_BATCHES)
        rows.append(f"| {name} | {d['fused_attention_nodes'][name]} | {cells} |")
    return "\n".join(rows)


def ceiling_ms(variant: str, batch: str) -> Callable[[dict], float]:
    return lambda d: d["one_thread"][variant][batch]["wall_ms"]


def ceiling_words(d: dict) -> str:
    ceiling, int8, fp32, peer = d["model_only_ceiling"], ceiling_ms("int8", "1")(d), ceiling_ms("fp32", "1")(d), d[
        "peer_session"]  # fmt: skip
    return (
        f"The model-only ceiling is {ceiling:.2f}**: with both servers spending nothing outside the model and every "
        f"core busy, the served default (int8, {int8:.2f} ms) would answer {ceiling:.2f} times as many texts as the "
        f"peer (fp32, at best {fp32:.2f} ms of one core a text). The peer's own session, with ONNX Runtime's default "
        f"threads, spends {peer['cpu_ms']:.2f} ms of CPU a text ({peer['wall_ms']:.2f} ms wall"
    )


def fused_words(d: dict) -> str:
    one, many = ceiling_ms("fused-attention-int8", "1")(d), ceiling_ms("fused-attention-int8", "32")(d)
    less = [100 * (1 - ms / ceiling_ms("int8", b)(d)) for ms, b in ((one, "1"), (many, "32"))]
    return (f"{one:.2f} ms alone and {many:.2f} ms in batches of 32 ({less[0]:.0f} % and {less[1]:.0f} % less than "
            "the shipped int8)")  # fmt: skip


FIGURES += [
    Figure("docs/benchmark.md", TEXT_CEILING, ceiling_table, "text ceiling: table"),
    Figure("docs/benchmark.md", TEXT_CEILING, lambda d: (
        f"int8 costs {ceiling_ms('int8', '1')(d):.2f} ms a text alone and {ceiling_ms('int8', '32')(d):.2f} ms in "
        "batches of 32"), "text ceiling: batching saves nothing"),
    Figure("docs/benchmark.md", TEXT_CEILING, ceiling_words, "text ceiling: the ceiling"),
    Figure("docs/benchmark.md", TEXT_CEILING, lambda d: (
        f"an int8 text costing about {ceiling_ms('fp32', '1')(d) / 2.5:.1f} ms"), "text ceiling: what 2.5 needs"),
    Figure("docs/benchmark.md", TEXT_CEILING, fused_words, "text ceiling: fused attention"),
    Figure("docs/benchmark.md", TEXT_CEILING, lambda d: f"{d['mean_tokens']} tokens a sentence on average",
           "text ceiling: sentence length"),
]  # fmt: skip

# the same on a CPU with VNNI: two runs of the ceiling tool, and the served default against the peer in slices
VNNI_CEILING = "docs/results/benchmark/text-ceiling/vnni/run-1.json"
VNNI_SLICES = "docs/results/benchmark/text-ceiling/vnni/slices.json"


def vnni_ceilings(d: dict) -> str:
    runs = [d, json.loads((ROOT / VNNI_CEILING).with_name("run-2.json").read_text())]
    for r in runs:
        assert r["int8_instructions"] == ["avx_vnni", "avx512_vnni", "amx_int8"] and "Xeon" in r["machine"]
        assert r["model_only_ceiling"] > 2.5  # "the ceiling rises above 2.5"
    fp32 = [ceiling_ms("fp32", "1")(r) for r in runs]
    int8 = [min(v["wall_ms"] for v in r["one_thread"]["int8"].values()) for r in runs]
    return (f"two runs of the same command minutes apart gave ceilings of {runs[0]['model_only_ceiling']:.2f} and "
            f"{runs[1]['model_only_ceiling']:.2f} (fp32 at batch 1: {fp32[0]:.2f} and {fp32[1]:.2f} ms; int8 at its "
            f"best: {int8[0]:.2f} and {int8[1]:.2f} ms)")  # fmt: skip


def vnni_slices(d: dict) -> str:
    m = d["models"]["text"]["summary"]
    assert max(m["off_over_peer"], m["on_over_peer"]) < 2.5 and "Xeon" in d["machine"]  # "still short of 2.5"
    return f"**{m['off_over_peer']:.2f} and {m['on_over_peer']:.2f} times the peer's req/s**, still short of 2.5"


FIGURES += [
    Figure("docs/benchmark.md", VNNI_CEILING, vnni_ceilings, "text ceiling with VNNI: two runs"),
    Figure("docs/benchmark.md", VNNI_SLICES, vnni_slices, "text with VNNI: ratio to the peer in slices"),
]

BUCKET_WASTE = "docs/results/benchmark/bucket-waste/slices.json"  # text, bucket waste 0.1 (on) against 0.3 (off)


def bucket_waste_paired(d: dict) -> str:
    m = d["models"]["text"]["summary"]
    return (f"req/s {m['rps_on_over_off_paired']:.3f} times, workers' CPU per answer "
            f"{m['cpu_per_answer_on_over_off_paired']:.3f} times, p99 {m['p99_on_over_off_paired']:.3f} times; "
            f"ratio to the peer {m['on_over_peer']:.2f} against {m['off_over_peer']:.2f}")  # fmt: skip


FIGURES.append(Figure("docs/benchmark.md", BUCKET_WASTE, bucket_waste_paired, "bucket waste: paired"))
