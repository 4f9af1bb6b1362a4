"""Serving benchmark: figures, not timed tests. One run, one machine, everything side by side.

For each model it measures throughput (requests/s, items/s) and p50/p95/p99 latency of:
  1. raw ONNX Runtime in-process at batch 1 and at the best batch size (the ceiling);
  2. the BentoML service: its defaults, then in-process batching on and off, the old split design
     (separate model process) and int8/optimised variants, at several client concurrencies;
  3. the server a user would write instead: FastAPI + ONNX Runtime (loadtest/ort_peer.py), no batching;
  4. FastAPI + PyTorch eager (loadtest/eager_peer.py), one request at a time;
  5. CUDA vs CPU provider, when a GPU really loads (skipped, and said so, where none does);
plus open-loop runs at 70 % and 85 % of the default config's saturation (the p99/p50 target at 70 %; no failed
request below 90 %). The served default and
the FastAPI + ORT peer are measured again, open loop included, on the photo mix: the same images with a few
percent of camera photos among them (loadtest/inputs.py), what users upload; and both behind the project's
nginx over TLS with 2 replicas each (the compose/local-stack topology), with the host's CPU use. Image requests
are multipart uploads (what a new user sends first), JSON base64 as a second format, and for the default
config V2 binary FP32 pixels (pre-processed by the client) as a third. Writes benchmark.md,
benchmark.json and PNG plots to docs/results/benchmark/ (the report: loadtest/benchmark_report.py).

    python -m loadtest.benchmark            # full
    python -m loadtest.benchmark --quick    # a smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

from loadtest import cli
from loadtest import inputs as real_inputs
from loadtest.benchmark_report import (
    DEFAULT,
    EAGER,
    FIRST,
    FIRST_N,
    PEER,
    PEER_FORMATS,
    SPLIT,
    ModelResult,
    Point,
    load_results,
    photo_mix,
    proxied,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-" + secrets.token_hex(8)


def pct(lat_s: list[float]) -> tuple[float, float, float]:
    if not lat_s:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(lat_s) * 1000, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


# ---------------------------------------------------------------- raw ONNX Runtime in-process


def ort_session(path: Path, device: str):
    from servable.config import ImageServeSettings
    from serving.onnx_runtime import create_session

    # The service's session settings with ONNX Runtime's default threading (all cores, spinning), as in the split
    # model process: the in-process ceiling uses the whole machine. Only device/threads/opt-level are read.
    return create_session(path, ImageServeSettings(device=device, topology="split", intra_op_spinning=True))


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

# Request formats per model, the first the default: image multipart upload (what a new user sends first),
# base64 in JSON, or V2 binary FP32 pixels (pre-processed by the client, the binary tensor data extension:
# what a pipeline that already holds tensors sends); text JSON. The FastAPI peer speaks PEER_FORMATS.
FORMATS = {"image": ("multipart", "json", "v2-fp32"), "text": ("json",)}
BOUNDARY = "servable-bench-" + secrets.token_hex(8)  # one boundary: every multipart body shares the headers


def request_bodies(model: str, data: real_inputs.Inputs, fmt: str, art=None) -> tuple[str, dict[str, str], list[bytes]]:
    """The path, headers and pre-encoded single-item bodies of format `fmt` (v2-fp32: pre-processed with the
    artifact `art`'s parameters): the client spends almost no CPU."""
    if fmt not in FORMATS[model]:
        raise ValueError(f"{model} requests have formats {FORMATS[model]}, not {fmt!r}")
    if model == "text":
        return "/sentiment", _headers("application/json"), [json.dumps({"text": t}).encode() for t in data.texts]
    if fmt == "json":
        bodies = [json.dumps({"image": base64.b64encode(b).decode()}).encode() for b in data.images]
        return "/classify", _headers("application/json"), bodies
    if fmt == "v2-fp32":
        return v2_pixel_bodies(art, data)
    from urllib3 import encode_multipart_formdata

    bodies = []
    for i, blob in enumerate(data.images):
        ext, ctype = ("png", "image/png") if blob.startswith(b"\x89PNG") else ("jpg", "image/jpeg")
        body, _ = encode_multipart_formdata({"image": (f"item{i:04d}.{ext}", blob, ctype)}, boundary=BOUNDARY)
        bodies.append(body)
    return "/classify", _headers(f"multipart/form-data; boundary={BOUNDARY}"), bodies


def v2_pixel_bodies(art, data: real_inputs.Inputs) -> tuple[str, dict[str, str], list[bytes]]:
    """V2 infer bodies: the JSON header, then one image's float32 pixels [1, 3, S, S] (answers in JSON)."""
    from servable.preprocessing import preprocess_image

    if art is None:
        raise ValueError("v2-fp32 bodies need the artifact (its pre-processing parameters)")
    prep = art.manifest.image_preprocessing
    pixels = [preprocess_image(b, prep)[None].astype("<f4") for b in data.images]
    tensor = {"name": "pixels", "datatype": "FP32", "shape": list(pixels[0].shape),
              "parameters": {"binary_data_size": pixels[0].nbytes}}  # fmt: skip
    head = json.dumps({"inputs": [tensor]}).encode()  # the same for every image: one set of headers
    headers = {**_headers("application/octet-stream"), "Inference-Header-Content-Length": str(len(head))}
    return f"/v2/models/{art.manifest.name}/infer", headers, [head + p.tobytes() for p in pixels]


def _headers(content_type: str) -> dict[str, str]:
    return {"content-type": content_type, "x-api-key": KEY}


def answered_one(payload: bytes) -> bool:
    """A REST answer with one prediction, or a V2 answer whose outputs hold one item."""
    body = json.loads(payload)
    if "outputs" in body:
        return all(o["shape"][0] == 1 for o in body["outputs"])
    return len(body.get("predictions", [])) == 1


def _client_session(connections: int = 0, trace_configs: Sequence = ()):
    """An HTTP client session; `connections` bounds its open connections (0: a new one whenever none is free);
    `trace_configs`: aiohttp's request tracing (loadtest/tail_parts.py times new connections with it)."""
    import ssl

    import aiohttp

    # A context made now, not at import: it trusts SSL_CERT_FILE as set by then (the local stack's own CA, soak).
    connector = aiohttp.TCPConnector(limit=connections, ssl=ssl.create_default_context())
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                 trace_configs=list(trace_configs))  # fmt: skip


