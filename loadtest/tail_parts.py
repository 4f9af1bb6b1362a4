"""Where the slow answers' time goes: each answer's `Server-Timing` parts, the slowest against the typical.

The benchmark's open-loop point at 70 % of saturation gives a p99 several times its p50 and no reason. Every
answer carries its own parts (serving/request_timing.py: decode, queue, model, encode, total, and the batch
it rode in), so this runs the same open loop (Poisson arrivals at a mean rate, latency from the scheduled
send time), keeps each answer's parts, and compares the slowest 1 % with the middle of the distribution. What the
server's parts do not cover — the client's latency minus the server's `total` — is time before the route
started: the connection's queue, the worker's event loop busy with other requests, the load generator.

What a queue alone gives: `loadtest/queueing.py::fifo_floor` simulates a FIFO queue with Poisson arrivals
and a constant service time at the same load (M/D/1, and M/D/2 for two servers sharing one queue), and the
result records its p99 / p50 beside the measured ones.

A machine whose speed drifts within minutes makes one point's "70 %" anything from 50 % to 100 %, so
`--repeats N` runs N points per input set, each between two saturation measurements (closed loop, the
same server), and records the share each point really sent; the summary is the median over the points.
`--photos` adds the image model's photo mix (loadtest/inputs.py) as a second image input set.

    python -m loadtest.tail_parts --models image text --load 0.7 --repeats 5 --photos \
        --out docs/results/benchmark/tail-parts-poisson/tail_parts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest import benchmark, cli, setting_cost
from loadtest import inputs as real_inputs
from loadtest.queueing import fifo_floor

PARTS = ("decode", "queue", "model", "encode", "total")
TIMING = re.compile(r"(\w+);dur=([\d.]+)")
SATURATION_SECONDS = 5.0


def parse_timing(header: str) -> dict[str, float]:
    """`Server-Timing` as {part: milliseconds}."""
    return {name: float(ms) for name, ms in TIMING.findall(header)}


def connection_timing():
    """aiohttp tracing that records, in each request's `trace_request_ctx` dict, the milliseconds spent opening
    a new connection for it (absent: it reused one)."""
    import aiohttp

    async def started(session, ctx, params) -> None:
        ctx.trace_request_ctx["connect_start"] = time.perf_counter()

    async def ended(session, ctx, params) -> None:
        ctx.trace_request_ctx["connect_ms"] = 1000 * (time.perf_counter() - ctx.trace_request_ctx["connect_start"])

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(started)
    trace.on_connection_create_end.append(ended)
    return trace


async def timed_open_loop(url: str, headers, bodies: list[bytes], rate: float, seconds: float, warmup: float,
                          seed: int = 0):  # fmt: skip
    """benchmark.open_loop's schedule, keeping each answer's latency (ms, from its scheduled time), status,
    Server-Timing parts and batch size, how late the generator started it (`late_ms`) and what opening a new
    connection for it cost (`connect_ms`, 0 when it reused one)."""
    rows: list[dict] = []
    async with benchmark._client_session(trace_configs=[connection_timing()]) as session:

        async def fire(t_sched: float, body: bytes) -> None:
            late_ms, ctx = 1000 * (time.perf_counter() - t_sched), {}
            try:
                async with session.post(url, data=body, headers=headers, trace_request_ctx=ctx) as r:
                    await r.read()
                    parts = parse_timing(r.headers.get("server-timing", ""))
                    batch = int(r.headers.get("x-batch-size", 0) or 0)
                    status = r.status
            except Exception:  # a failure (network, time-out) is a row with no parts
                parts, batch, status = {}, 0, 0
            rows.append({"sent": t_sched, "latency_ms": 1000 * (time.perf_counter() - t_sched), "status": status,
                         "batch": batch, "late_ms": late_ms, "connect_ms": ctx.get("connect_ms", 0.0),
                         "new_connection": "connect_ms" in ctx, **parts})  # fmt: skip

        t_start = await benchmark.send_paced(fire, bodies, rate, warmup + seconds, seed)
    return [r for r in rows if r.pop("sent") >= t_start + warmup]


def mean_parts(rows: list[dict]) -> dict[str, float]:
    """Mean latency, each part, the time outside the server's parts (before the route; of it, the generator's
    lateness and new connections' opening), the share of new connections and the batch size."""
    out = {"requests": len(rows), "latency_ms": statistics.fmean(r["latency_ms"] for r in rows)}
    for part in PARTS:
        out[part + "_ms"] = statistics.fmean(r.get(part, 0.0) for r in rows)
    out["outside_server_ms"] = statistics.fmean(r["latency_ms"] - r.get("total", 0.0) for r in rows)
    out["generator_late_ms"] = statistics.fmean(r.get("late_ms", 0.0) for r in rows)
    out["new_connection_ms"] = statistics.fmean(r.get("connect_ms", 0.0) for r in rows)
    out["new_connection_share"] = statistics.fmean(r.get("new_connection", False) for r in rows)
    out["batch"] = statistics.fmean(r["batch"] for r in rows)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def compare(rows: list[dict]) -> dict:
    """The slowest 1 % of the answered requests against the middle 40-60 %."""
    ok = sorted((r for r in rows if r["status"] == 200), key=lambda r: r["latency_ms"])
    n = len(ok)
    if n < 100:
        raise ValueError(f"{n} answered requests: too few to compare a slowest 1 %")
    return {"p50_ms": round(ok[n // 2]["latency_ms"], 1), "p99_ms": round(ok[int(0.99 * n)]["latency_ms"], 1),
            "failed": len(rows) - n, "middle": mean_parts(ok[int(0.4 * n) : int(0.6 * n)]),
            "slowest_1pct": mean_parts(ok[int(0.99 * n) :])}  # fmt: skip


def saturation_rps(url: str, headers, bodies: list[bytes], clients: int, warmup: float) -> float:
    """Answered requests a second with `clients` closed-loop clients, over SATURATION_SECONDS."""
    records, secs = asyncio.run(benchmark.closed_loop(url, headers, bodies, clients, SATURATION_SECONDS, warmup))
    return sum(1 for *_, ok in records if ok) / secs


def input_sets(models: list[str], photos: bool) -> list[tuple[str, str]]:
    """(model, input set) pairs: each model's bundled inputs, and the image photo mix when asked."""
    return [(m, "bundled") for m in models] + ([("image", "photo mix")] if photos and "image" in models else [])


def point_summary(rate: float, sat_before: float, sat_after: float, rows: list[dict]) -> dict:
    """One open-loop point sent at `rate`: the share of the saturation around it that it sent, its p50/p99
    and parts."""
    found = compare(rows)
    return {"saturation_before_rps": round(sat_before, 1), "saturation_after_rps": round(sat_after, 1),
            "rate": round(rate, 1), "share_sent": round(rate / ((sat_before + sat_after) / 2), 3),
            "p99_over_p50": round(found["p99_ms"] / found["p50_ms"], 2), **found}  # fmt: skip


def summary(points: list[dict]) -> dict:
    """Medians over the points of one input set, and each point's ratio and share in order."""
    return {"points": len(points),
            "median_p99_over_p50": round(statistics.median(p["p99_over_p50"] for p in points), 2),
            "median_p50_ms": round(statistics.median(p["p50_ms"] for p in points), 1),
            "median_p99_ms": round(statistics.median(p["p99_ms"] for p in points), 1),
            "median_share_sent": round(statistics.median(p["share_sent"] for p in points), 3),
            "p99_over_p50_each": [p["p99_over_p50"] for p in points],
            "share_sent_each": [p["share_sent"] for p in points],
            "failed": sum(p["failed"] for p in points)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from servable import artifact
    from servable.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(ap)
    ap.add_argument("--load", type=float, default=0.7, help="share of the closed-loop saturation sent")
    ap.add_argument("--repeats", type=int, default=1, help="open-loop points per input set, each between "
                    "two saturation measurements")  # fmt: skip
    ap.add_argument("--photos", action="store_true", help="also the image model's photo mix")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a serve setting for every model, without its prefix (e.g. INTRA_OP_THREADS=2)")  # fmt: skip
    cli.add_load_options(ap)  # --clients: the closed loop that measures saturation
    ap.add_argument("--out", type=Path, default=Path("docs/results/benchmark/tail-parts-poisson/tail_parts.json"))
    args = ap.parse_args(argv)
    try:  # a bad --setting is an error before any work
        settings = setting_cost.settings(args.setting)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    data, log_dir = real_inputs.load(args.inputs), Path(tempfile.mkdtemp(prefix="servable-tail-parts-logs-"))
    result = {"command": "python -m loadtest.tail_parts " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load": args.load, "arrivals": "poisson", "settings": args.setting,
              "fifo_floor_p99_over_p50": {"one queue (M/D/1)": round(fifo_floor(args.load), 2),
                                          "two servers, one queue (M/D/2)": round(fifo_floor(args.load, 2), 2)},
              "models": {}}  # fmt: skip
    servers, tags = {}, {m: artifact.load(cli.tag_of(args, m)).tag for m in args.models}
    try:
        for model, inputs in input_sets(args.models, args.photos):
            if model not in servers:
                servers[model] = benchmark.start_served(model, tags[model], settings, "served default", log_dir)
            fmt = benchmark.FORMATS[model][0]  # the benchmark's main format
            path, headers, bodies = benchmark.request_bodies(
                model, data.photo_mix() if inputs == "photo mix" else data, fmt
            )
            url = servers[model].url + path
            points: list[dict] = []
            sat = saturation_rps(url, headers, bodies, args.clients, args.warmup)
            for k in range(args.repeats):
                rate = args.load * sat
                rows = asyncio.run(timed_open_loop(url, headers, bodies, rate, args.seconds, args.warmup, seed=k))
                after = saturation_rps(url, headers, bodies, args.clients, args.warmup)
                points.append(point_summary(rate, sat, after, rows))
                print(f"{model} [{inputs}] {k + 1}/{args.repeats}: share {points[-1]['share_sent']}, p50 "
                      f"{points[-1]['p50_ms']} ms, p99 {points[-1]['p99_ms']} ms, ratio {points[-1]['p99_over_p50']}",
                      flush=True)  # fmt: skip
                sat = after
            found = {"tag": tags[model], "summary": summary(points), "each": points}
            result["models"][model if inputs == "bundled" else f"{model} [{inputs}]"] = found
            print(f"{model} [{inputs}]: {json.dumps(found['summary'])}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return cli.write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
