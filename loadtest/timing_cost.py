"""What the per-request timing headers cost a worker, per answer, against what a whole answer costs it.

`SERVER_TIMING=false` only skips rendering `Server-Timing` and `x-batch-size` and adding them to the answer
(serving/model_service.py::ModelService.respond): the timing record itself stays, since admission by
predicted wait and the metrics read it. So the headers' cost is that rendering, timed here in this process
on a RequestTiming with the parts a real answer has, against the HTTP workers' CPU time per answer
measured under load by `loadtest.setting_cost` (its `off` side, headers off). On a CPU-bound server,
throughput goes as one over the CPU time per answer, so their quotient bounds what the headers cost in
throughput: a figure that alternating rounds cannot show, as rounds of one configuration differ by more.

    python -m loadtest.setting_cost --on SERVER_TIMING=true --off SERVER_TIMING=false --rounds 3 \\
        --out docs/results/benchmark/timing-cost/setting_cost.json
    python -m loadtest.timing_cost docs/results/benchmark/timing-cost/setting_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

from starlette.responses import Response

from loadtest import cli
from serving.request_timing import RequestTiming


def headers_seconds(number: int = 20_000, repeat: int = 7) -> float:
    """Seconds per answer to render and add the timing headers (best of `repeat`), the answer's own creation
    and its parts' timing (which stay when the headers are off) subtracted."""
    start = time.perf_counter()

    def timing() -> RequestTiming:
        t = RequestTiming(start, start + 1.0, batch_rows=32)
        for name in ("decode", "queue", "model"):
            t.part(name, start, 0.001234)
        return t

    def with_headers() -> None:
        timing().attach(Response(b"{}", media_type="application/json"), start)

    def without() -> None:  # what respond() does with the headers off: nothing after the answer is made
        timing()
        Response(b"{}", media_type="application/json")

    on = min(timeit.repeat(with_headers, number=number, repeat=repeat)) / number
    off = min(timeit.repeat(without, number=number, repeat=repeat)) / number
    return max(on - off, 0.0)


def cpu_per_answer(points: list[dict]) -> float:
    """Median over points of the HTTP workers' CPU seconds (every priority) per answer."""
    return statistics.median(sum(p["worker_cpu_s"].values()) / (p["rps"] * p["seconds"]) for p in points)


def report(rounds: dict, header_s: float) -> dict:
    out = {"headers_us_per_answer": round(header_s * 1e6, 2), "models": {}}
    for model, m in rounds["models"].items():
        off = [p for p in m["points"] if p["label"] == "off"]
        cpu = cpu_per_answer(off)
        out["models"][model] = {
            "worker_cpu_ms_per_answer": round(cpu * 1e3, 3),
            "headers_share_of_cpu": round(header_s / cpu, 5),
            "rounds_rps_on_over_off": m["summary"]["rps_on_over_off"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from servable.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rounds", type=Path, help="a loadtest.setting_cost JSON of SERVER_TIMING on against off")
    ap.add_argument("--out", type=Path, help="default: timing_cost.json beside the rounds' JSON")
    args = ap.parse_args(argv)
    rounds = json.loads(args.rounds.read_text())
    command = "python -m loadtest.timing_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": describe_machine(), "rounds": str(args.rounds),
              **report(rounds, headers_seconds())}  # fmt: skip
    for model, m in result["models"].items():
        print(
            f"{model}: headers {result['headers_us_per_answer']} µs of {m['worker_cpu_ms_per_answer']} ms CPU "
            f"per answer = {m['headers_share_of_cpu']:.3%}; rounds' on/off req/s {m['rounds_rps_on_over_off']}"
        )
    return cli.write_result(args.out or args.rounds.with_name("timing_cost.json"), result)


if __name__ == "__main__":
    sys.exit(main())