def failure_kind(status: int, payload: bytes) -> str:
    """`<status> <error reason>` of a failed answer (the reason from the JSON error body, when there is one)."""
    try:
        reason = json.loads(payload).get("error", "")
    except (ValueError, AttributeError):
        reason = ""
    return f"{status} {reason}".strip() if isinstance(reason, str) else str(status)


async def _one(session, url: str, headers: dict[str, str], body: bytes, failures: Counter | None = None) -> bool:
    """One request; True for a 200 with one prediction. Any failure (status, body, network) is False,
    counted by kind in `failures` when given (status and reason, or the exception's class)."""
    try:
        async with session.post(url, data=body, headers=headers) as r:
            payload = await r.read()
            if r.status == 200 and answered_one(payload):
                return True
            kind = failure_kind(r.status, payload)
    except Exception as exc:
        kind = type(exc).__name__
    if failures is not None:
        failures[kind] += 1
    return False


async def closed_loop(url: str, headers, bodies: list[bytes], concurrency: int, seconds: float, warmup: float):
    """`concurrency` clients, each sending its next request when the previous answer arrives."""
    records: list[tuple[float, float, bool]] = []
    async with _client_session() as session:
        t_start = time.perf_counter()
        t_end = t_start + warmup + seconds

        async def client(cid: int) -> None:
            i = cid * 7919
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                ok = await _one(session, url, headers, bodies[i % len(bodies)])
                records.append((t0, time.perf_counter(), ok))
                i += 1

        await asyncio.gather(*(client(c) for c in range(concurrency)))
    window = [(s, e, ok) for s, e, ok in records if s >= t_start + warmup and e <= t_end]
    return window, seconds


async def open_loop(
    url: str,
    headers,
    bodies: list[bytes],
    rate: float,
    seconds: float,
    warmup: float,
    failures: Counter | None = None,
    connections: int = 0,
    send_lag: list[tuple[float, float]] | None = None,
):
    """Requests at a mean rate (Poisson arrivals) whatever the answers do; latency from the scheduled send time.

    `connections` bounds the client's connections (0: unbounded); a request finding none free waits for one,
    and that wait counts in its latency. `send_lag`, when given, gets (scheduled time, seconds late) of each
    request as the generator's own event loop starts it: a late generator, not a slow server."""
    records: list[tuple[float, float, bool]] = []
    async with _client_session(connections) as session:

        async def fire(t_sched: float, body: bytes) -> None:
            if send_lag is not None:
                send_lag.append((t_sched, time.perf_counter() - t_sched))
            ok = await _one(session, url, headers, body, failures)
            records.append((t_sched, time.perf_counter(), ok))

        t_start = await send_paced(fire, bodies, rate, warmup + seconds)
    return [(s, e, ok) for s, e, ok in records if s >= t_start + warmup], seconds


