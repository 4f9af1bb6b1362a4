"""Each cited proof fails when its claim breaks: the plausible one-line breaks, applied one at a time.

For every claim of docs/deployment-answers.md that a plausible edit could break while its cited tests
still passed (issue 30's "partly proven" list), this applies that edit to a copy of the tree and runs the
claim's cited tests there (`pytest -x`: the first failure kills the mutation). A mutation whose tests all
pass *survived*: the claim is not proven against that break, and the run fails.

    python -m tests.mutation_check               # make mutation-check: every break (35-40 min on 2 cores)
    python -m tests.mutation_check --only audit-strict hpa-max-replicas
    python -m tests.mutation_check --list
    python -m tests.mutation_check --table      # the table docs/reliability.md quotes

The copy holds the tracked and untracked, not ignored files (with .venv and .cache linked), so the
working tree is never edited. Each break's last result is kept in docs/results/mutation-check.json
with the commit, date and machine it ran at (a run of some breaks replaces their rows only, a row whose
break changed since is dropped); `--table` prints docs/reliability.md's table of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "mutation-check.json"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    claim: str  # the claim it breaks, in the words of its row
    path: str
    old: str  # replaced once; it must occur exactly once in `path`
    new: str
    tests: tuple[str, ...]  # the row's cited tests that must catch it
    then: tuple[str, ...] = ()  # a command run in the copy after the edit (a generated file re-rendered)


RENDER = ("-m", "deploy.render")
T_SERVING, T_REL, T_EXPLAIN = "tests/test_serving.py", "tests/test_reliability.py", "tests/test_explain.py"

MUTATIONS = (
    # First those whose tests train nothing (seconds each), then those that train the tiny models and
    # start servers (minutes each): a short run still checks most claims.
    Mutation("audit-strict", "the dependency audit fails closed (a package it could not look up fails it)",
             "deploy/supply_chain.py", '"--strict", "--vulnerability-service"', '"--vulnerability-service"',
             ("tests/test_supply_chain.py::test_audit_with_the_vulnerability_service_unreachable_fails_and_says_why",
              "tests/test_supply_chain.py::test_audit_fails_when_one_package_could_not_be_looked_up")),
    Mutation("runner-max-requests", "split topology: BentoML's connection recycling is raised out of reach",
             "servable/config.py", "        1_000_000_000,\n        ge=1,", "        100,\n        ge=1,",
             (f"{T_SERVING}::test_tracing_is_skipped_on_the_hot_routes_unless_turned_on",
              f"{T_SERVING}::test_split_topology_starts_and_answers_like_the_in_process_one")),
    Mutation("hpa-max-replicas", "Kubernetes scales on load (the HPA may add replicas)",
             "deploy/k8s/base/model.yaml.template", "maxReplicas: 8", "maxReplicas: 2",
             ("tests/test_deploy_static.py::test_k8s_manifests",), RENDER),
    Mutation("hpa-adapter-metric", "GPU: the HPA's in-flight metric is the one the Prometheus adapter serves",
             "deploy/k8s/overlays/gpu/prometheus-adapter-rules.yaml.template",
             "as: servable_requests_in_flight", "as: servable_in_flight",
             ("tests/test_deploy_static.py::test_k8s_manifests",), RENDER),
    Mutation("malformed-key-at-start", "a malformed API key stops the service at start",
             "serving/model_service.py", "service.add_asgi_middleware(ApiKeyMiddleware, settings=AuthSettings())",
             "service.add_asgi_middleware(ApiKeyMiddleware)",
             ("tests/test_config.py::test_malformed_api_keys_stop_the_service_at_start_not_each_request",
              f"{T_SERVING}::test_a_malformed_api_key_stops_the_server_at_start")),
    Mutation("slo-p99", "the SLO gate checks p99 per endpoint",
             "loadtest/slo.py", '            Check(s.name, "p99_ms", t.p99_ms, s.p99_ms),\n', "",
             ("tests/test_loadtest.py::test_slo_config_overrides_and_verdict",)),
    Mutation("explain-deadline", "an explanation that cannot finish within explain_timeout_s gets a 503",
             "serving/explain_process.py", "if time.monotonic() > deadline:", "if False:",
             (f"{T_EXPLAIN}::test_explain_queue_bounds_concurrency_queue_and_wait",
              f"{T_EXPLAIN}::test_an_explanation_past_its_deadline_stops_between_chunks")),
    Mutation("image-max-pixels", "the image area limit (25 Mpx) is checked on the header",
             "servable/preprocessing.py", "if width * height > limits.max_pixels:", "if False:",
             ("tests/test_preprocessing.py::test_serving_bounds_refuse_on_the_header_before_decoding",
              "tests/test_image_bounds.py::"
              "test_worst_images_are_refused_or_decoded_off_the_loop_while_good_requests_keep_their_latency")),
    # -- the tiny models trained by the fixtures from here on
    Mutation("provider-hard-coded", "the provider in use is reported, never assumed",
             "serving/onnx_runtime.py", "in_use = session.get_providers()[0]", 'in_use = "CPUExecutionProvider"',
             (f"{T_SERVING}::test_device_auto_reports_the_provider_in_use_and_logs_a_fallback_once",
              f"{T_SERVING}::test_the_provider_reported_is_the_sessions_not_the_one_asked_for")),
    Mutation("overfitting-flags-recorded", "overfitting controls are flags recorded in the artifact",
             "training/image_pipeline.py", 'training_config=cfg.model_dump(mode="json")',
             'training_config=cfg.model_dump(mode="json", exclude={"weight_decay"})',
             ("tests/test_config.py::test_cli_flags_override_env",
              "tests/test_image_training.py::test_artifact_round_trip")),
    Mutation("freeze-image-batchnorm", "image stage 1 changes the head only (BatchNorm statistics held)",
             "training/image_pipeline.py", "on_train_start=model.hold_frozen_batchnorm, **common)", "**common)",
             ("tests/test_image_training.py::test_frozen_stage_changes_head_only",
              "tests/test_image_training.py::test_the_pipelines_head_stage_leaves_the_backbone_as_pretrained")),
    Mutation("explain-through-predict-queue", "the predict batcher's queue is never used by explanations",
             "serving/topology.py", "            return await self.explainer.explain(parsed, deadline)",
             "            await self.batcher.submit(list(parsed.rows))\n"
             "            return await self.explainer.explain(parsed, deadline)",
             (f"{T_EXPLAIN}::test_a_burst_of_explanations_gets_429_beyond_the_queue_while_predictions_keep_answering",)),
    Mutation("per-class-figures", "every run writes per-class precision / recall / F1",
             "training/metrics.py", '"precision": float(p[i]), "recall": float(r[i])',
             '"precision": float(r[i]), "recall": float(p[i])',
             (f"{T_EXPLAIN}::test_training_runs_write_per_class_figures_and_a_gallery_of_explained_mistakes",)),
    # Stage 1 hands the optimiser the head's parameters *and* turns the encoder's gradients off; either alone
    # holds the encoder (handing it every parameter is an equivalent mutant: AdamW skips parameters without
    # gradients). head_parameters feeds both, so a head_parameters that returns everything breaks the claim.
    Mutation("freeze-text-encoder", "text stage 1 changes the head only",
             "training/text_model.py", "    return params + (list(pooler.parameters()) if pooler is not None else [])",
             "    return list(model.parameters())",
             ("tests/test_text_training.py::test_the_pipelines_head_stage_leaves_the_encoder_as_pretrained",)),
    Mutation("length-buckets-off", "a text batch runs in length buckets",
             "serving/adapters/text.py", "if not self.settings.length_buckets:", "if True:",
             ("tests/test_batcher.py::test_bucketed_run_restores_the_callers_order_and_matches_one_padded_batch",)),
    Mutation("overload-late-at-dispatch",
             "a call its batch would answer after its deadline is refused when the batch forms (503 `overloaded`)",
             "serving/batcher.py", "if call.queued_at < self._free_at and call.deadline < end:", "if False:",
             ("tests/test_batcher.py::test_a_call_its_batch_would_answer_late_is_refused_when_the_batch_forms_and_its_mates_run",)),
    Mutation("admission-off", "a request predicted past its deadline is refused at once (429 `would_miss_deadline`)",
             "serving/batcher.py", "if now + predicted / HEADROOM > deadline:", "if False:",
             ("tests/test_batcher.py::test_a_call_predicted_past_its_deadline_is_refused_at_once_and_one_within_it_runs",
              f"{T_REL}::test_overload_answers_200_within_the_deadline_or_429_at_once_and_recovers")),
    Mutation("accept-balance-off", "a replica's HTTP workers share new connections evenly",
             "serving/graceful_shutdown.py", "if fewest is not None and self._holding() > fewest:", "if False:",
             ("tests/test_accept_balance.py::test_a_burst_of_new_connections_is_shared_evenly_between_the_workers",)),
    Mutation("hostile-mates-never-batched", "a bad request never fails the good requests of its batch",
             "serving/batcher.py", "if batch and rows + len(call.rows) > self.max_batch_size:", "if batch:",
             (f"{T_SERVING}::test_a_hostile_request_never_fails_a_good_batch_mate",)),
    Mutation("loadtest-run-exit-code", "the load-test run fails when the SLOs are missed (its exit code)",
             "loadtest/run.py", "return proc.wait(timeout=args.duration + 120)",
             "return proc.wait(timeout=args.duration + 120) and 0",
             ("tests/test_loadtest.py::test_run_command_against_running_services",)),
)  # fmt: skip


def copy_tree(dest: Path) -> None:
    """The tracked and untracked, not ignored files; .venv and .cache linked (the models, the datasets)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for link in (".venv", ".cache"):
        if (ROOT / link).exists():
            (dest / link).symlink_to((ROOT / link).resolve())


