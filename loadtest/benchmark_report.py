"""The serving benchmark's results and report: points, ratios, targets, summary table, plots, benchmark.md/json.

Split from loadtest/benchmark.py (which measures); `python -m loadtest.benchmark --render-only` rewrites
the report from a benchmark.json with this module alone.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from loadtest.queueing import fifo_floor

# Config labels the ratios and targets read (benchmark.served_configs writes them).
DEFAULT = "served default"
ON, OFF = "served fp32 inprocess batching on", "served fp32 inprocess batching off"
SPLIT = "served fp32 split (old design)"
CUDA = "served fp32 split batching on cuda"
PEER = "fastapi+ort peer"
EAGER = "pytorch eager (FastAPI)"
PEER_FORMATS = ("multipart", "json")  # the image formats the FastAPI + ORT peer takes (no V2 route)
HTTP_KINDS = ("served", "peer", "eager", "proxied")  # closed-loop HTTP rows, in the summary's order
FIRST, FIRST_N = "first", 100  # the first requests after ready: their points' kind, and how many
# served default against the FastAPI + ORT peer at 32 clients: least req/s, least multiple of the peer's req/s.
RPS_TARGETS = {"image": (900.0, 1.6), "text": (160.0, 2.5)}
PROXY_KEEPS = 0.9  # behind nginx (TLS), 2 replicas: the share of the direct figures kept
PHOTO_MIX_MULT = 2.2  # the same multiple on the photo mix (loadtest/inputs.py: a few percent camera photos)


def proxied(label: str) -> str:
    """The label of `label`'s points behind nginx (TLS) with 2 replicas (served default and the FastAPI + ORT peer)."""
    return f"{label} via nginx TLS x2"


def photo_mix(label: str) -> str:
    """The label of `label`'s points on the photo mix (image model: served default and the FastAPI + ORT peer)."""
    return f"{label} [photo mix]"


TOP_CLIENTS, LOW_CLIENTS, P50_SLACK_MS = 32, 1, 1.5


@dataclass
class Point:
    model: str
    config: str  # e.g. "served default", "served fp32 inprocess batching on", "raw ORT fp32 b8", "fastapi+ort peer"
    kind: str  # raw | served | served-open | first | peer | eager | proxied
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
    request_format: str = ""  # HTTP rows: multipart | json | v2-fp32 ("" in reports older than formats)
    host_cpu: float | None = None  # proxied rows: the machine's CPU busy share during the point (0-1)

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
    configs: dict[str, dict[str, str]] = field(default_factory=dict)  # served label -> SERVABLE_*_SERVE_ settings


@dataclass
class Target:
    name: str
    measured: str  # the figures compared, as measured
    goal: str
    ratio: str  # the comparison the goal is about (drift-corrected where both sides have a probe)
    met: bool | None  # None: not measured


def best(points: list[Point], name: str) -> Point | None:
    """The saturation point (highest items/s) of config `name`; for raw rows `name` is "raw ORT <variant>"."""
    raw = re.compile(re.escape(name) + r" b\d+")
    cands = [p for p in points if p.config == name or raw.fullmatch(p.config)]
    return max(cands, key=lambda p: p.items_s) if cands else None


def at(points: list[Point], name: str, clients: int | None) -> Point | None:
    """The closed-loop point of config `name` at `clients` concurrent clients."""
    return next((p for p in points if p.config == name and p.kind != "served-open" and p.concurrency == clients), None)


def clients_for(points: list[Point], a: str, b: str, want: int) -> tuple[int | None, str]:
    """`want` clients if both configs were measured there, else the nearest both have (highest above 1, else
    lowest), with the words that say so."""
    common = {p.concurrency for p in points if p.config == a} & {p.concurrency for p in points if p.config == b}
    common.discard(0)
    if want in common:
        return want, f"{want} client{'s' * (want != 1)}"
    if not common:
        return None, f"{want} client{'s' * (want != 1)} (not measured)"
    c = max(common) if want > 1 else min(common)
    return c, f"{c} clients ({want} not run)"


def _ratio(a: Point | None, b: Point | None, corrected: bool) -> float | None:
    if not a or not b:
        return None
    va, vb = ((a.relative or a.items_s), (b.relative or b.items_s)) if corrected else (a.items_s, b.items_s)
    return round(va / vb, 3) if vb else None