async def send_paced(fire: Callable[[float, bytes], Awaitable[None]], bodies: list[bytes], rate: float,
                     seconds: float, seed: int = 0) -> float:  # fmt: skip
    """`fire(scheduled time, body)` at `rate` a second for `seconds`, whatever the answers do, and every call
    finished; returns the start time (time.perf_counter()).

    Arrivals are Poisson, as independent users' are: `rate × seconds` send times drawn uniformly over the
    span and sorted (a Poisson process given its count), seeded, so a run is repeatable and its count exact.
    Evenly spaced sends would be kinder than real traffic: no two requests ever arrive together.
    Only the calls in flight are held: a list of every task of a 20-minute soak (half a million) made each
    full garbage collection of the generator longer, up to seconds of its own stalls."""
    offsets = np.sort(np.random.default_rng(seed).uniform(0.0, seconds, int(rate * seconds)))
    t_start = time.perf_counter()
    pending: set[asyncio.Task] = set()
    for i, offset in enumerate(offsets.tolist()):
        t_sched = t_start + offset
        if (delay := t_sched - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(fire(t_sched, bodies[i % len(bodies)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return t_start


async def first_requests(url: str, headers, bodies: list[bytes], n: int, concurrency: int):
    """The first `n` requests a server answers, from `concurrency` clients, no warm-up: the cost of shapes and
    code paths a real request meets first."""
    records: list[tuple[float, float, bool]] = []
    sent = iter(range(n))
    async with _client_session() as session:
        t_start = time.perf_counter()

        async def client() -> None:
            for i in sent:
                t0 = time.perf_counter()
                ok = await _one(session, url, headers, bodies[i % len(bodies)])
                records.append((t0, time.perf_counter(), ok))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - t_start


def first_requests_point(model: str, config: str, kind: str, base_url: str, data, fmt: str, clients: int) -> Point:
    path, headers, bodies = request_bodies(model, data, fmt)
    records, secs = asyncio.run(first_requests(base_url + path, headers, bodies, FIRST_N, clients))
    return show(to_point(model, f"{config} first {FIRST_N}", kind, clients, records, secs, fmt=fmt))


def to_point(model: str, config: str, kind: str, conc: int, records, seconds: float, rate=None, fmt="") -> Point:
    ok = [e - s for s, e, good in records if good]
    p50, p95, p99 = pct(ok)
    errors = sum(1 for *_, good in records if not good)
    return Point(model, config, kind, conc, len(records), errors, seconds, len(ok) / seconds, len(ok) / seconds,
                 p50, p95, p99, rate, request_format=fmt)  # fmt: skip


def http_points(model: str, config: str, kind: str, base_url: str, data, fmt: str, args, art=None) -> list[Point]:
    """Closed-loop points of one server at each of args.concurrency, requests of format `fmt`."""
    path, headers, bodies = request_bodies(model, data, fmt, art)
    out = []
    for c in args.concurrency:
        records, secs = asyncio.run(closed_loop(base_url + path, headers, bodies, c, args.seconds, args.warmup))
        out.append(show(to_point(model, config, kind, c, records, secs, fmt=fmt)))
    return out


def metric_totals(base_url: str, names: Sequence[str]) -> dict[str, float]:
    """Each series' value from a server's /metrics, summed over its labels (0 where absent)."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {n: sum((float(v) for v in re.findall(rf"^{n}(?:{{[^}}]*}})? (\S+)$", text, re.M)), 0.0) for n in names}


def padding_share(base_url: str) -> float:
    """Mean share of padded token positions over the text batches a server ran (servable_padding_ratio)."""
    padded, batches = metric_totals(base_url, ["servable_padding_ratio_sum", "servable_padding_ratio_count"]).values()
    return padded / batches if batches else float("nan")


def show(p: Point) -> Point:
    where = f"{p.target_rps:.0f}/s" if p.target_rps else f"c={p.concurrency}"
    print(f"  {p.config:40s} {where:<7s} {p.rps:7.1f} req/s  p50 {p.p50_ms:7.1f}  p99 {p.p99_ms:7.1f} ms"
          f"  errors {p.errors}", flush=True)  # fmt: skip
    return p


def open_loop_points(model: str, label: str, base_url: str, data, fmt: str, saturation: float, args) -> list[Point]:
    """Open-loop points at each of args.open_loop_loads times `saturation` (req/s), labelled `label @NN%`."""
    return [open_loop_point(model, f"{label} @{round(100 * load)}%", base_url, data, fmt, load * saturation, args)
            for load in args.open_loop_loads]  # fmt: skip


def open_loop_point(model: str, config: str, base_url: str, data, fmt: str, rate: float, args) -> Point:
    path, headers, bodies = request_bodies(model, data, fmt)
    records, secs = asyncio.run(open_loop(base_url + path, headers, bodies, rate, args.seconds, args.warmup))
    return show(to_point(model, config, "served-open", 0, records, secs, rate, fmt))


# ---------------------------------------------------------------- servers


LENGTH_BUCKETS_OFF = "served default, length buckets off"
TIMING_OFF = "served default, timing headers off"
TRACING_ON = "served default, tracing on"
SHADOW_ON = "served default, shadow 10%"


def served_configs(variants: list[str], has_cuda: bool, quick: bool, model: str = "image",
                   tag: str = "") -> dict[str, dict[str, str]]:  # fmt: skip
    """Label -> SERVABLE_<MODEL>_SERVE_ settings (without the prefix) of each served configuration; `tag`: the
    served model's, also the shadow candidate of SHADOW_ON (the same model: the candidate costs what the live
    model does)."""

    def cpu(topology: str, variant: str, batching: bool) -> dict[str, str]:
        return {"TOPOLOGY": topology, "VARIANT": variant, "BATCHING": str(batching).lower(), "DEVICE": "cpu"}

    configs = {
        DEFAULT: {},  # whatever the defaults are
        "served fp32 inprocess batching on": cpu("inprocess", "fp32", True),
        "served fp32 inprocess batching off": cpu("inprocess", "fp32", False),
        SPLIT: {**cpu("split", "fp32", True), "WORKERS": "1"},
    }
    if not quick:
        configs |= {f"served {v} inprocess batching on": cpu("inprocess", v, True) for v in variants if v != "fp32"}
        if "int8" in variants:
            configs["served int8 inprocess batching off"] = cpu("inprocess", "int8", False)
        # The threading choices of the default, measured rather than assumed (docs/benchmark.md).
        configs["served default, 2 ORT threads per worker"] = {"INTRA_OP_THREADS": "2"}
        configs["served default, ORT spinning on"] = {"INTRA_OP_SPINNING": "true"}
        configs[TIMING_OFF] = {"SERVER_TIMING": "false"}  # what the timing headers cost (docs/benchmark.md)
        configs[TRACING_ON] = {"OTEL_TRACES_EXPORTER": "otlp"}  # every span to a local sink (loadtest/otlp_sink.py)
        if tag:  # what shadow scoring a tenth of the requests costs (serving/shadow.py)
            configs[SHADOW_ON] = {"SHADOW_TAG": tag, "SHADOW_SHARE": "0.1"}
    if model == "text":  # texts of mixed lengths: padding with and without length buckets (docs/benchmark.md)
        configs[LENGTH_BUCKETS_OFF] = {"LENGTH_BUCKETS": "false"}
    if has_cuda:
        configs["served fp32 split batching on cuda"] = {"TOPOLOGY": "split", "VARIANT": "fp32", "BATCHING": "true",
                                                         "DEVICE": "cuda"}  # fmt: skip
    return configs


def log_name(*words: str) -> str:
    """A server's log file stem: its model and label, lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-")


def start_served(model: str, tag: str, config: dict[str, str], label: str, log_dir: Path, cwd: Path | None = None):
    """The model's BentoML service with `config`'s settings (keys without the SERVABLE_<MODEL>_SERVE_ prefix; OTEL_*
    variables as they are, with tracing on sent to the run's OTLP sink); `cwd`: serve the code in that folder
    (an exported revision) instead of this tree's."""
    from deploy import launch
    from servable.config import SERVED_MODELS

    prefix = SERVED_MODELS[model].env_prefix
    settings = {"MODEL_TAG": tag, "MAX_CONCURRENCY": "256", **config}  # 256: no 429 from the harness's clients
    env = {**{k if k.startswith("OTEL_") else prefix + k: v for k, v in settings.items()},
           "SERVABLE_AUTH_KEYS": f"bench:{KEY}"}  # fmt: skip
    if "OTEL_TRACES_EXPORTER" in env:
        from loadtest import otlp_sink

        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_sink.endpoint()
    name = log_name(model, label)
    return launch.start_ready(launch.SERVICES[model], env, log_path=log_dir / f"{name}.log", timeout_s=240, cwd=cwd)


def start_peer(module: str, tag: str, log_path: Path, uvicorn_args: Sequence[str] = ()):
    """uvicorn running `module`:app (a peer server), one worker on 127.0.0.1, in its own process group:
    a `deploy.launch.Server`, so it is waited for and stopped like the served ones."""
    from deploy import launch

    port = launch.free_port()
    cmd = [sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--log-level", "warning", *uvicorn_args]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "PEER_MODEL_TAG": tag}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    server = launch.Server(f"{module}:app", port, log_path, proc)
    if not launch.wait_until(server, "/readyz", timeout_s=240):
        server.stop()
        raise RuntimeError(f"{module} did not start; log:\n{server.log()[-2000:]}")
    return server


@dataclass(frozen=True)
class Peer:
    label: str
    kind: str  # the Point kind of its rows
    module: str  # a FastAPI app at <module>:app
    uvicorn_args: tuple[str, ...] = ()


ORT_PEER = Peer(PEER, "peer", "loadtest.ort_peer", ("--loop", "uvloop", "--http", "httptools"))  # uvicorn[standard]
EAGER_PEER = Peer(EAGER, "eager", "loadtest.eager_peer")


PROXY_CLIENTS = [32, 128]
PROXY_REPLICAS = 2


def host_cpu_share(fn):
    """fn()'s result and the machine's CPU busy share while it ran (every process: servers, nginx, this client)."""
    import psutil

    before = psutil.cpu_times()
    out = fn()
    after = psutil.cpu_times()
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return out, (1 - idle / total) if total > 0 else float("nan")


def proxied_points(model: str, art, args, data: real_inputs.Inputs, log_dir: Path) -> list[Point]:
    """The production topology: PROXY_REPLICAS replicas of the served default, then of the FastAPI + ORT peer,
    behind the project's nginx over TLS (deploy/local_stack.py: the compose proxy configuration; its per-key
    and per-address limits lifted out of the one load generator's reach), closed loop at PROXY_CLIENTS."""
    from deploy import local_stack
    from servable.config import SERVED_MODELS

    out = []
    for label in (DEFAULT, PEER):
        name = log_name(model, label, "proxied")
        workdir = log_dir / name
        peers = [start_peer(ORT_PEER.module, art.tag, log_dir / f"{name}-{i}.log", ORT_PEER.uvicorn_args)
                 for i in range(PROXY_REPLICAS)] if label == PEER else []  # fmt: skip
        # MAX_CONCURRENCY as for the direct rows: no 429 from the harness's clients.
        stack = local_stack.LocalStack(
            workdir, api_keys={"bench": KEY}, tags={model: art.tag}, rate_limit="100000r/s", rate_burst=100000,
            conn_limit=65535, replicas_per_kind={k: PROXY_REPLICAS if k == model else 0 for k in SERVED_MODELS},
            upstreams={model: peers} if peers else None,
            extra_env={SERVED_MODELS[model].env_prefix + "MAX_CONCURRENCY": "256"},
        )  # fmt: skip
        with stack, mock.patch.dict(os.environ, stack.client_env()):  # the client trusts the proxy's own CA
            path, headers, bodies = request_bodies(model, data, FORMATS[model][0])
            before, pts = probe(model, art, data, args.raw_seconds), []  # the servers idle: the probe has the cores
            for c in PROXY_CLIENTS:
                run = functools.partial(closed_loop, stack.proxy_url + path, headers, bodies, c, args.seconds,
                                        args.warmup)  # fmt: skip
                (records, secs), cpu = host_cpu_share(lambda run=run: asyncio.run(run()))
                point = to_point(model, proxied(label), "proxied", c, records, secs, fmt=FORMATS[model][0])
                point.host_cpu = round(cpu, 3)
                pts.append(show(point))
            out += with_probe(pts, before, probe(model, art, data, args.raw_seconds))
    return out


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

    formats = list(args.image_formats) if model == "image" else list(FORMATS[model])
    main_fmt, more_fmts = formats[0], formats[1:]  # more_fmts: measured for served default and the ORT peer
    res.configs = served_configs(variants, has_cuda, args.quick, model, art.tag)
    peers = {p.label: p for p in [ORT_PEER, *([] if args.no_eager else [EAGER_PEER])]}
    # The ORT peer right after served default: the pair the targets compare, measured as close in time as possible.
    order = [DEFAULT, PEER, *(c for c in res.configs if c != DEFAULT), *(c for c in peers if c != PEER)]
    order = [label for label in order if not args.only or label in args.only]
    for label in order:
        peer = peers.get(label)
        if peer and main_fmt not in PEER_FORMATS:
            res.notes.append(f"`{label}` not run: it takes no {main_fmt} requests.")
            continue
        name = log_name(model, label)
        server = (start_peer(peer.module, art.tag, log_dir / f"{name}.log", peer.uvicorn_args) if peer
                  else start_served(model, art.tag, res.configs[label], label, log_dir))  # fmt: skip
        kind = peer.kind if peer else "served"
        try:
            first = []
            if label in (DEFAULT, PEER):  # the first requests after ready, before anything else reaches the server
                clients = max(args.concurrency)
                first.append(first_requests_point(model, label, FIRST, server.url, data, main_fmt, clients))
            before = probe(model, art, data, args.raw_seconds)  # server idle: the probe has the cores
            pts = http_points(model, label, kind, server.url, data, main_fmt, args)
            if label in (DEFAULT, PEER):
                for fmt in more_fmts if label == DEFAULT else [f for f in more_fmts if f in PEER_FORMATS]:
                    pts += http_points(model, f"{label} [{fmt}]", kind, server.url, data, fmt, args, art)
            if label == DEFAULT:  # p99 <= 3x p50 at 70 % of saturation; no failed request below 90 %
                top = max(p.rps for p in pts if p.config == label and p.request_format == main_fmt)
                pts += open_loop_points(model, label, server.url, data, main_fmt, top, args)
            if model == "image" and label in (DEFAULT, PEER) and not args.no_photos:  # the same on the photo mix
                mix, photos = photo_mix(label), data.photo_mix()
                pts += http_points(model, mix, kind, server.url, photos, main_fmt, args)
                if label == DEFAULT:
                    top = max(p.rps for p in pts if p.config == mix)
                    pts += open_loop_points(model, mix, server.url, photos, main_fmt, top, args)
            res.points += first + with_probe(pts, before, probe(model, art, data, args.raw_seconds))
            if model == "text" and not peer:
                res.notes.append(f"{label}: {padding_share(server.url):.1%} of the token positions run were padding")
        finally:
            server.stop()
    if not args.no_proxy and (not args.only or DEFAULT in args.only):
        print(f"[{model}] behind nginx (TLS), {PROXY_REPLICAS} replicas", flush=True)
        res.points += proxied_points(model, art, args, data, log_dir)
    return res


# ---------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per HTTP point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw ORT batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--open-loop-loads", type=float, nargs="+", default=[0.7, 0.85], metavar="SHARE",
                   help="open-loop points of the served default at these shares of its saturation")  # fmt: skip
    p.add_argument("--image-formats", nargs="+", default=list(FORMATS["image"]), choices=FORMATS["image"],
                   help="image request formats: the first for every image point, the others also measured for "
                   f"{DEFAULT!r} and the {PEER!r}")  # fmt: skip
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager peer (torch not installed)")
    p.add_argument("--no-photos", action="store_true", help="skip the photo-mix points (image: bundled inputs only)")
    p.add_argument("--no-proxy", action="store_true",
                   help=f"skip the points behind nginx (TLS) with {PROXY_REPLICAS} replicas (needs nginx)")  # fmt: skip
    p.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                   help=f"run only these servers (config or peer labels, e.g. {DEFAULT!r}); default: all")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="short smoke run: 2 concurrencies, 2 s points, fp32 only")
    p.add_argument("--note", default="", help="free text for the report, e.g. 'shared machine'")
    p.add_argument("--inputs", type=Path, default=real_inputs.DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("docs/results/benchmark"))
    p.add_argument("--render-only", action="store_true", help="rewrite the report and plots from --out's JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.seconds, args.warmup, args.raw_seconds, args.batches = [1, 8], 2.0, 0.5, 0.5, [1, 8]
    return args


def render_only(args: argparse.Namespace) -> int:
    """Re-render from the measured JSON (e.g. after changing the report), keeping its command and settings."""
    payload = json.loads((args.out / "benchmark.json").read_text())
    results = load_results(payload)
    for key, value in payload["settings"].items():
        if key not in ("render_only", "out"):
            setattr(args, key, value)
    if "image_formats" not in payload["settings"]:  # written before multipart: every request was JSON
        args.image_formats = ["json"]
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
    results = [bench_model(m, cli.tag_of(args, m), args, data, log_dir) for m in args.models]
    md = write_report(results, args, command.strip(), args.out, time.monotonic() - start)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
