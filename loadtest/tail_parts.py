"""Where the slow answers' time goes: each answer's `Server-Timing` parts, the slowest against the typical.

The benchmark's open-loop point at 70 % of saturation gives a p99 several times its p50 and no reason. Every
answer carries its own parts (serving/request_timing.py: decode, queue, model, encode, total, and the batch
it rode in), so this runs the same open loop (a fixed rate, latency from the scheduled send
time), keeps each answer's parts, and compares the slowest 1 % with the middle of the distribution. What the
server's parts do not cover — the client's latency minus the server's `total` — is time before the route
started: the connection's queue, the worker's event loop busy with other requests, the load generator.

    python -m loadtest.tail_parts --models image text --load 0.7 \
        --out docs/results/benchmark/tail-parts/tail_parts.json
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

from loadtest import benchmark, cli
from loadtest import inputs as real_inputs

PARTS = ("decode", "queue", "model", "encode", "total")
TIMING = re.compile(r"(\w+);dur=([\d.]+)")


def parse_timing(header: str) -> dict[str, float]:
    """`Server-Timing` as {part: milliseconds}."""
    return {name: float(ms) for name, ms in TIMING.findall(header)}


async def timed_open_loop(url: str, headers, bodies: list[bytes], rate: float, seconds: float, warmup: float):
    """benchmark.open_loop's schedule, keeping each answer's latency (ms, from its scheduled time), status,
    Server-Timing parts and batch size."""
    rows: list[dict] = []
    async with benchmark._client_session() as session:

        async def fire(t_sched: float, body: bytes) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    parts = parse_timing(r.headers.get("server-timing", ""))
                    batch = int(r.headers.get("x-batch-size", 0) or 0)
                    status = r.status
            except Exception:  # a failure (network, time-out) is a row with no parts
                parts, batch, status = {}, 0, 0
            rows.append({"sent": t_sched, "latency_ms": 1000 * (time.perf_counter() - t_sched), "status": status,
                         "batch": batch, **parts})  # fmt: skip

        t_start = await benchmark.send_paced(fire, bodies, rate, warmup + seconds)
    return [r for r in rows if r.pop("sent") >= t_start + warmup]


def mean_parts(rows: list[dict]) -> dict[str, float]:
    """Mean latency, each part, the time outside the server's parts (before the route) and the batch size."""
    out = {"requests": len(rows), "latency_ms": statistics.fmean(r["latency_ms"] for r in rows)}
    for part in PARTS:
        out[part + "_ms"] = statistics.fmean(r.get(part, 0.0) for r in rows)
    out["outside_server_ms"] = statistics.fmean(r["latency_ms"] - r.get("total", 0.0) for r in rows)
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


def main(argv: list[str] | None = None) -> int:
    from servable import artifact
    from servable.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(ap)
    ap.add_argument("--load", type=float, default=0.7, help="share of the closed-loop saturation sent")
    cli.add_load_options(ap)  # --clients: the closed loop that measures saturation
    ap.add_argument("--out", type=Path, default=Path("docs/results/benchmark/tail-parts/tail_parts.json"))
    args = ap.parse_args(argv)
    data, log_dir = real_inputs.load(args.inputs), Path(tempfile.mkdtemp(prefix="servable-tail-parts-logs-"))
    result = {"command": "python -m loadtest.tail_parts " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load": args.load, "models": {}}  # fmt: skip
    for model in args.models:
        tag = artifact.load(cli.tag_of(args, model)).tag
        server = benchmark.start_served(model, tag, {}, "served default", log_dir)
        try:
            fmt = benchmark.FORMATS[model][0]  # the benchmark's main format
            path, headers, bodies = benchmark.request_bodies(model, data, fmt)
            url = server.url + path
            records, secs = asyncio.run(benchmark.closed_loop(url, headers, bodies, args.clients, 10.0, args.warmup))
            saturation = sum(1 for *_, ok in records if ok) / secs
            rows = asyncio.run(timed_open_loop(url, headers, bodies, args.load * saturation, args.seconds,
                                               args.warmup))  # fmt: skip
        finally:
            server.stop()
        found = {"tag": tag, "saturation_rps": round(saturation, 1), "rate": round(args.load * saturation, 1),
                 **compare(rows)}  # fmt: skip
        result["models"][model] = found
        print(f"{model}: {json.dumps(found)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
