"""Soak: the local stack (nginx, 2+2 replicas, Prometheus) under open-loop load at 70 % of its measured
saturation, for 20 minutes: errors, p99 drift from the first to the last minute, RSS growth per worker
(and its course, window by window).

A figure the test suite cannot hold (it takes 20 minutes), so it is a command with a committed result:

    python -m loadtest.soak                          # make soak -> docs/results/soak.json
    python -m loadtest.soak --quick --out /tmp/soak.json   # the same code paths in about a minute

Saturation is measured first through the proxy (closed loop, `--concurrency` clients per model, both
models at once); the soak then sends each model's requests at `--load` x that rate whatever the answers
do (latency from the scheduled send time, so queueing shows), over at most `--connections` keep-alive
connections per model, as a front end's connection pool would (a request finding none free waits, and
the wait counts; unbounded, a stall turns into a burst of TLS handshakes on the cores the stack needs).
Each window also reports how late the generator itself started its requests. Requests: the benchmark's real inputs
(image multipart uploads, single-sentence JSON), one API key, with the proxy's per-key rate limit and
per-address connection limit out of reach (the load generator is one client address).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from loadtest import benchmark
from loadtest import inputs as real_inputs

MODELS = ("image", "text")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-tag", default="fashion-cnn:latest")
    p.add_argument("--text-tag", default="sentiment-bert:latest")
    p.add_argument("--minutes", type=float, default=20.0, help="length of the soak")
    p.add_argument("--load", type=float, default=0.7, help="share of the measured saturation to send")
    p.add_argument("--window", type=float, default=60.0, help="seconds per reported window (drift: first vs last)")
    p.add_argument("--saturation-seconds", type=float, default=30.0, help="closed-loop seconds to measure saturation")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients per model for saturation")
    p.add_argument("--replicas", type=int, default=2, help="replicas per model behind the proxy")
    p.add_argument("--connections", type=int, default=64,
                   help="the generator's connections per model (0: a new one whenever none is free)")  # fmt: skip
    p.add_argument("--inputs", type=Path, default=real_inputs.DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("docs/results/soak.json"))
    p.add_argument("--note", default="", help="free text for the report, e.g. 'shared machine'")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 s soak in 5 s windows, 4 s saturation")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.window, args.saturation_seconds, args.concurrency = 1 / 3, 5.0, 4.0, 8
    return args


def worker_rss_mb(stack) -> dict[str, float]:
    """Resident memory of each HTTP worker process of each replica, by `<kind>-<replica>/<pid>`."""
    out = {}
    for kind in MODELS:
        for i, server in enumerate(stack.replicas[kind], 1):
            for proc in psutil.Process(server.proc.pid).children(recursive=True):
                try:
                    if "_bentoml_impl.worker.service" in proc.cmdline():
                        out[f"{kind}-{i}/{proc.pid}"] = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
    return out


def windows(
    records: list[tuple[float, float, bool]], lags: list[tuple[float, float]], t0: float, width: float, seconds: float
) -> list[dict]:
    """Per window of `width` seconds (by scheduled send time): requests, errors, p50 and p99 of the good ones,
    and the p99 of how late the generator itself started them (its own stalls, not the server's)."""
    out = []
    for k in range(max(1, round(seconds / width))):
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        inside = [(s, e, ok) for s, e, ok in records if lo <= s < hi]
        p50, _, p99 = benchmark.pct([e - s for s, e, ok in inside if ok])
        *_, lag99 = benchmark.pct([lag for s, lag in lags if lo <= s < hi])
        out.append({"window": k, "requests": len(inside), "errors": sum(not ok for *_, ok in inside),
                    "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "send_lag_p99_ms": round(lag99, 2)})  # fmt: skip
    return out


async def _all(coroutines):
    return await asyncio.gather(*coroutines)


def soak(stack, data: real_inputs.Inputs, args: argparse.Namespace) -> dict:
    requests = {m: benchmark.request_bodies(m, data, benchmark.FORMATS[m][0]) for m in MODELS}
    urls = {m: stack.proxy_url + requests[m][0] for m in MODELS}
    print(f"saturation: {args.concurrency} clients per model for {args.saturation_seconds:g} s ...", flush=True)
    closed = asyncio.run(_all(benchmark.closed_loop(urls[m], requests[m][1], requests[m][2], args.concurrency,
                                                    args.saturation_seconds, 2.0) for m in MODELS))  # fmt: skip
    saturation = {m: sum(ok for *_, ok in rec) / secs for m, (rec, secs) in zip(MODELS, closed, strict=True)}
    rates = {m: args.load * saturation[m] for m in MODELS}
    print(f"saturation {saturation} req/s; soaking at {rates} req/s for {args.minutes:g} min ...", flush=True)
    rss_start = worker_rss_mb(stack)
    seconds = 60 * args.minutes
    failures: dict[str, Counter] = {m: Counter() for m in MODELS}
    lags: dict[str, list[tuple[float, float]]] = {m: [] for m in MODELS}
    me, cpu_start = psutil.Process(), time.perf_counter()
    own_cpu = sum(me.cpu_times()[:2])
    # Each worker's RSS at every window's end, from a thread: growth that levels off is warm-up (arenas,
    # caches), growth that keeps its slope is a leak.
    rss_by_window: dict[str, list[float]] = {w: [] for w in rss_start}
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(args.window):
            for w, mb in worker_rss_mb(stack).items():
                rss_by_window.setdefault(w, []).append(round(mb, 1))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    runs = asyncio.run(_all(benchmark.open_loop(urls[m], requests[m][1], requests[m][2], rates[m], seconds, 0.0,
                                                failures[m], args.connections, lags[m]) for m in MODELS))  # fmt: skip
    stop.set()
    sampler.join()
    # The load generator shares the machine: how much of it did it take (1.0 = one core)?
    generator_cores = (sum(me.cpu_times()[:2]) - own_cpu) / (time.perf_counter() - cpu_start)
    rss_end = worker_rss_mb(stack)
    report = {}
    for m, (records, _) in zip(MODELS, runs, strict=True):
        per_window = windows(records, lags[m], t0, args.window, seconds)
        report[m] = {
            "saturation_rps": round(saturation[m], 1), "target_rps": round(rates[m], 1),
            "requests": len(records), "errors": sum(not ok for *_, ok in records),
            "errors_by_kind": dict(failures[m].most_common()),
            "achieved_rps": round(sum(ok for *_, ok in records) / seconds, 1),
            "p99_first_window_ms": per_window[0]["p99_ms"], "p99_last_window_ms": per_window[-1]["p99_ms"],
            "windows": per_window,
        }  # fmt: skip
    growth = {w: round(rss_end[w] - rss_start[w], 1) for w in rss_start if w in rss_end}
    report["load_generator_cores"] = round(generator_cores, 2)
    report["workers"] = {"rss_start_mb": {w: round(v, 1) for w, v in rss_start.items()},
                         "rss_end_mb": {w: round(v, 1) for w, v in rss_end.items()}, "rss_growth_mb": growth,
                         "rss_by_window_mb": rss_by_window, "lost": sorted(set(rss_start) - set(rss_end))}  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    from deploy.local_stack import LocalStack

    args = parse(argv)
    command = shlex.join(["python", "-m", "loadtest.soak", *(sys.argv[1:] if argv is None else argv)])
    data = real_inputs.load(args.inputs)
    workdir = Path(tempfile.mkdtemp(prefix="servable-soak-"))
    print(f"starting the local stack ({args.replicas}+{args.replicas} replicas behind nginx) in {workdir}", flush=True)
    started = time.time()
    # the proxy's limits out of reach of the one load-generator address (65535: limit_conn's largest)
    with LocalStack(workdir, args.image_tag, args.text_tag, {"soak": benchmark.KEY}, replicas=args.replicas,
                    rate_limit="100000r/s", rate_burst=100000, conn_limit=65535) as stack:  # fmt: skip
        os.environ.update(stack.client_env())  # the clients trust the proxy's own CA (read per session)
        tags = {m: stack.tags[m] for m in MODELS}
        report = soak(stack, data, args)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    payload = {"command": command, "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
               "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "memory_gib": round(psutil.virtual_memory().total / 2**30)},
               "note": args.note, "models": tags, "minutes": args.minutes, "load": args.load, "window_s": args.window,
               "replicas_per_model": args.replicas, "connections_per_model": args.connections, **report}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    errors = sum(report[m]["errors"] for m in MODELS)
    for m in MODELS:
        r = report[m]
        print(f"{m}: {r['requests']} requests at {r['target_rps']}/s, {r['errors']} errors {r['errors_by_kind']}, p99 "
              f"{r['p99_first_window_ms']} -> {r['p99_last_window_ms']} ms")  # fmt: skip
    print(f"worker RSS growth (MB): {report['workers']['rss_growth_mb']}; written {args.out}")
    return 1 if errors or report["workers"]["lost"] or not all(np.isfinite(report[m]["p99_last_window_ms"])
                                                               for m in MODELS) else 0  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
