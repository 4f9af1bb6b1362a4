"""Figures of reliability.md and deployment-answers.md: the reliability suite and the soak runs."""

from __future__ import annotations

from collections.abc import Callable

from tests.doc_figures.common import Figure, machine_of, span

SOAK3, SOAK4 = "docs/results/soak-run3.json", "docs/results/soak.json"

RELIABILITY = "docs/results/reliability.json"
RELIABILITY_OVERLOAD = "docs/results/reliability-overload.json"  # its own run: the admission by predicted wait


def minutes_above(data: dict, model: str, ms: float) -> list[dict]:
    return [w for w in data[model]["windows"] if w["p99_ms"] > ms]


def lag_range_s(windows: list[dict]) -> str:
    lags = [w["send_lag_p99_ms"] / 1000 for w in windows]
    return f"{min(lags):.1f}-{max(lags):.1f} s"


def lag_below(data: dict, ms: float) -> float:
    """The generator's largest lag (ms) in the minutes whose p99 stayed under `ms`, either model's."""
    return max(w["send_lag_p99_ms"] for m in ("image", "text") for w in data[m]["windows"] if w["p99_ms"] < ms)


def hostile_row(figures: dict) -> str:
    statuses = ", ".join(str(c) for c in sorted(set(figures["statuses"].values())))
    return (
        f"| {figures['sent']} | all 4xx with a JSON body ({statuses}) | {figures['max_latency_s']:.3f} s | "
        f"worker tree RSS {figures['rss_mb_before']:.1f} → {figures['rss_mb_after']:.1f} MB |"
    )


def overload_row(o: dict) -> str:
    return (
        f"| overload: {o['callers']} concurrent callers, per-worker limit `max_concurrency={o['max_concurrency']}`, "
        f"one 32-text request per batch, deadline {o['deadline_ms']:,} ms (3.5 × one batch alone) | "
        f"{o['callers']} callers for {o['seconds']} s (a refused one waits as Retry-After says), after "
        f"{o['learning_s']} s of the same load: "
        f"{o['sent']:,} | {o['ok']:,} × 200 (the slowest {o['max_served_ms']:,.0f} ms in the replica), "
        f"{o['429']:,} × 429 ({o['429_would_miss_deadline']:,} `would_miss_deadline`), {o['503']} × 503 `overloaded` "
        "(a wrong prediction, refused as its batch formed), "
        f"{o['5xx_other']} other 5xx, {o['no_answer']} unanswered; full service right after | "
        f"refusals ≤ {o['max_refusal_latency_s']:.2f} s |"
    )


def rss_growth(d: dict) -> str:
    """Run 4's worker RSS column: the growth range, then each worker's first → last reading, by model."""
    w = d["workers"]
    growth = w["rss_growth_mb"].values()

    def first_last(model: str) -> str:
        workers = sorted(k for k in w["rss_start_mb"] if k.startswith(f"{model}-"))
        return " and ".join(f"{w['rss_start_mb'][k]:.1f} → {w['rss_end_mb'][k]:.1f}" for k in workers)

    by_model = {m: first_last(m) for m in ("image", "text")}
    return f"**{span(growth)} MB** (image {by_model['image']} MB, text {by_model['text']} MB) |"


def growth_by_model(d: dict, model: str) -> list[float]:
    return [mb for worker, mb in d["workers"]["rss_growth_mb"].items() if worker.startswith(f"{model}-")]


def sigterm_run(d: dict) -> str:
    """The SIGTERM test's figures in the suite run (a reset or unclean answer is any outcome but these three)."""
    s = d["sigterm_single_replica"]
    o = s["outcomes"]
    unclean = sum(n for kind, n in o.items() if kind not in ("200", "503", "refused"))
    return (
        f"in the {machine_of(d)} run above: {s['requests']} requests, {o.get('200', 0)} × 200 "
        f"and {o.get('refused', 0)} refused, {unclean} reset, {s['in_flight_at_sigterm']} in flight at the signal, "
        f"{s['answered_though_sent_after_sigterm']} sent after it and answered, refusals from "
        f"{s['refused_after_s']:.2f} s after the signal, `/readyz` 503 {s['readiness_after_sigterm']['503']} times "
        f"in between, the late request on an early connection answered `{s['late_request_on_early_connection']}`, "
        f"exit {s['exit_s']:.2f} s after SIGTERM (grace period {s['grace_period_s']:.0f} s)"
    )


def slow_clients_proxy(d: dict) -> str:
    """The attack on the local stack's nginx (tests/test_slow_clients.py), as the slow-client section quotes it."""
    f = d["slow_clients_proxy"]
    refused = sum(n for reply, n in f["attack_replies"].items() if reply.endswith("429 too_many_connections"))
    return (
        f"Figures: {f['good_ok']} of {f['good_requests']} good requests answered 200, the slowest in "
        f"{f['good_max_latency_s']:.3f} s; {f['attack_connections']:,} attack connections, at most "
        f"{f['attack_held_max']} held at once; all {f['slow_header_closed_by_proxy']} slow-header connections closed "
        f"by nginx, the first no sooner than {f['slow_header_min_close_s']:.2f} s after its TCP connect, none living "
        f"longer than {f['slow_header_max_life_s']:.2f} s after its handshake; {f['slow_body_closed_by_proxy']} "
        f"stalled bodies closed by nginx, none living longer than {f['slow_body_max_life_s']:.2f} s; {refused} of the "
        "attacker's requests refused `429 too_many_connections`"
    )


