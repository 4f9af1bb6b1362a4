"""Do explanations slow predictions? Predict p99 with and without concurrent explain load, and the cost
of one explanation: `python -m loadtest.explain_load` (`make explain-load`) -> docs/results/explain/.

For each served model (the registered defaults, default settings):
  1. cost: explanations one at a time on an idle server (median and p95 ms, model rows), beside
     one prediction's latency;
  2. predict alone: open-loop predictions at a mean rate, Poisson arrivals (latency from the scheduled send time,
     so a stall counts in full);
  3. the same predictions while `--explain-clients` clients send explanations back to back (more
     than a replica admits, so its queue limit answers 429 to the excess);
  4. step 3 again with the explain process at the predict path's priority (EXPLAIN_NICE=0): what
     the lower priority buys on top of the separate process (in-process topology: each worker
     computes explanations in a child process of its own, serving/explain_process.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest import cli
from loadtest import inputs as real_inputs
from loadtest.benchmark import _client_session, _headers, open_loop, pct, start_served
from servable.config import ImageServeSettings, TextServeSettings
from servable.machine import describe_machine

OUT = Path("docs/results/explain")


def _bodies(model: str, data: real_inputs.Inputs) -> tuple[str, str, dict, list[bytes], dict]:
    """(predict path, explain path, headers, bodies, explain query) of one model's requests."""
    if model == "image":
        ctype = "image/png"
        images = [b for b in data.images if b.startswith(b"\x89PNG")]
        return "/classify", "/classify/explain", _headers(ctype), images, {"grid": "8", "overlay": "true"}
    words = TextServeSettings().explain_max_words()  # longer texts are refused (413 too_many_words)
    bodies = [json.dumps({"text": t}).encode() for t in data.texts if len(t.split()) <= words]
    return "/sentiment", "/sentiment/explain", _headers("application/json"), bodies, {}


async def _timed(session, url: str, headers, body: bytes, params=None) -> tuple[float, int, dict]:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers, params=params or {}) as r:
        payload = await r.read()
        status = r.status
    return time.perf_counter() - t0, status, json.loads(payload) if status == 200 else {}


async def cost(base: str, model: str, data, n: int) -> dict:
    predict, explain, headers, bodies, query = _bodies(model, data)
    out: dict = {}
    async with _client_session() as session:
        cases = [("predict", predict, {}), ("explain", explain, query)]
        if model == "image":
            cases.append(("explain_largest_grid", explain, {"grid": str(ImageServeSettings().explain_max_grid())}))
        for name, path, params in cases:
            lat, rows = [], []
            for i in range(n + 2):
                s, status, body = await _timed(session, base + path, headers, bodies[i % len(bodies)], params)
                assert status == 200, (path, status)
                if i >= 2:  # first calls warm the path
                    lat.append(s)
                    rows.append(body.get("explanation", {}).get("rows", 1))
            out[name] = {"median_ms": round(1000 * float(np.median(lat)), 2),
                         "p95_ms": round(1000 * float(np.percentile(lat, 95)), 2), "calls": n,
                         "model_rows_mean": round(float(np.mean(rows)), 1), "params": params}  # fmt: skip
    out["explain_vs_predict"] = round(out["explain"]["median_ms"] / out["predict"]["median_ms"], 1)
    return out


async def warm_explanations(base: str, model: str, data, calls: int = 6, ready=None, tries: int = 60) -> None:
    """Explanations before measuring: a worker's explain process starts on its first explanation, so the
    measured phases would include those starts. At least `calls` of them, then more (up to `tries`) until
    `ready()` says every worker has its explain process (the kernel spreads connections unevenly)."""
    _, explain, headers, bodies, query = _bodies(model, data)
    async with _client_session() as session:
        for i in range(tries):
            if i >= calls and (ready is None or ready()):
                return
            _, status, _ = await _timed(session, base + explain, headers, bodies[i % len(bodies)], query)
            assert status in (200, 503), (explain, status)  # 503: a first call that met its deadline in a start


async def explain_clients(base: str, model: str, data, clients: int, seconds: float, warmup: float) -> list:
    _, explain, headers, bodies, query = _bodies(model, data)
    records: list[tuple[float, float, int]] = []
    async with _client_session() as session:
        t_end = time.perf_counter() + warmup + seconds

        async def client(cid: int) -> None:
            i = cid * 31
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    _, status, _ = await _timed(session, base + explain, headers, bodies[i % len(bodies)], query)
                except Exception:
                    status = 0
                records.append((t0, time.perf_counter(), status))
                i += 1
                if status == 429:  # as a client that honours Retry-After would, shortened
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(client(c) for c in range(clients)))
    return records