def ratios(res: ModelResult, corrected: bool = True) -> dict[str, float | None]:
    """Throughput ratios at saturation; corrected: each side divided by the machine probe taken around it."""
    pts = res.points

    def r(a: Point | None, b: Point | None) -> float | None:
        return _ratio(a, b, corrected)

    raw_b1 = next((p for p in pts if p.config == "raw ORT fp32 b1"), None)
    on, off, split = best(pts, ON), best(pts, OFF), best(pts, SPLIT)
    served_fp32 = max(filter(None, [on, off, split]), key=lambda p: p.relative or p.items_s, default=None)
    raw_best, default = best(pts, "raw ORT fp32"), best(pts, DEFAULT)
    out: dict[str, float | None] = {
        "served_default/fastapi_ort_peer": r(default, best(pts, PEER)),
        "served_default/split_old_design": r(default, split),
        "inprocess/split (fp32 batching on)": r(on, split),
        "served_on/raw_best_batch": r(on, raw_best),
        "served_off/raw_b1": r(off, raw_b1),
        "served_best_fp32/pytorch_eager": r(served_fp32, best(pts, EAGER)),
        "batching_on/off": r(on, off),
        "int8/fp32 served": r(best(pts, "served int8 inprocess batching on"), on),
        "int8/fp32 raw": r(best(pts, "raw ORT int8"), raw_best),
    }
    if any(p.config.startswith("raw ORT optimized") for p in pts):
        out["optimized/fp32 served"] = r(best(pts, "served optimized inprocess batching on"), on)
        out["optimized/fp32 raw"] = r(best(pts, "raw ORT optimized"), raw_best)
    if any("cuda" in p.config for p in pts):
        out["cuda/cpu served (split)"] = r(best(pts, CUDA), split)
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


def _ratio_cell(a: Point | None, b: Point | None) -> tuple[str, float | None]:
    corr, raw = _ratio(a, b, True), _ratio(a, b, False)
    if corr is None or raw is None:
        return "n/a", None
    same = f"{corr:.2f}" == f"{raw:.2f}"
    return (f"{raw:.2f}" if same else f"{corr:.2f} drift-corrected, {raw:.2f} as measured"), corr


def _at_least(name: str, a: Point | None, b: Point | None, goal: float, unit: str = "items/s") -> Target:
    """a's items/s at least `goal` times b's (drift-corrected)."""
    cell, v = _ratio_cell(a, b)
    measured = f"{a.items_s:,.1f} vs {b.items_s:,.1f} {unit}" if a and b else "n/a"
    return Target(name, measured, f"≥ {goal:g}", cell, None if v is None else v >= goal)


def against_peer(pts: list[Point], served_label: str, peer_label: str, min_mult: float) -> list[Target]:
    """served_label at TOP_CLIENTS: at least `min_mult` times peer_label's req/s, and a p99 no worse."""
    c, words = clients_for(pts, served_label, peer_label, TOP_CLIENTS)
    served, peer = at(pts, served_label, c), at(pts, peer_label, c)
    rows = [_at_least(f"{served_label} req/s at {words} ≥ {min_mult:g}x the {peer_label}'s", served, peer, min_mult,
                      "req/s")]  # fmt: skip
    name = f"{served_label} p99 at {words} ≤ the {peer_label}'s"
    if served and peer and peer.p99_ms > 0:
        ratio = served.p99_ms / peer.p99_ms
        measured = f"{served.p99_ms:.1f} vs {peer.p99_ms:.1f} ms"
        rows.append(Target(name, measured, "≤ 1", f"{ratio:.2f}", ratio <= 1))
    else:
        rows.append(Target(name, "n/a", "≤ 1", "n/a", None))
    return rows


def proxy_targets(pts: list[Point]) -> list[Target]:
    """Behind nginx (TLS) with 2 replicas at TOP_CLIENTS: the served default keeps PROXY_KEEPS of its direct
    throughput, and its lead over the FastAPI + ORT peer (both proxied) keeps PROXY_KEEPS of the direct lead."""
    served, peer = at(pts, proxied(DEFAULT), TOP_CLIENTS), at(pts, proxied(PEER), TOP_CLIENTS)
    if not served:
        return []
    direct, direct_peer = at(pts, DEFAULT, TOP_CLIENTS), at(pts, PEER, TOP_CLIENTS)
    rows = [_at_least(f"{proxied(DEFAULT)} at {TOP_CLIENTS} clients ≥ {PROXY_KEEPS:g} of {DEFAULT} direct", served,
                      direct, PROXY_KEEPS, "req/s")]  # fmt: skip
    lead, direct_lead = _ratio(served, peer, True), _ratio(direct, direct_peer, True)
    name = f"{proxied(DEFAULT)} / {proxied(PEER)} at {TOP_CLIENTS} clients ≥ {PROXY_KEEPS:g} of the direct ratio"
    if lead and direct_lead:
        measured = f"{lead:.2f} vs {direct_lead:.2f} direct"
        rows.append(Target(name, measured, f"≥ {PROXY_KEEPS:g}", f"{lead / direct_lead:.2f}",
                           lead / direct_lead >= PROXY_KEEPS))  # fmt: skip
    else:
        rows.append(Target(name, "n/a", f"≥ {PROXY_KEEPS:g}", "n/a", None))
    return rows


