"""Figures of serving.md: the defaults per device, make explain-load, abstention."""

from __future__ import annotations

from collections.abc import Callable

from tests.doc_figures.common import (
    BENCH,
    TWO_THREADS,
    Figure,
    bench_c32,
    int8_gain,
    on_off,
    point,
    rps,
    span,
    tenths,
    whole,
)

EXPLAIN = "docs/results/explain/explain_load.json"
DRIFT_COST = "docs/results/drift_cost.txt"  # python -m loadtest.drift_cost's printed report
DRIFT_IN_ALL = "drift in all, counted in chunks (statistics, window, PSI)"
EXPLAIN_THREAD = "docs/results/explain/explain_load-thread.json"  # the earlier design, an explain thread


def mem(data: dict, model: str, role: str) -> str:
    values = data["models"][model]["resident_memory_mib"][role]
    return f"{min(values):.0f}-{max(values):.0f} MiB"


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


def image_rows_s(d: dict) -> float:
    """Model rows a second the image explanations ran: explanations a second times the rows of one."""
    m = d["models"]["image"]
    return m["with_explain_load_default"]["explain"]["explanations_per_s"] * m["cost"]["explain"]["model_rows_mean"]


def nice0_p99(d: dict, model: str) -> float:
    return d["models"][model]["with_explain_load_explain_nice_0"]["predict"]["p99_ms"]


FIGURES = [
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
    # serving.md: the load of each explain-load run (the 1-minute load average, as read before and after it)
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"(load average {d['load_average_before'][0]:.1f} before, {d['load_average_after'][0]:.1f} after; the file "
        "records no date or time)"), "explain load: quiet machine"),
    Figure("docs/serving.md", EXPLAIN_THREAD, lambda d: (
        "the machine shared with other test suites at a load average of "
        f"{span(d['load_average_before'] + d['load_average_after'])}; no time recorded"), "explain load: thread run"),
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        "explanations a second ({:,.0f} model rows a second, {:.0f} times the predictions' rows)".format(
            round(image_rows_s(d), -2), image_rows_s(d) / d["settings"]["rate"]["image"])), "explain load: rows"),
    Figure("docs/serving.md", EXPLAIN_THREAD, lambda d: (
        f"Predict p99 rose from {p99_rise(d, 'image')[0]:.1f} to {p99_rise(d, 'image')[1]:.1f} ms (image) and from "
        f"{p99_rise(d, 'text')[0]:.1f} to {p99_rise(d, 'text')[1]:.1f} ms (text) under the same explain load, and the "
        f"thread's lower priority was no protection (at normal priority: {nice0_p99(d, 'image'):.1f} and "
        f"{nice0_p99(d, 'text'):.1f} ms;"), "explain load: thread run, p99"),
    # serving.md: the drift monitor's cost per request (python -m loadtest.drift_cost)
    Figure("docs/serving.md", DRIFT_COST, lambda d: (
        "An image costs {} µs in all (its statistics alone would cost {} µs, one request at a time), against {} "
        "µs for its own decode and pre-processing (a 28 × 28 PNG at 64 px); a text {} µs ({} µs alone), against "
        "{} µs for its tokenisation").format(
            *(d["figures"][f"image {k}"] for k in (DRIFT_IN_ALL, "statistics, one request alone")),
            whole(d["figures"]["image decode + pre-processing (28 x 28 PNG -> 64 x 64)"]),
            *(d["figures"][f"text  {k}"] for k in (DRIFT_IN_ALL, "statistics, one request alone", "tokenisation"))),
        "drift cost"),
    # serving.md: how often an answer below the abstention threshold is right, on each model's test set
    *(Figure("docs/serving.md", f"docs/results/calibration/{name}.json", lambda d, what=what: (
        f"{whole(100 * d['sets']['test']['accuracy_below_threshold'])} % {what} "
        f"({whole(100 * d['sets']['test']['accuracy_above_threshold'])} % above it)"), f"abstention: {name}")
      for name, what in (("fashion-cnn", "of the time for images"), ("sentiment-bert", "for text"))),
    # serving.md: an explain process's memory, from make explain-load
    Figure("docs/serving.md", EXPLAIN, lambda d: (
        f"each explain process held {mem(d, 'image', 'explain_processes')} (image) and "
        f"{mem(d, 'text', 'explain_processes')} (text), beside {mem(d, 'image', 'http_workers')} and "
        f"{mem(d, 'text', 'http_workers')} for each HTTP worker"), "explain process memory"),
]  # fmt: skip