def run_one(m: Mutation, tree: Path, timeout_s: float) -> dict:
    target = tree / m.path
    original = target.read_text()
    if original.count(m.old) != 1:
        return {"name": m.name, "outcome": "stale", "why": f"{m.path}: the text to replace occurs "
                f"{original.count(m.old)} times", "seconds": 0.0}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.monotonic()
    try:
        target.write_text(original.replace(m.old, m.new))
        if m.then:
            subprocess.run([sys.executable, *m.then], cwd=tree, env=env, check=True, capture_output=True, timeout=300)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
        try:
            done = subprocess.run(cmd, cwd=tree, env=env, timeout=timeout_s, capture_output=True, text=True,
                                  start_new_session=True)  # fmt: skip
            rc, lines = done.returncode, (done.stdout + done.stderr).strip().splitlines()
        except subprocess.TimeoutExpired:
            rc, lines = 124, ["timed out"]
    finally:
        target.write_text(original)
        if m.then:
            subprocess.run([sys.executable, *m.then], cwd=tree, env=env, check=True, capture_output=True, timeout=300)
    # pytest: 1 = a test failed (killed); 0 = all passed (survived); a signal stopped it (interrupted);
    # anything else (124: timed out, 2-5: pytest could not run the tests) is not a verdict either.
    outcome = {0: "survived", 1: "killed"}.get(rc, "interrupted" if rc < 0 else "error")
    failed = [line.split()[1].split("[")[0] for line in lines if line.startswith("FAILED ")]
    return {"name": m.name, "outcome": outcome, "rc": rc, "seconds": round(time.monotonic() - start, 1),
            "killed_by": failed[0] if failed else None, "tail": lines[-3:]}  # fmt: skip


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def commit() -> str:
    """HEAD, marked `+changes` when the tree run differs from it (the copy holds uncommitted files too)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    changed = [line for line in git("status", "--porcelain").splitlines() if not line.endswith(RESULT.name)]
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def definition(m: Mutation) -> dict:
    """What a recorded row was run against: a row whose break or tests changed since is not a result."""
    return {"path": m.path, "old": m.old, "new": m.new, "tests": list(m.tests)}


VERDICTS = ("killed", "survived")


def merged(previous: dict, rows: list[dict]) -> dict:
    """The last result of every break: this run's rows over the previous file's. A row no longer matching
    its break's definition is dropped, and a run that reached no verdict (interrupted, timed out) does not
    replace an earlier verdict."""
    by_name = {m.name: m for m in MUTATIONS}
    kept = {r["name"]: r for r in previous.get("results", [])
            if r.get("name") in by_name and r.get("definition") == definition(by_name[r["name"]])}  # fmt: skip
    for r in rows:
        old = kept.get(r["name"])
        if not (old and old["outcome"] in VERDICTS and r["outcome"] not in VERDICTS):
            kept[r["name"]] = r
    results = [kept[m.name] for m in MUTATIONS if m.name in kept]
    verdicts = [r for r in results if r["outcome"] in VERDICTS]
    return {"total": len(MUTATIONS), "run": len(verdicts), "killed": sum(r["outcome"] == "killed" for r in results),
            "complete": len(verdicts) == len(MUTATIONS), "results": results}  # fmt: skip


def markdown(record: dict) -> str:
    """docs/reliability.md's summary line and table, from the recorded result (the test compares the two)."""
    rows = {r["name"]: r for r in record["results"]}
    dates = sorted({r["date"] for r in rows.values()})
    machines = sorted({r["machine"] for r in rows.values()})
    when = dates[0] if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"
    commits = sorted({r["commit"] for r in rows.values()})
    at = f"at commit {commits[0]}" if len(commits) == 1 else "each row at the commit it names"
    head = (f"Last result of each break ([results/mutation-check.json](results/mutation-check.json)): "
            f"{record['killed']} of {record['total']} killed"
            f"{f', {missing} without a verdict' if (missing := record['total'] - record['run']) else ''}; "
            f"run {when} on {', '.join(machines) or 'no machine'}, {at}; "
            f"{sum(r['seconds'] for r in rows.values()) / 60:.0f} minutes of tests in all.")  # fmt: skip
    one_line = lambda text: " ".join(text.split()) or "(removed)"  # noqa: E731
    lines = [head, "", "| break | applied to | result | first cited test to fail | s | commit, date, load |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for m in MUTATIONS:
        r = rows.get(m.name)
        change = f"{m.name}: `{one_line(m.old)}` → `{one_line(m.new)}`"
        if r is None:
            lines.append(f"| {change} | `{m.path}` | not run | — | — | — |")
            continue
        by = f"`{r['killed_by'].split('::')[-1]}`" if r.get("killed_by") else "—"
        lines.append(f"| {change} | `{m.path}` | {r['outcome']} | {by} | {r['seconds']:.0f} | "
                     f"{r['commit']}, {r['date']}, {r['load_average_at_start']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="these mutations only (merged into the last result)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--table", action="store_true", help="print docs/reliability.md's table of the last result")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    p.add_argument(
        "--wait-while",
        type=Path,
        metavar="FILE",
        help="before each mutation, wait while FILE exists (a benchmark measuring on the same machine)",
    )
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32} {m.path}: {m.claim}")
        return 0
    if args.table:
        print(markdown(json.loads(RESULT.read_text())), end="")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    run_at = {"commit": commit(), "machine": f"{cpu_model()}, {os.cpu_count()} cores"}
    results: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="servable-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for m in chosen:
            while args.wait_while and args.wait_while.exists():
                time.sleep(20)
            # the load average: a shared machine runs the breaks slower
            at = {**run_at, "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
                  "load_average_at_start": round(os.getloadavg()[0], 1)}  # fmt: skip
            res = {**run_one(m, tree, args.timeout), **at, "definition": definition(m)}
            results.append(res)
            by = f": {res['killed_by']}" if res.get("killed_by") else ""
            print(f"{res['outcome']:9} {m.name} ({res['seconds']:.0f} s){by}", flush=True)
            # after each mutation: a run stopped part way keeps what it found
            RESULT.write_text(json.dumps(merged(previous, results), indent=1) + "\n")
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"{killed}/{len(results)} mutations killed by their cited tests in {(time.monotonic() - start) / 60:.1f} min")
    print(f"{RESULT.relative_to(ROOT)}: {merged(previous, results)['killed']} of {len(MUTATIONS)} killed at their last "
          "run; `--table` prints docs/reliability.md's table")  # fmt: skip
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