def targets(res: ModelResult) -> list[Target]:
    """The goals of docs/benchmark.md, each with the figures compared, the goal, the ratio and whether it was met."""
    pts, rows = res.points, []
    min_rps, min_mult = RPS_TARGETS.get(res.model, RPS_TARGETS["image"])
    c, words = clients_for(pts, DEFAULT, PEER, TOP_CLIENTS)
    served = at(pts, DEFAULT, c)
    name = f"served default req/s at {words} ≥ {min_rps:g}"
    if served:
        ratio = served.rps / min_rps
        rows.append(Target(name, f"{served.rps:,.1f} req/s", f"≥ {min_rps:g} req/s", f"{ratio:.2f}", ratio >= 1))
    else:
        rows.append(Target(name, "n/a", f"≥ {min_rps:g} req/s", "n/a", None))
    rows += against_peer(pts, DEFAULT, PEER, min_mult)
    if any(p.config == photo_mix(DEFAULT) for p in pts):
        rows += against_peer(pts, photo_mix(DEFAULT), photo_mix(PEER), PHOTO_MIX_MULT)
    c, words = clients_for(pts, DEFAULT, PEER, LOW_CLIENTS)
    served, peer = at(pts, DEFAULT, c), at(pts, PEER, c)
    name = f"served default p50 at {words} within {P50_SLACK_MS:g} ms of the {PEER}'s"
    goal = f"≤ peer + {P50_SLACK_MS:g} ms"
    if served and peer and peer.p50_ms > 0:
        diff = served.p50_ms - peer.p50_ms
        measured = f"{served.p50_ms:.2f} vs {peer.p50_ms:.2f} ms ({diff:+.2f} ms)"
        rows.append(Target(name, measured, goal, f"{served.p50_ms / peer.p50_ms:.2f}", diff <= P50_SLACK_MS))
    else:
        rows.append(Target(name, "n/a", goal, "n/a", None))
    served_pts = [p for p in pts if p.kind in ("served", "served-open") or p.config.startswith(DEFAULT + " first")]
    errors, total = sum(p.errors for p in served_pts), sum(p.requests for p in served_pts)
    measured = f"{errors} of {total:,} requests"
    met = errors == 0 if served_pts else None
    rows.append(Target("0 errors in every served point (open loop included)", measured, "0", "-", met))
    raw_best, raw_b1 = best(pts, "raw ORT fp32"), next((p for p in pts if p.config == "raw ORT fp32 b1"), None)
    on, off = best(pts, ON), best(pts, OFF)
    rows.append(_at_least("≥ 0.85 of raw ORT (fp32 inprocess batching on vs raw best batch)", on, raw_best, 0.85))
    rows.append(_at_least("≥ 0.85 of raw ORT (fp32 inprocess batching off vs raw batch 1)", off, raw_b1, 0.85))
    fp32 = max(filter(None, [on, off, best(pts, SPLIT)]), key=lambda p: p.relative or p.items_s, default=None)
    rows.append(_at_least("≥ 2x the PyTorch-eager peer (best served fp32 config)", fp32, best(pts, EAGER), 2))
    first = next((p for p in pts if p.kind == FIRST and p.config.startswith(DEFAULT + " first")), None)
    steady = at(pts, DEFAULT, first.concurrency) if first else None
    name = f"first {FIRST_N} requests after ready: p99 ≤ 2x the steady p99 (served default, same clients)"
    if first and steady and steady.p99_ms > 0:
        ratio = first.p99_ms / steady.p99_ms
        measured = f"p99 {first.p99_ms:.1f} vs {steady.p99_ms:.1f} ms at {first.concurrency} clients"
        rows.append(Target(name, measured, "≤ 2", f"{ratio:.2f}", ratio <= 2))
    else:
        rows.append(Target(name, "n/a", "≤ 2", "n/a", None))
    rows += proxy_targets(pts)
    for p in pts:
        if p.kind != "served-open":
            continue
        config, _, load = p.config.rpartition(" @")
        if load == "70%":
            name = f"p99 ≤ 3x p50 at 70 % of saturation ({config})"
            ratio = round(p.p99_ms / p.p50_ms, 2) if p.p50_ms else None
            # beside it, what a FIFO queue alone gives at 70 % (Poisson arrivals, constant work): the yardstick
            measured = f"p99 {p.p99_ms:.1f}, p50 {p.p50_ms:.1f} ms; a FIFO queue alone: {fifo_floor(0.7):.2f}"
            rows.append(Target(name, measured, "≤ 3", f"{ratio:g}" if ratio else "n/a", ratio <= 3 if ratio else None))
        if load.endswith("%") and float(load[:-1]) < 90:  # a refusal (429) or failure below 90 % is a miss
            name = f"no failed request below 90 % of saturation ({config} @{load[:-1]} %)"
            rows.append(Target(name, f"{p.errors} of {p.requests} failed", "0", str(p.errors), p.errors == 0))
    return rows