# the replica's own limits: each case's row of the slow-client section, as its answer and the seconds to it
REPLICA_ROWS = {
    "too_many_headers": "| 2,000 header fields | `{code}` `too_many_headers` (over 100 fields) | {s:.2f} s |",
    "headers_too_large": "| one 64 KiB header | `{code}` `headers_too_large` (over 40 KiB of request line + headers) | "
                         "{s:.2f} s |",
    "growing_header": "not a reset | {s:.2f} s |",
    "header_timeout": "| a header that stops arriving | `{code}` `header_timeout` | {s:.1f} s (the header timeout) |",
    "idle": "| a connection that sends nothing | closed | {s:.1f} s (the header timeout) |",
    "chunk_stalls": "| `{code}` `body_timeout` (the body paused 10 s) | {s:.1f} s (the body timeout) |",
}  # fmt: skip


def replica_row(case: str, doc: str) -> Callable[[dict], str]:
    def quote(d: dict) -> str:
        status, seconds = d["slow_clients_replica"][case]
        return doc.format(code=status.split()[1] if status else "", s=seconds)

    return quote


FIGURES = [
    # the soak table of docs/reliability.md: runs 3 and 4
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"| {d['image']['saturation_rps']:.0f}, {d['text']['saturation_rps']:.0f} | {d['image']['target_rps']:.0f}, "
        f"{d['text']['target_rps']:.0f} | {d['image']['errors']}, {d['text']['errors']} | "
        f"{d['image']['p99_first_window_ms']:.0f} → {d['image']['p99_last_window_ms']:.0f} ms; "
        f"{d['text']['p99_first_window_ms']:.0f} → {d['text']['p99_last_window_ms']:.0f} ms, above 1 s in "
        f"{len(minutes_above(d, 'image', 1000))} (images) and {len(minutes_above(d, 'text', 1000))} (texts) of the "
        f"{d['minutes']:.0f} minutes |"), "soak run 3"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"of the {d['minutes']:.0f} minutes | image {span(growth_by_model(d, 'image'))} MB, text "
        f"{span(growth_by_model(d, 'text'))} MB |"), "soak run 3, worker RSS"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"text workers grew (by up to {span([max(growth_by_model(d, 'text'))])} MB in run 3)"),
        "soak run 3, text worker growth"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"p99 rose above 1 s in {len(minutes_above(d, 'text', 1000))} of the {d['minutes']:.0f} minutes "
        f"({len(minutes_above(d, 'image', 1000))} for images)"), "soak run 3, above 1 s"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"in those minutes the generator was {lag_range_s(minutes_above(d, 'image', 1000) + minutes_above(d, 'text', 1000))} late"),  # noqa: E501
        "soak run 3, generator lag"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"in the others at most {lag_below(d, 1000) / 1000:.1f} s, and at most {lag_below(d, 300):.0f} ms in the "
        "minutes whose p99 stayed under 0.3 s"), "soak run 3, generator lag in the other minutes"),
    Figure("docs/reliability.md", SOAK4, lambda d: (
        f"| {d['image']['saturation_rps']:.0f}, {d['text']['saturation_rps']:.0f} | {d['image']['target_rps']:.0f}, "
        f"{d['text']['target_rps']:.0f} | **{d['image']['errors']}, {d['text']['errors']}** "
        f"({d['image']['requests']:,} and {d['text']['requests']:,} requests) | "
        f"**{d['image']['p99_first_window_ms']:.0f} → "
        f"{d['image']['p99_last_window_ms']:.0f} ms; {d['text']['p99_first_window_ms']:.0f} → "
        f"{d['text']['p99_last_window_ms']:.0f} ms, every minute between "
        f"{min(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f} and "
        f"{max(w['p99_ms'] for m in ('image', 'text') for w in d[m]['windows']):.0f} ms"), "soak run 4"),
    Figure("docs/reliability.md", SOAK3, lambda d: (
        f"finished task of the run ({d['image']['requests'] + d['text']['requests']:,}, both models' requests)"),
        "soak run 3, the generator's finished tasks"),
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
    Figure("docs/reliability.md", RELIABILITY, slow_clients_proxy, "slow clients, the proxy"),
    *(Figure("docs/reliability.md", RELIABILITY, replica_row(case, doc), f"slow clients, the replica: {case}")
      for case, doc in REPLICA_ROWS.items()),
    Figure("docs/reliability.md", RELIABILITY, sigterm_run, "SIGTERM test's figures"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: hostile_row(d["hostile_images"]), "hostile images"),
    Figure("docs/reliability.md", RELIABILITY, lambda d: hostile_row(d["hostile_texts"]), "hostile texts"),
    Figure("docs/reliability.md", RELIABILITY_OVERLOAD, lambda d: overload_row(d["overload"]), "overload"),
]  # fmt: skip
