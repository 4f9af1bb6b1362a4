"""Serving benchmark: figures, not timed tests. One run, one machine, everything side by side.

For each model it measures throughput (requests/s, items/s) and p50/p95/p99 latency of:
  1. raw ONNX Runtime in-process at batch 1 and at the best batch size (the ceiling);
  2. the BentoML service, adaptive batching on and off, at several client concurrencies;
  3. fp32 vs int8 (and ORT-optimised vs not for BERT), served and raw;
  4. the peer a user would otherwise write: FastAPI + PyTorch eager, one request at a time;
  5. CUDA vs CPU provider, when a GPU really loads (skipped, and said so, where none does);
plus an open-loop run at 70 % of saturation for the p99/p50 target. Writes benchmark.md,
benchmark.json and PNG plots to docs/results/benchmark/.

    python -m loadtest.benchmark            # full (~10-15 min on 2 cores)
    python -m loadtest.benchmark --quick    # a smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from loadtest import inputs as real_inputs

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-" + secrets.token_hex(8)


@dataclass
class Point:
    model: str
    config: str  # e.g. "served fp32 batching on", "raw ORT fp32 b8", "pytorch eager"
    kind: str  # raw | served | eager
    concurrency: int  # clients (raw: batch size); open loop: 0
    requests: int
    errors: int
    seconds: float
    rps: float
    items_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    target_rps: float | None = None  # open loop only
    # The machine-speed probe (raw ORT fp32 batch 1, items/s) measured around this point: the machine is
    # shared, so ratios divide each throughput by the probe taken at the same time (drift-corrected).
    probe_items_s: float | None = None

    @property
    def relative(self) -> float | None:
        return self.items_s / self.probe_items_s if self.probe_items_s else None


@dataclass
class ModelResult:
    model: str
    tag: str
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preprocess_ms_per_item: float = 0.0


def pct(lat_s: list[float]) -> tuple[float, float, float]:
    if not lat_s:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(lat_s) * 1000, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


# ---------------------------------------------------------------- raw ONNX Runtime in-process


def ort_session(path: Path, device: str):
    from servable.config import ImageServeSettings
    from serving.onnx_runtime import create_session

    return create_session(path, ImageServeSettings(device=device))  # only device/threads/opt-level are read


def cuda_available(path: Path) -> bool:
    """True only if the CUDA provider really loads (onnxruntime-gpu lists it even without a GPU)."""
    try:
        _, provider = ort_session(path, "cuda")
    except Exception:
        return False
    return provider == "CUDAExecutionProvider"


def raw_feeds(model: str, art, data: real_inputs.Inputs, n: int) -> dict[str, np.ndarray]:
    from servable.preprocessing import encode_texts, load_tokenizer, preprocess_image

    m = art.manifest
    if model == "image":
        prep = m.image_preprocessing
        blobs = [data.images[i % len(data.images)] for i in range(n)]
        return {prep.input_name: np.stack([preprocess_image(b, prep) for b in blobs])}
    prep = m.text_preprocessing
    tok = load_tokenizer(art.file(prep.tokenizer_file), prep)
    return encode_texts(tok, [data.texts[i % len(data.texts)] for i in range(n)], prep)


def preprocess_cost(model: str, art, data: real_inputs.Inputs, n: int = 200) -> float:
    """Milliseconds per item of the shared pre-processing (decode+resize+normalise, or tokenise)."""
    start = time.perf_counter()
    raw_feeds(model, art, data, n)
    return 1000 * (time.perf_counter() - start) / n


def raw_points(model: str, art, data, variant: str, device: str, batches: list[int], seconds: float) -> list[Point]:
    session, provider = ort_session(art.onnx_path(variant), device)
    label = f"raw ORT {variant}" + (" cuda" if provider == "CUDAExecutionProvider" else "")
    out = []
    for b in batches:
        # Real inputs, cycling through different items so text batches vary in length as served ones do.
        feeds_list = [raw_feeds(model, art, data, b) if model == "image" else
                      _text_slice(art, data, b, k) for k in range(4)]  # fmt: skip
        session.run(None, feeds_list[0])  # warm-up
        lat, start, k = [], time.perf_counter(), 0
        while time.perf_counter() - start < seconds or len(lat) < 3:
            t0 = time.perf_counter()
            session.run(None, feeds_list[k % 4])
            lat.append(time.perf_counter() - t0)
            k += 1
        elapsed = time.perf_counter() - start
        p50, p95, p99 = pct(lat)
        out.append(Point(model, f"{label} b{b}", "raw", b, len(lat), 0, elapsed, len(lat) / elapsed,
                         len(lat) * b / elapsed, p50, p95, p99))  # fmt: skip
    return out


def probe(model: str, art, data, seconds: float) -> float:
    """Raw ORT fp32 batch 1 items/s right now: the yardstick of how fast the shared machine is at the moment."""
    return raw_points(model, art, data, "fp32", "cpu", [1], seconds)[0].items_s


def with_probe(points: list[Point], before: float, after: float) -> list[Point]:
    for p in points:
        p.probe_items_s = (before + after) / 2
    return points


def _text_slice(art, data, b: int, k: int) -> dict[str, np.ndarray]:
    from servable.preprocessing import encode_texts, load_tokenizer

    prep = art.manifest.text_preprocessing
    tok = load_tokenizer(art.file(prep.tokenizer_file), prep)
    texts = [data.texts[(k * b + i) % len(data.texts)] for i in range(b)]
    return encode_texts(tok, texts, prep)


# ---------------------------------------------------------------- HTTP load (aiohttp, in this process)


def request_bodies(model: str, data: real_inputs.Inputs) -> tuple[str, list[bytes]]:
    """Pre-encoded single-item JSON bodies, so the client spends almost no CPU building them."""
    if model == "image":
        return "/classify", [json.dumps({"image": base64.b64encode(b).decode()}).encode() for b in data.images]
    return "/sentiment", [json.dumps({"text": t}).encode() for t in data.texts]


HEADERS = {"content-type": "application/json", "x-api-key": KEY}


def _client_session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60))


async def _one(session, url: str, body: bytes) -> bool:
    """One request; True for a 200 with one prediction. Any failure (status, body, network) is False."""
    try:
        async with session.post(url, data=body, headers=HEADERS) as r:
            payload = await r.read()
            if r.status != 200:
                return False
            return len(json.loads(payload).get("predictions", [])) == 1
    except Exception:
        return False


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float):
    """`concurrency` clients, each sending its next request when the previous answer arrives."""
    records: list[tuple[float, float, bool]] = []
    async with _client_session() as session:
        t_start = time.perf_counter()
        t_end = t_start + warmup + seconds

        async def client(cid: int) -> None:
            i = cid * 7919
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                ok = await _one(session, url, bodies[i % len(bodies)])
                records.append((t0, time.perf_counter(), ok))
                i += 1

        await asyncio.gather(*(client(c) for c in range(concurrency)))
    window = [(s, e, ok) for s, e, ok in records if s >= t_start + warmup and e <= t_end]
    return window, seconds


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, warmup: float):
    """Requests at a fixed rate whatever the answers do; latency from the scheduled send time."""
    records: list[tuple[float, float, bool]] = []
    async with _client_session() as session:
        t_start = time.perf_counter()

        async def fire(t_sched: float, body: bytes) -> None:
            ok = await _one(session, url, body)
            records.append((t_sched, time.perf_counter(), ok))

        tasks, n = [], int(rate * (warmup + seconds))
        for i in range(n):
            t_sched = t_start + i / rate
            if (delay := t_sched - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(t_sched, bodies[i % len(bodies)])))
        await asyncio.gather(*tasks)
    return [(s, e, ok) for s, e, ok in records if s >= t_start + warmup], seconds


def to_point(model: str, config: str, kind: str, conc: int, records, seconds: float, rate=None) -> Point:
    ok = [e - s for s, e, good in records if good]
    p50, p95, p99 = pct(ok)
    errors = sum(1 for *_, good in records if not good)
    return Point(model, config, kind, conc, len(records), errors, seconds, len(ok) / seconds, len(ok) / seconds,
                 p50, p95, p99, rate)  # fmt: skip


def http_points(model: str, config: str, kind: str, url: str, bodies, concurrencies, seconds, warmup) -> list[Point]:
    out = []
    for c in concurrencies:
        records, secs = asyncio.run(closed_loop(url, bodies, c, seconds, warmup))
        out.append(to_point(model, config, kind, c, records, secs))
        p = out[-1]
        print(f"  {config:34s} c={c:<3d} {p.rps:7.1f} req/s  p50 {p.p50_ms:7.1f}  p99 {p.p99_ms:7.1f} ms"
              f"  errors {p.errors}", flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------- servers


def start_served(model: str, tag: str, variant: str, batching: bool, device: str, log_dir: Path):
    from serving import launch

    prefix = "SERVABLE_IMAGE_SERVE_" if model == "image" else "SERVABLE_TEXT_SERVE_"
    env = {f"{prefix}MODEL_TAG": tag, f"{prefix}VARIANT": variant, f"{prefix}BATCHING": str(batching).lower(),
           f"{prefix}DEVICE": device, f"{prefix}MAX_CONCURRENCY": "256",
           "SERVABLE_AUTH_KEYS": f"bench:{KEY}"}  # fmt: skip
    name = f"{model}-{variant}-{'on' if batching else 'off'}-{device}"
    return launch.start_ready(launch.SERVICES[model], env, log_path=log_dir / f"{name}.log", timeout_s=240)


class EagerPeer:
    """uvicorn running loadtest.eager_peer in its own process group on 127.0.0.1."""

    def __init__(self, tag: str, log_path: Path) -> None:
        from serving.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PEER_MODEL_TAG": tag}
        cmd = [sys.executable, "-m", "uvicorn", "loadtest.eager_peer:app", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--log-level", "warning"]  # fmt: skip
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        from serving import launch

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.proc.poll() is None:
            if launch.get(self.url + "/readyz", timeout=2)[0] == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"eager peer did not start; log:\n{log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- one model


def bench_model(model: str, tag: str, args, data: real_inputs.Inputs, log_dir: Path) -> ModelResult:
    from servable import artifact

    art = artifact.load(tag)
    res = ModelResult(model, art.tag)
    res.preprocess_ms_per_item = preprocess_cost(model, art, data)
    variants = [v for v in ("fp32", "int8", "optimized") if v in art.manifest.onnx]
    has_cuda = cuda_available(art.onnx_path("fp32"))
    if not has_cuda:
        res.notes.append("No GPU (or the CUDA provider did not load): CUDA rows skipped, all figures on CPU.")
    print(f"[{model}] {art.tag}: raw ONNX Runtime, variants {variants}", flush=True)
    before = probe(model, art, data, args.raw_seconds)
    sweep = [p for v in variants for p in raw_points(model, art, data, v, "cpu", args.batches, args.raw_seconds)]
    if has_cuda:
        sweep += raw_points(model, art, data, "fp32", "cuda", args.batches, args.raw_seconds)
    res.points += with_probe(sweep, before, probe(model, art, data, args.raw_seconds))

    path, bodies = request_bodies(model, data)
    configs = [("fp32", True, "cpu"), ("fp32", False, "cpu")]
    configs += [(v, True, "cpu") for v in variants if v != "fp32" and not args.quick]
    configs += [("fp32", True, "cuda")] if has_cuda else []
    for variant, batching, device in configs:
        label = f"served {variant} batching {'on' if batching else 'off'}" + (" cuda" if device == "cuda" else "")
        server = start_served(model, art.tag, variant, batching, device, log_dir)
        try:
            before = probe(model, art, data, args.raw_seconds)  # server idle: the probe has the cores
            pts = http_points(model, label, "served", server.url + path, bodies, args.concurrency, args.seconds,
                              args.warmup)  # fmt: skip
            if variant == "fp32" and device == "cpu":  # the p99 <= 3x p50 target at 70 % of saturation
                rate = 0.7 * max(p.rps for p in pts)
                records, secs = asyncio.run(open_loop(server.url + path, bodies, rate, args.seconds, args.warmup))
                pts.append(to_point(model, label + " @70%", "served-open", 0, records, secs, rate))
            res.points += with_probe(pts, before, probe(model, art, data, args.raw_seconds))
        finally:
            server.stop()
    if not args.no_eager:
        peer = EagerPeer(art.tag, log_dir / f"{model}-eager.log")
        try:
            before = probe(model, art, data, args.raw_seconds)
            pts = http_points(model, "pytorch eager (FastAPI)", "eager", peer.url + path, bodies, args.concurrency,
                              args.seconds, args.warmup)  # fmt: skip
            res.points += with_probe(pts, before, probe(model, art, data, args.raw_seconds))
        finally:
            peer.stop()
    return res


# ---------------------------------------------------------------- report


def best(points: list[Point], name: str) -> Point | None:
    """The saturation point (highest items/s) of config `name`; for raw rows `name` is "raw ORT <variant>"."""
    raw = re.compile(re.escape(name) + r" b\d+")
    cands = [p for p in points if p.config == name or raw.fullmatch(p.config)]
    return max(cands, key=lambda p: p.items_s) if cands else None


def ratios(res: ModelResult, corrected: bool = True) -> dict[str, float | None]:
    """Throughput ratios; corrected: each side divided by the machine probe taken around it."""
    pts = res.points

    def val(p: Point) -> float:
        return (p.relative or p.items_s) if corrected else p.items_s

    def r(a: Point | None, b: Point | None) -> float | None:
        return round(val(a) / val(b), 3) if a and b and val(b) else None

    raw_b1 = next((p for p in pts if p.config == "raw ORT fp32 b1"), None)
    on, off = best(pts, "served fp32 batching on"), best(pts, "served fp32 batching off")
    served = max(filter(None, [on, off]), key=val, default=None)
    raw_best = best(pts, "raw ORT fp32")
    out: dict[str, float | None] = {
        "served_on/raw_best_batch": r(on, raw_best),
        "served_off/raw_b1": r(off, raw_b1),
        "served_best/pytorch_eager": r(served, best(pts, "pytorch eager (FastAPI)")),
        "batching_on/off": r(on, off),
        "int8/fp32 served": r(best(pts, "served int8 batching on"), on),
        "int8/fp32 raw": r(best(pts, "raw ORT int8"), raw_best),
    }
    if any(p.config.startswith("raw ORT optimized") for p in pts):
        out["optimized/fp32 served"] = r(best(pts, "served optimized batching on"), on)
        out["optimized/fp32 raw"] = r(best(pts, "raw ORT optimized"), raw_best)
    if any("cuda" in p.config for p in pts):
        out["cuda/cpu served"] = r(best(pts, "served fp32 batching on cuda"), on)
        out["cuda/cpu raw"] = r(best(pts, "raw ORT fp32 cuda"), raw_best)
    return out


def tail_ratios(res: ModelResult) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for p in res.points:
        if p.kind == "served-open":
            out[f"p99/p50 {p.config}"] = round(p.p99_ms / p.p50_ms, 2) if p.p50_ms else None
    raw_best = best(res.points, "raw ORT fp32")
    out["raw fp32 best batch size"] = raw_best.concurrency if raw_best else None
    return out


def targets(rat: dict) -> list[tuple[str, str, bool | None]]:
    def fmt(v, ok):
        return ("n/a", None) if v is None else (f"{v:g}", ok(v))

    rows = []
    for name, key, ok in [(">= 0.85 of raw ORT (batching on vs raw best batch)", "served_on/raw_best_batch",
                           lambda v: v >= 0.85),
                          (">= 0.85 of raw ORT (batching off vs raw batch 1)", "served_off/raw_b1",
                           lambda v: v >= 0.85),
                          (">= 2x the PyTorch-eager peer", "served_best/pytorch_eager", lambda v: v >= 2),
                          ("p99 <= 3x p50 at 70 % of saturation (batching on)",
                           "p99/p50 served fp32 batching on @70%", lambda v: v <= 3),
                          ("p99 <= 3x p50 at 70 % of saturation (batching off)",
                           "p99/p50 served fp32 batching off @70%", lambda v: v <= 3)]:  # fmt: skip
        rows.append((name, *fmt(rat.get(key), ok)))
    return rows


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("onnxruntime-gpu", "onnxruntime", "bentoml", "torch", "transformers", "fastapi", "uvicorn",
                "aiohttp", "numpy", "locust"):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def plot(results: list[ModelResult], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        http = [p for p in res.points if p.kind in ("served", "eager")]
        for cfg in dict.fromkeys(p.config for p in http):
            pts = sorted((p for p in http if p.config == cfg), key=lambda p: p.concurrency)
            ax.plot([p.concurrency for p in pts], [p.items_s for p in pts], marker="o", label=cfg)
        b1 = next((p for p in res.points if p.config == "raw ORT fp32 b1"), None)
        ceilings = {p.config: p for p in (b1, best(res.points, "raw ORT fp32")) if p}
        for p, style in zip(ceilings.values(), (":", "--"), strict=False):
            ax.axhline(p.items_s, linestyle=style, color="grey", label=f"{p.config} (in-process ceiling)")
        concs = sorted({p.concurrency for p in http})
        # Log y: the in-process ceiling of a small model can be 10x above anything served over HTTP.
        ax.set(
            xscale="log", yscale="log", xlabel="concurrent clients", ylabel="items/s", title=f"{res.model}: {res.tag}"
        )
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=110)
    files.append("throughput_vs_concurrency.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        http = [p for p in res.points if p.kind in ("served", "eager")]
        for cfg in dict.fromkeys(p.config for p in http):
            pts = sorted((p for p in http if p.config == cfg), key=lambda p: p.concurrency)  # 1 -> 16 clients
            (line,) = ax.plot([p.rps for p in pts], [p.p50_ms for p in pts], marker="o", label=f"{cfg} p50")
            ax.plot([p.rps for p in pts], [p.p99_ms for p in pts], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{cfg} p99")  # fmt: skip
        for p in res.points:
            if p.kind == "served-open":
                marker = "*" if "batching on" in p.config else "P"
                ax.plot([p.rps], [p.p99_ms], marker=marker, markersize=11, color="black", linestyle="none",
                        label=f"p99, {p.config.removeprefix('served ')}")  # fmt: skip
        ax.set(yscale="log", xlabel="requests/s", ylabel="latency (ms)", title=f"{res.model}: latency vs throughput")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=110)
    files.append("latency_vs_throughput.png")
    plt.close(fig)
    return files


def write_report(results: list[ModelResult], args, command: str, out: Path, elapsed: float) -> Path:
    from servable.machine import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    figures = plot(results, out)
    vers = versions()
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min). Machine: {describe_machine()}."
        + (f" {args.note}" if args.note else ""),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        f"Client: aiohttp in the benchmark process on the same machine, single-item JSON requests of real inputs, "
        f"closed loop at {args.concurrency} clients, {args.seconds:g} s per point after {args.warmup:g} s warm-up; "
        f"raw ORT: one caller thread, {args.raw_seconds:g} s per batch size, model call only. "
        f"Probe: raw ORT fp32 batch 1 for {args.raw_seconds:g} s before and after each server's points (server idle); "
        f"drift-corrected ratios divide each side by its probe, so a busier moment on a shared machine cancels out.",
        "",
    ]
    for res in results:
        rat, raw_rat, tails = ratios(res), ratios(res, corrected=False), tail_ratios(res)
        lines += [f"## {res.model}: `{res.tag}`", ""]
        lines += [f"- {n}" for n in res.notes]
        lines += [f"- Shared pre-processing costs {res.preprocess_ms_per_item:.2f} ms per item in-process "
                  f"(not in the raw ORT rows; the server pays it per request).", ""]  # fmt: skip
        lines += ["| config | clients / batch | req/s | items/s | p50 ms | p95 ms | p99 ms | errors | probe items/s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in res.points:
            conc = f"{p.target_rps:.1f} req/s open loop" if p.target_rps else str(p.concurrency)
            probe_s = f"{p.probe_items_s:.1f}" if p.probe_items_s else "-"
            lines.append(f"| {p.config} | {conc} | {p.rps:.1f} | {p.items_s:.1f} | {p.p50_ms:.1f} | {p.p95_ms:.1f} "
                         f"| {p.p99_ms:.1f} | {p.errors} | {probe_s} |")  # fmt: skip
        lines += ["", "| ratio (saturation items/s) | drift-corrected | as measured |", "|---|---|---|"]
        lines += [f"| {k} | {'n/a' if v is None else v} | {'n/a' if raw_rat[k] is None else raw_rat[k]} |"
                  for k, v in rat.items()]  # fmt: skip
        lines += [f"| {k} | {v} | |" for k, v in tails.items()]
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        rows = targets({**rat, **tails})
        lines += [f"| {n} | {v} | {'n/a' if ok is None else ('yes' if ok else 'no')} |" for n, v, ok in rows]
        lines.append("")
    lines += [f"![{f}]({f})" for f in figures]
    md = out / "benchmark.md"
    md.write_text("\n".join(lines) + "\n")
    payload = {"command": command, "elapsed_s": round(elapsed, 1), "machine": describe_machine(), "note": args.note,
               "versions": vers,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "models": [{**asdict(r), "ratios": ratios(r), "ratios_as_measured": ratios(r, corrected=False),
                           "tail_ratios": tail_ratios(r)} for r in results]}  # fmt: skip
    (out / "benchmark.json").write_text(json.dumps(payload, indent=1, default=str))
    return md


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-tag", default="fashion-cnn:latest")
    p.add_argument("--text-tag", default="sentiment-bert:latest")
    p.add_argument("--models", nargs="+", default=["image", "text"], choices=["image", "text"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per HTTP point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw ORT batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager peer (torch not installed)")
    p.add_argument("--quick", action="store_true", help="short smoke run: 2 concurrencies, 2 s points, fp32 only")
    p.add_argument("--note", default="", help="free text for the report, e.g. 'shared machine'")
    p.add_argument("--inputs", type=Path, default=real_inputs.DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("docs/results/benchmark"))
    p.add_argument("--render-only", action="store_true", help="rewrite the report and plots from --out's JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.seconds, args.warmup, args.raw_seconds, args.batches = [1, 4], 2.0, 0.5, 0.5, [1, 8]
    return args


def render_only(args: argparse.Namespace) -> int:
    """Re-render from the measured JSON (e.g. after changing the report), keeping its command and settings."""
    payload = json.loads((args.out / "benchmark.json").read_text())
    results = [ModelResult(m["model"], m["tag"], [Point(**p) for p in m["points"]], m["notes"],
                           m["preprocess_ms_per_item"]) for m in payload["models"]]  # fmt: skip
    for key, value in payload["settings"].items():
        if key not in ("render_only", "out"):
            setattr(args, key, value)
    elapsed = payload.get("elapsed_s")
    if elapsed is None:  # reports written before elapsed_s was stored: read it from the old Markdown
        found = re.search(r"\(([0-9.]+) min\)", (args.out / "benchmark.md").read_text())
        elapsed = 60 * float(found.group(1)) if found else 0.0
    write_report(results, args, payload["command"], args.out, elapsed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = shlex.join(["python", "-m", "loadtest.benchmark", *(sys.argv[1:] if argv is None else argv)])
    if args.render_only:
        return render_only(args)
    data = real_inputs.load(args.inputs)
    log_dir = Path(tempfile.mkdtemp(prefix="servable-benchmark-logs-"))  # server logs: not published
    print(f"server logs in {log_dir}", flush=True)
    start = time.monotonic()
    tags = {"image": args.image_tag, "text": args.text_tag}
    results = [bench_model(m, tags[m], args, data, log_dir) for m in args.models]
    md = write_report(results, args, command.strip(), args.out, time.monotonic() - start)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