def summary(res: ModelResult) -> list[str]:
    """Markdown: one row per server config, req/s at each client count, p50 at the fewest, p99 at the most."""
    http = [p for p in res.points if p.kind in HTTP_KINDS]
    if not http:
        return []
    concs = sorted({p.concurrency for p in http})
    lo, hi = concs[0], TOP_CLIENTS if TOP_CLIENTS in concs else concs[-1]  # the p99 of the rows the targets read
    kinds = {p.config: p.kind for p in http}
    configs = sorted(dict.fromkeys(kinds), key=lambda cfg: HTTP_KINDS.index(kinds[cfg]))  # served, then the peers

    def cell(cfg: str, c: int, attr: str, digits: int) -> str:
        p = at(http, cfg, c)
        return f"{getattr(p, attr):,.{digits}f}" if p else "-"

    lines = ["| server config | " + " | ".join(f"req/s at {c}" for c in concs)
             + f" | p50 ms at {lo} | p99 ms at {hi} | errors |",
             "|---|" + "---:|" * (len(concs) + 3)]  # fmt: skip
    for cfg in configs:
        errors = sum(p.errors for p in http if p.config == cfg)
        lines.append(f"| {cfg} | " + " | ".join(cell(cfg, c, "rps", 1) for c in concs)
                     + f" | {cell(cfg, lo, 'p50_ms', 2)} | {cell(cfg, hi, 'p99_ms', 1)} | {errors} |")  # fmt: skip
    return lines


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("onnxruntime-gpu", "onnxruntime", "bentoml", "torch", "transformers", "fastapi", "uvicorn", "uvloop",
                "httptools", "aiohttp", "numpy", "locust"):  # fmt: skip
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
        http = [p for p in res.points if p.kind in HTTP_KINDS]
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
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=110)
    files.append("throughput_vs_concurrency.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        http = [p for p in res.points if p.kind in HTTP_KINDS]
        for cfg in dict.fromkeys(p.config for p in http):
            pts = sorted((p for p in http if p.config == cfg), key=lambda p: p.concurrency)  # fewest -> most clients
            (line,) = ax.plot([p.rps for p in pts], [p.p50_ms for p in pts], marker="o", label=f"{cfg} p50")
            ax.plot([p.rps for p in pts], [p.p99_ms for p in pts], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{cfg} p99")  # fmt: skip
        for p in res.points:
            if p.kind == "served-open":
                ax.plot([p.rps], [p.p99_ms], marker="*", markersize=11, color="black", linestyle="none",
                        label=f"p99, {p.config.removeprefix('served ')}")  # fmt: skip
        ax.set(yscale="log", xlabel="requests/s", ylabel="latency (ms)", title=f"{res.model}: latency vs throughput")
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=110)
    files.append("latency_vs_throughput.png")
    plt.close(fig)
    return files


def _yes_no(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "no")


def write_report(results: list[ModelResult], args, command: str, out: Path, elapsed: float) -> Path:
    from servable.machine import describe_machine

    out.mkdir(parents=True, exist_ok=True)
    figures = plot(results, out)
    vers = versions()
    formats = getattr(args, "image_formats", None) or ["json"]
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min). Machine: {describe_machine()}."
        + (f" {args.note}" if args.note else ""),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        f"Client: aiohttp in the benchmark process on the same machine, single-item requests of real inputs "
        f"(image: {formats[0]} unless the row says otherwise"
        + "".join(
            f", {fmt} also for {DEFAULT}" + (f" and the {PEER}" if fmt in PEER_FORMATS else "") for fmt in formats[1:]
        )
        + "; text: JSON), "
        f"closed loop at {args.concurrency} clients, {args.seconds:g} s per point after {args.warmup:g} s warm-up; "
        f"raw ORT: one caller thread, ONNX Runtime's default thread count, {args.raw_seconds:g} s per batch size, "
        f"model call only. Served configs: `SERVABLE_<MODEL>_SERVE_*` settings per row (benchmark.json); "
        f"{DEFAULT} sets none. Peers: `{PEER}` (loadtest/ort_peer.py: FastAPI + uvicorn, uvloop/httptools, one "
        f"ONNX Runtime session with default options, no batching) and `{EAGER}` (loadtest/eager_peer.py). "
        f"Probe: raw ORT fp32 batch 1 for {args.raw_seconds:g} s before and after each server's points (server idle); "
        f"drift-corrected ratios divide each side by its probe, so a busier moment on a shared machine cancels out.",
        "",
    ]
    for res in results:
        rat, raw_rat, tails = ratios(res), ratios(res, corrected=False), tail_ratios(res)
        lines += [f"## {res.model}: `{res.tag}`", ""]
        if table := summary(res):
            lines += ["Side by side (req/s as measured; p50/p99 in ms):", "", *table, ""]
        lines += [f"- {n}" for n in res.notes]
        lines += [f"- `{label}`: " + (", ".join(f"{k}={v}" for k, v in cfg.items()) or "no settings (the defaults)")
                  for label, cfg in res.configs.items()]  # fmt: skip
        lines += [f"- `{p.config}` at {p.concurrency} clients: the host's CPU was {p.host_cpu:.0%} busy (servers, "
                  "nginx and this client share it)." for p in res.points if p.host_cpu is not None]  # fmt: skip
        lines += [f"- Shared pre-processing costs {res.preprocess_ms_per_item:.2f} ms per item in-process "
                  f"(not in the raw ORT rows; the server pays it per request).", ""]  # fmt: skip
        lines += ["| target | measured | goal | ratio | met |", "|---|---|---|---|---|"]
        lines += [f"| {t.name} | {t.measured} | {t.goal} | {t.ratio} | {_yes_no(t.met)} |" for t in targets(res)]
        lines += ["", "| config | format | clients / batch | req/s | items/s | p50 ms | p95 ms | p99 ms | errors "
                  "| probe items/s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in res.points:
            conc = f"{p.target_rps:.1f} req/s open loop" if p.target_rps else str(p.concurrency)
            probe_s = f"{p.probe_items_s:.1f}" if p.probe_items_s else "-"
            lines.append(f"| {p.config} | {p.request_format or '-'} | {conc} | {p.rps:.1f} | {p.items_s:.1f} "
                         f"| {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} | {p.errors} | {probe_s} |")  # fmt: skip
        lines += ["", "| ratio (saturation items/s) | drift-corrected | as measured |", "|---|---|---|"]
        lines += [f"| {k} | {'n/a' if v is None else v} | {'n/a' if raw_rat[k] is None else raw_rat[k]} |"
                  for k, v in rat.items()]  # fmt: skip
        lines += [f"| {k} | {v} | |" for k, v in tails.items()]
        lines.append("")
    lines += [f"![{f}]({f})" for f in figures]
    md = out / "benchmark.md"
    md.write_text("\n".join(lines) + "\n")
    payload = {"command": command, "elapsed_s": round(elapsed, 1), "machine": describe_machine(), "note": args.note,
               "versions": vers,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "models": [{**asdict(r), "ratios": ratios(r), "ratios_as_measured": ratios(r, corrected=False),
                           "tail_ratios": tail_ratios(r), "targets": [asdict(t) for t in targets(r)]}
                          for r in results]}  # fmt: skip
    (out / "benchmark.json").write_text(json.dumps(payload, indent=1, default=str))
    return md


def load_results(payload: dict) -> list[ModelResult]:
    """The results of a benchmark.json (older ones too: fields added since take their defaults)."""
    known = set(Point.__dataclass_fields__)
    return [ModelResult(m["model"], m["tag"], [Point(**{k: v for k, v in p.items() if k in known})
                                               for p in m["points"]], m["notes"], m["preprocess_ms_per_item"],
                        m.get("configs", {})) for m in payload["models"]]  # fmt: skip
