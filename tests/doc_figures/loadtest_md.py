"""Figures of loadtest.md: the published load test."""

from __future__ import annotations

from tests.doc_figures.common import Figure

LOADTEST = "docs/results/loadtest/local_slo.json"


def endpoint(data: dict, name: str) -> dict:
    return next(e for e in data["endpoints"] if e["name"] == name)


def routes(data: dict) -> list[dict]:
    return [e for e in data["endpoints"] if e["name"] != "Aggregated"]


FIGURES = [
    # loadtest.md: the published run of make loadtest (its verdict file records no machine)
    Figure("docs/loadtest.md", LOADTEST, lambda d: (
        f"{endpoint(d, 'Aggregated')['requests']} requests, {endpoint(d, 'Aggregated')['failures']} failures, "
        f"**SLO {'PASSED' if d['passed'] else 'FAILED'}**; p95 from {min(e['p95_ms'] for e in routes(d))} ms "
        f"(image upload) to {max(e['p95_ms'] for e in routes(d))} ms (eight sentences), p99 at most "
        f"{max(e['p99_ms'] for e in routes(d))} ms"), "published load test"),
]  # fmt: skip
