"""What a serving setting costs the request path, in alternating rounds: without it (`off`), with it (`on`), N times.

One benchmark run measures each configuration once, one after the other, and on a shared 2-core machine a
configuration's req/s moves by up to 20 % from one run to the next (docs/benchmark.md): more than the costs
being measured here. So the two configurations alternate, each round a fresh server under the benchmark's
closed-loop client, and the medians are compared. Beside each point it records where the CPU went, per
thread priority of the HTTP workers (the shadow lane is their only thread at nice 19, serving/shadow.py),
and with a shadow on, its own counters (rows scored, dropped). Settings are named without their
SERVABLE_<MODEL>_SERVE_ prefix:

    python -m loadtest.setting_cost --shadow-share 0.1 --rounds 3 \
        --out docs/results/benchmark/shadow-cost/rounds/shadow_cost.json
    python -m loadtest.setting_cost --on SERVER_TIMING=true --off SERVER_TIMING=false --rounds 3 \
        --out docs/results/benchmark/timing-cost/setting_cost.json

With `--slices N` the servers are not restarted: every side's server is up at once and each is loaded in
turn, N times, in short slices (a seeded shuffled order each time). Slices seconds apart see the same
machine, so each slice's ratios pair fairly even when the machine's speed drifts during the run; fresh
rounds, minutes apart, do not (docs/benchmark.md, "Image, settled in slices").

`--off-rev REV` serves the off side from a git revision's code (a before/after pair of the request path),
`--peer` adds the FastAPI + ONNX Runtime peer to every round, and `--shadow-share S` is `--on SHADOW_TAG=<the
served tag> SHADOW_SHARE=S`: the candidate is the served model itself, so it costs what the live model does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest import benchmark, cli
from loadtest import inputs as real_inputs

SHADOW_SERIES = ("servable_shadow_scored_total", "servable_shadow_dropped_total")


def thread_cpu_by_nice(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`'s children (the HTTP workers), by nice value."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for child in _children(pid):
        for task in Path(f"/proc/{child}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended between the listing and the read
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
            nice = int(fields[16])
            out[nice] = out.get(nice, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start(model: str, tag: str, label: str, config: dict[str, str], log_dir: Path, cwd: Path | None = None):
    """A fresh server: the served default with `config` (from `cwd`'s code when given), or, for label "peer",
    the FastAPI + ONNX Runtime peer."""
    if label == "peer":
        peer = benchmark.ORT_PEER
        return benchmark.start_peer(peer.module, tag, log_dir / f"{model}-peer.log", peer.uvicorn_args)
    return benchmark.start_served(model, tag, config, label, log_dir, cwd=cwd)


def warm(server, request, args, seconds: float) -> None:
    """`seconds` of the benchmark's closed loop on a running server, not measured; `request`: (path, headers,
    pre-encoded bodies) of the model's main format, made once per model."""
    path, headers, bodies = request
    asyncio.run(benchmark.closed_loop(server.url + path, headers, bodies, args.clients, seconds, 1.0))


def measure(server, model: str, label: str, config: dict[str, str], request, args, warmup: float) -> dict:
    """`warmup` seconds of the benchmark's closed loop on a running server, then `args.seconds` measured."""
    warm(server, request, args, warmup)
    path, headers, bodies = request
    before = thread_cpu_by_nice(server.proc.pid)
    records, secs = asyncio.run(
        benchmark.closed_loop(server.url + path, headers, bodies, args.clients, args.seconds, 1.0)
    )
    after = thread_cpu_by_nice(server.proc.pid)
    p = benchmark.to_point(model, label, "peer" if label == "peer" else "served", args.clients, records, secs,
                           fmt=benchmark.FORMATS[model][0])  # fmt: skip
    cpu = {f"nice {n}": round(after[n] - before.get(n, 0.0), 2) for n in sorted(after)}
    point = {"label": label, "rps": round(p.rps, 1), "p50_ms": round(p.p50_ms, 1), "p99_ms": round(p.p99_ms, 1),
             "errors": p.errors, "seconds": round(secs, 1), "worker_cpu_s": cpu}  # fmt: skip
    if "SHADOW_SHARE" in config:
        point["shadow"] = benchmark.metric_totals(server.url, SHADOW_SERIES)
    print(f"{model} {label}: {p.rps:.0f} req/s, p50 {p.p50_ms:.1f} ms, p99 {p.p99_ms:.1f} ms; worker CPU {cpu}"
          + (f"; shadow {point['shadow']}" if "shadow" in point else ""), flush=True)  # fmt: skip
    return point


def in_rounds(model: str, tag: str, sides, request, args, log_dir: Path) -> list[dict]:
    """Each round a fresh server per side, warmed up for `args.warmup`, then measured."""
    points = []
    for _ in range(args.rounds):
        for label, config, cwd in sides:
            server = start(model, tag, label, config, log_dir, cwd)
            try:
                points.append(measure(server, model, label, config, request, args, args.warmup))
            finally:
                server.stop()
    return points


