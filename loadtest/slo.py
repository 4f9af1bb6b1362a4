"""The SLO gate: per-endpoint failure ratio, p95 and p99 thresholds checked on Locust's own stats.

Thresholds come from `loadtest/slo.toml`, overridable by SERVABLE_SLO_* environment variables.
Pure stdlib so the gate runs on a bare load-generator install.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servable.machine import describe_machine

DEFAULT_FILE = Path(__file__).with_name("slo.toml")
TOTAL = "Aggregated"


@dataclass(frozen=True)
class Threshold:
    max_fail_ratio: float
    p95_ms: float
    p99_ms: float


@dataclass
class SloConfig:
    default: Threshold
    endpoints: dict[str, Threshold] = field(default_factory=dict)
    min_requests: int = 1

    def for_endpoint(self, name: str) -> Threshold:
        return self.endpoints.get(name, self.default)


@dataclass
class EndpointStats:
    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def fail_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass
class Check:
    endpoint: str
    metric: str
    limit: float
    value: float

    @property
    def ok(self) -> bool:
        # min_requests is a floor; every other metric is a ceiling.
        return self.value >= self.limit if self.metric == "requests" else self.value <= self.limit


def load_config(path: Path | None = None, env: dict[str, str] | None = None) -> SloConfig:
    env = os.environ if env is None else env
    path = Path(env.get("SERVABLE_SLO_FILE") or path or DEFAULT_FILE)
    raw = tomllib.loads(path.read_text())
    overrides = {key: float(env[f"SERVABLE_SLO_{key.upper()}"]) for key in ("max_fail_ratio", "p95_ms", "p99_ms")
                 if env.get(f"SERVABLE_SLO_{key.upper()}")}  # fmt: skip
    base = {**raw.get("default", {}), **overrides}
    default = Threshold(**base)
    endpoints = {name: Threshold(**{**base, **own, **overrides}) for name, own in raw.get("endpoints", {}).items()}
    min_requests = int(env.get("SERVABLE_SLO_MIN_REQUESTS") or raw.get("min_requests", 1))
    return SloConfig(default, endpoints, min_requests)


def evaluate(stats: list[EndpointStats], config: SloConfig) -> list[Check]:
    """Every threshold of every endpoint that saw traffic, plus the run's minimum request count."""
    checks = []
    for s in stats:
        if s.name == TOTAL:
            checks.append(Check(TOTAL, "requests", config.min_requests, s.requests))
            continue
        t = config.for_endpoint(s.name)
        checks += [
            Check(s.name, "fail_ratio", t.max_fail_ratio, round(s.fail_ratio, 4)),
            Check(s.name, "p95_ms", t.p95_ms, s.p95_ms),
            Check(s.name, "p99_ms", t.p99_ms, s.p99_ms),
        ]
    if not any(s.name == TOTAL for s in stats):
        checks.append(Check(TOTAL, "requests", config.min_requests, sum(s.requests for s in stats)))
    return checks


def verdict_table(checks: list[Check]) -> str:
    failed = [c for c in checks if not c.ok]
    lines = ["| endpoint | metric | limit | measured | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c.endpoint} | {c.metric} | {c.limit:g} | {c.value:g} | {'yes' if c.ok else 'NO'} |" for c in checks]
    head = "SLO PASSED" if not failed else "SLO FAILED: " + "; ".join(
        f"{c.endpoint} {c.metric} {c.value:g} > {c.limit:g}" if c.metric != "requests"
        else f"{c.endpoint} requests {c.value:g} < {c.limit:g}" for c in failed)  # fmt: skip
    return head + "\n\n" + "\n".join(lines)


def write_verdict(prefix: str, checks: list[Check], stats: list[EndpointStats]) -> None:
    """`<prefix>_slo.md` and `<prefix>_slo.json` beside Locust's own CSV files."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}_slo.md").write_text(verdict_table(checks) + "\n")
    passed = all(c.ok for c in checks)
    # the machine, so a page quoting these figures names the one they came from (tests/test_doc_figures.py)
    body = {"passed": passed, "machine": describe_machine(), "checks": [{**asdict(c), "ok": c.ok} for c in checks],
            "endpoints": [{**asdict(s), "fail_ratio": s.fail_ratio} for s in stats]}  # fmt: skip
    Path(f"{prefix}_slo.json").write_text(json.dumps(body, indent=1))
