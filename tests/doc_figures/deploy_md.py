"""Figures of deploy.md: the compose stack's runs."""

from __future__ import annotations

from datetime import datetime

from tests.doc_figures.common import Figure, span, whole

COMPOSE, COMPOSE_FRESH = "docs/results/compose-up.json", "docs/results/compose-up-fresh-clone.json"


def replica_memory(d: dict, model: str) -> str:
    def of(key: str) -> str:
        return span(v for k, v in d[key].items() if k.startswith(f"{model}-"))

    return f"{model} {of('memory_at_rest_mib')} / {of('memory_under_load_mib')} MiB"


def started(d: dict) -> str:
    """The run's start as the file records it, to the minute (its end is not recorded)."""
    return f"{datetime.fromisoformat(d['date']):%Y-%m-%d %H:%M} UTC"


def rollout_s(d: dict, step: str) -> str:
    return whole(d["rollout"]["durations_s"][step])


FIGURES = [
    # deploy.md: the compose stack's last runs (tests/test_compose_up.py's figures)
    Figure("docs/deploy.md", COMPOSE, lambda d: f"Started {started(d)}, on a machine", "compose run: start"),
    Figure("docs/deploy.md", COMPOSE_FRESH, lambda d: f"started {started(d)}: `make compose-up-test`",
           "compose run from a fresh clone: start"),
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
    Figure("docs/deploy.md", COMPOSE_FRESH, lambda d: f"**9 passed in {whole(d['durations_s']['total'])} s** (images",
           "compose run from a fresh clone"),
    Figure("docs/deploy.md", COMPOSE_FRESH, lambda d: (
        f"(images cached: {whole(d['durations_s']['images'])} s). Every service healthy "
        f"{whole(d['durations_s']['up_to_healthy'])} s after `up`, each replica ready in "
        f"{span(d['replica_start_to_ready_s'].values(), ' s')}, the revoked key refused at once, the killed replica's "
        f"target down after {whole(d['replica_kill']['target_down_after_s'])} s and its alert in Alertmanager after "
        f"{whole(d['replica_kill']['alert_in_alertmanager_after_s'])} s, roll-out and back under load "
        f"{d['rollout']['requests']:,} requests all 200 (p99 {1000 * d['rollout']['p99_s']:.0f} ms), `down -v` "
        f"{whole(d['durations_s']['down'])} s with nothing left"), "compose from a fresh clone"),
]  # fmt: skip