def in_slices(model: str, tag: str, sides, request, args, log_dir: Path) -> list[dict]:
    """Every side's server up at once (an idle one costs the others nothing), each warmed up for `args.warmup`;
    then `args.slices` times, in a seeded shuffled order, each loaded for 2 s of warm-up and `args.seconds`
    measured. Slices seconds apart see the same machine, so one slice's ratios are a fair pair even while the
    machine's speed drifts."""
    servers = {}
    try:
        for label, config, cwd in sides:
            servers[label] = start(model, tag, label, config, log_dir, cwd)
        for label, _, _ in sides:
            warm(servers[label], request, args, args.warmup)
        points = []
        for i in range(args.slices):
            order = list(sides)
            random.Random(i).shuffle(order)
            by_label = {label: measure(servers[label], model, label, config, request, args, 2.0)
                        for label, config, _ in order}  # fmt: skip
            points += [{**by_label[label], "slice": i} for label, _, _ in sides]  # summary() pairs them in order
        return points
    finally:
        for server in servers.values():
            server.stop()


def summary(points: list[dict]) -> dict:
    """Medians of each side and on / off ratios (throughput, p99); with peer points (one per round, in round
    order like the sides'), the median of each side's per-round throughput over the peer's."""
    sides = ("off", "on", "peer") if any(p["label"] == "peer" for p in points) else ("off", "on")
    med = {side: {k: statistics.median(p[k] for p in points if p["label"] == side) for k in ("rps", "p99_ms")}
           for side in sides}  # fmt: skip
    out = {**med, "rps_on_over_off": round(med["on"]["rps"] / med["off"]["rps"], 3),
           "p99_on_over_off": round(med["on"]["p99_ms"] / med["off"]["p99_ms"], 3)}  # fmt: skip
    pairs = list(zip(*([p for p in points if p["label"] == side] for side in ("off", "on")), strict=True))
    for k in ("rps", "p99_ms"):  # each round's (or slice's) own on / off, then the median: pairs share a machine
        out[f"{k.removesuffix('_ms')}_on_over_off_paired"] = round(statistics.median(b[k] / a[k] for a, b in pairs), 3)
    if all(p.get("worker_cpu_s") for pair in pairs for p in pair):
        # the workers' CPU per answer moves less with the machine's speed than req/s does
        per = [[sum(p["worker_cpu_s"].values()) / (p["rps"] * p["seconds"]) for p in pair] for pair in pairs]
        out["cpu_per_answer_on_over_off_paired"] = round(statistics.median(b / a for a, b in per), 3)
    if "peer" in sides:
        by = {side: [p["rps"] for p in points if p["label"] == side] for side in sides}
        for side in ("off", "on"):
            ratios = [s / q for s, q in zip(by[side], by["peer"], strict=True)]
            out[f"{side}_over_peer"] = round(statistics.median(ratios), 3)
    return out


def settings(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments as a dict (KEY without the model's SERVABLE_<MODEL>_SERVE_ prefix)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from servable import artifact
    from servable.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(ap)
    ap.add_argument("--on", nargs="+", default=[], metavar="KEY=VALUE", help="settings of the `on` side")
    ap.add_argument("--off", nargs="+", default=[], metavar="KEY=VALUE", help="settings of the `off` side")
    ap.add_argument("--shadow-share", type=float, default=0.0,
                    help="on side: shadow this share of requests with the served tag as candidate")  # fmt: skip
    ap.add_argument("--off-rev", default="", metavar="REV",
                    help="off side: serve this git revision's code (exported), the on side this tree's")  # fmt: skip
    ap.add_argument("--peer", action="store_true", help="each round also measures the FastAPI + ONNX Runtime peer")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of fresh servers (without --slices)")
    ap.add_argument("--slices", type=int, default=0,
                    help="instead of rounds: all servers up at once, loaded in turn this many times")  # fmt: skip
    cli.add_load_options(ap)
    ap.add_argument("--out", type=Path, default=Path("docs/results/benchmark/setting-cost/setting_cost.json"))
    args = ap.parse_args(argv)
    try:
        on, off = settings(args.on), settings(args.off)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if not (on or off or args.shadow_share or args.off_rev):
        ap.error("nothing to compare: give --on/--off settings, --shadow-share or --off-rev")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data, started = real_inputs.load(args.inputs), time.time()
    log_dir = Path(tempfile.mkdtemp(prefix="servable-setting-cost-logs-"))  # server logs: not published
    off_code = None
    if args.off_rev:
        from loadtest.memory import export_rev, working_tree

        off_code = log_dir / "off-code"
        off_code.mkdir()
        code = {"off": export_rev(args.off_rev, off_code, [], []), "on": working_tree()}
    result = {"command": "python -m loadtest.setting_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "about": __doc__.split("\n\n")[1].replace("\n", " "), "models": {}}  # fmt: skip
    if args.off_rev:
        result["code"] = code
    result["method"] = f"{args.slices} slices, servers up throughout" if args.slices else f"{args.rounds} rounds"
    for model in args.models:
        tag = artifact.load(cli.tag_of(args, model)).tag  # latest -> name:version
        on_side = {**on, **({"SHADOW_TAG": tag, "SHADOW_SHARE": str(args.shadow_share)} if args.shadow_share else {})}
        sides = [("off", off, off_code), ("on", on_side, None)] + ([("peer", {}, None)] if args.peer else [])
        request = benchmark.request_bodies(model, data, benchmark.FORMATS[model][0])  # the benchmark's main format
        points = (in_slices if args.slices else in_rounds)(model, tag, sides, request, args, log_dir)
        result["models"][model] = {"tag": tag, "on": on_side, "off": off, "clients": args.clients, "points": points,
                                   "summary": summary(points)}  # fmt: skip
        if args.shadow_share:
            result["models"][model]["share"] = args.shadow_share
        print(f"{model}: {json.dumps(result['models'][model]['summary'])}", flush=True)
    result["elapsed_s"] = round(time.time() - started)
    return cli.write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