def summarise_predict(records, seconds: float) -> dict:
    ok = [e - s for s, e, good in records if good]
    p50, p95, p99 = pct(ok)
    errors = sum(1 for *_, g in records if not g)
    return {"requests": len(records), "errors": errors, "rps": round(len(ok) / seconds, 1),
            "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2)}  # fmt: skip


def summarise_explain(records, seconds: float, t_from: float) -> dict:
    window = [r for r in records if r[0] >= t_from]
    by_status: dict[str, int] = {}
    for *_, status in window:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    ok = sorted(e - s for s, e, status in window if status == 200)
    return {"by_status": by_status, "explanations_per_s": round(len(ok) / seconds, 2),
            "p50_ms": round(1000 * float(np.median(ok)), 1) if ok else None,
            "p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None}  # fmt: skip


async def under_load(base: str, model: str, data, rate: float, seconds: float, warmup: float, clients: int) -> dict:
    predict, _, headers, bodies, _ = _bodies(model, data)
    t_start = time.perf_counter()
    jobs = [open_loop(base + predict, headers, bodies, rate, seconds, warmup)]
    if clients:
        jobs.append(explain_clients(base, model, data, clients, seconds, warmup))
    results = await asyncio.gather(*jobs)
    out = {"predict": summarise_predict(*results[0])}
    if clients:
        out["explain"] = summarise_explain(results[1], seconds, t_start + warmup)
    return out


def resident_memory_mib(server) -> dict[str, list[float]]:
    """Resident memory of the server's HTTP workers and of their explain processes (the children
    multiprocessing spawned for explanations), MiB each; read as `loadtest/soak.py` reads its workers'."""
    import psutil

    out: dict[str, list[float]] = {"http_workers": [], "explain_processes": []}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            cmd, rss = " ".join(proc.cmdline()), proc.memory_info().rss
        except psutil.Error:
            continue
        kind = "explain_processes" if "spawn_main" in cmd else "http_workers" if "worker" in cmd else None
        if kind:
            out[kind].append(round(rss / 2**20, 1))
    return out


def run_model(model: str, tag: str, args, data, log_dir: Path) -> dict:
    result: dict = {"tag": tag}
    for label, settings in (("default", {}), ("explain_nice_0", {"EXPLAIN_NICE": "0"})):
        server = start_served(model, tag, settings, label, log_dir)
        try:
            workers = len(resident_memory_mib(server)["http_workers"])
            asyncio.run(warm_explanations(server.url, model, data, ready=lambda s=server, n=workers:
                                          len(resident_memory_mib(s)["explain_processes"]) >= n))  # fmt: skip
            if label == "default":
                result["cost"] = asyncio.run(cost(server.url, model, data, args.cost_calls))
                print(f"{model} cost: {json.dumps(result['cost'])}", flush=True)
                result["resident_memory_mib"] = resident_memory_mib(server)
                print(f"{model} resident memory: {json.dumps(result['resident_memory_mib'])}", flush=True)
                result["predict_alone"] = asyncio.run(
                    under_load(server.url, model, data, args.rate[model], args.seconds, args.warmup, 0)
                )
                print(f"{model} predict alone: {json.dumps(result['predict_alone'])}", flush=True)
            point = asyncio.run(
                under_load(server.url, model, data, args.rate[model], args.seconds, args.warmup, args.explain_clients)
            )
            result[f"with_explain_load_{label}"] = point
            print(f"{model} with explain load ({label}): {json.dumps(point)}", flush=True)
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(parser)
    parser.add_argument("--image-rate", type=float, default=150.0, help="predictions/s, open loop")
    parser.add_argument("--text-rate", type=float, default=40.0, help="predictions/s, open loop")
    parser.add_argument("--explain-clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--cost-calls", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.rate = {"image": args.image_rate, "text": args.text_rate}
    tags = {m: cli.tag_of(args, m) for m in cli.KINDS}
    data = real_inputs.load()
    report = {
        "command": "python -m loadtest.explain_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe_machine(), "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "rate")} | {"rate": args.rate},
        "models": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="explain-load-") as logs:
        for model in args.models:
            report["models"][model] = run_model(model, tags[model], args, data, Path(logs))
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here
    return cli.write_result(args.out / "explain_load.json", report)


if __name__ == "__main__":
    sys.exit(main())
