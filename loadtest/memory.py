"""Resident memory of the served layout, per replica and per process: `python -m loadtest.memory`
(`make memory`) -> docs/results/memory/memory.json.

Both services are started as `make serve` starts them (the launcher's `start_ready`, every setting
the shipped default: in-process topology, one HTTP worker per core), on free ports with a key of
this run's own. Each replica's processes are read with psutil, as `ps` shows them: the BentoML
arbiter, its HTTP workers, each worker's explain process (a multiprocessing spawn child) and
multiprocessing's resource tracker. For each: RSS (what `ps` and most dashboards add up, shared
pages counted in every process), PSS (shared pages split between their sharers: the replicas'
sums add up to the machine's use) and USS (pages only that process holds).

Phases, each read once memory has settled (total RSS steady within --settle-mib over three reads):
  at_rest                the servers ready, nothing asked;
  after_one_explanation  one explanation per replica (one worker of each answers it);
  under_load             --load-seconds of predictions (--clients closed-loop clients per model) with
                         --explain-clients clients sending explanations back to back; each process's
                         largest reading (every second) and the replica's largest total;
  after_load             settled again after the load.

`--rev REV` serves the code of a git revision (exported to a temporary folder) instead of the working
tree, so a before/after pair needs no checkout; `--overlay PATH` puts the working tree's copy of a file
over that export, `--patch FILE` applies a diff to it (a change proposed, measured before it is made).
Results are kept per `--label` in the one JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from loadtest import benchmark
from loadtest import inputs as real_inputs
from loadtest.explain_load import _bodies, explain_clients
from servable.machine import describe_machine

try:  # the launcher's home moved from serving/ to deploy/
    from deploy import launch
except ImportError:  # pragma: no cover - older trees
    from serving import launch  # type: ignore[no-redef]

MODELS = ("image", "text")
OUT = Path("docs/results/memory/memory.json")
ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def role(cmdline: list[str]) -> str:
    """What a process of a replica is, by its command line (as loadtest/explain_load.py classifies them)."""
    cmd = " ".join(cmdline)
    if "spawn_main" in cmd:
        return "explain_process"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "worker" in cmd:
        return "http_worker"
    return "other"


def read_replica(server) -> list[dict]:
    """One reading of every process of a replica: the arbiter, then its descendants."""
    out = []
    try:
        arbiter = psutil.Process(server.proc.pid)
        procs = [(arbiter, "arbiter"), *((p, None) for p in arbiter.children(recursive=True))]
    except psutil.Error:
        return out
    for proc, name in procs:
        try:
            with proc.oneshot():
                full = proc.memory_full_info()
                out.append({"role": name or role(proc.cmdline()), "pid": proc.pid, "ppid": proc.ppid(),
                            "rss_mib": round(full.rss / MIB, 1), "pss_mib": round(full.pss / MIB, 1),
                            "uss_mib": round(full.uss / MIB, 1)})  # fmt: skip
        except psutil.Error:  # exited meanwhile
            continue
    return out


def summarise(procs: list[dict]) -> dict:
    roles: dict[str, dict] = {}
    for p in procs:
        r = roles.setdefault(p["role"], {"count": 0, "rss_mib": 0.0, "pss_mib": 0.0})
        r["count"] += 1
        r["rss_mib"] = round(r["rss_mib"] + p["rss_mib"], 1)
        r["pss_mib"] = round(r["pss_mib"] + p["pss_mib"], 1)
    return {"rss_mib": round(sum(p["rss_mib"] for p in procs), 1),
            "pss_mib": round(sum(p["pss_mib"] for p in procs), 1), "by_role": roles,
            "processes": sorted(procs, key=lambda p: (p["role"] != "arbiter", p["ppid"], p["pid"]))}  # fmt: skip


def reading(servers: dict) -> dict:
    return {kind: summarise(read_replica(s)) for kind, s in servers.items()}


def settled(servers: dict, tolerance_mib: float, min_s: float, max_s: float) -> dict:
    """A reading once every replica's total RSS has stayed within `tolerance_mib` over three reads, 2 s apart
    (`max_s` at most: then the last reading, marked unsettled)."""
    t0, history = time.monotonic(), []
    while True:
        now = reading(servers)
        history.append([now[k]["rss_mib"] for k in servers])
        steady = len(history) >= 3 and all(
            max(h[i] for h in history[-3:]) - min(h[i] for h in history[-3:]) <= tolerance_mib
            for i in range(len(servers))
        )
        waited = time.monotonic() - t0
        if (steady and waited >= min_s) or waited >= max_s:
            now["settled"], now["waited_s"] = steady, round(waited, 1)
            return now
        time.sleep(2)


def one_explanation(server, model: str, data) -> int:
    import urllib.request

    _, path, headers, bodies, query = _bodies(model, data)
    url = server.url + path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    req = urllib.request.Request(url, data=bodies[0], headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


async def load(servers: dict, data, clients: int, explainers: int, seconds: float) -> dict:
    """Predictions from `clients` closed-loop clients and explanations from `explainers` per model, at once."""
    jobs, names = [], []
    for model, server in servers.items():
        predict, _, headers, bodies, _ = _bodies(model, data)
        jobs.append(benchmark.closed_loop(server.url + predict, headers, bodies, clients, seconds, 0.0))
        names.append((model, "predict"))
        if explainers:
            jobs.append(explain_clients(server.url, model, data, explainers, seconds, 0.0))
            names.append((model, "explain"))
    results = await asyncio.gather(*jobs)
    out: dict = {}
    for (model, kind), result in zip(names, results, strict=True):
        if kind == "predict":
            records, _ = result
            out.setdefault(model, {})["predict"] = {"requests": len(records),
                                                    "ok": sum(1 for *_, ok in records if ok)}  # fmt: skip
        else:
            statuses: dict[str, int] = {}
            for *_, status in result:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            out.setdefault(model, {})["explain_by_status"] = statuses
    return out


def under_load(servers: dict, data, args) -> dict:
    """Readings every second while the load runs: per process its largest, per replica the largest total."""
    peaks: dict[str, dict[int, dict]] = {k: {} for k in servers}
    totals: dict[str, float] = dict.fromkeys(servers, 0.0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            for kind, server in servers.items():
                procs = read_replica(server)
                totals[kind] = max(totals[kind], sum(p["rss_mib"] for p in procs))
                for p in procs:
                    if p["rss_mib"] > peaks[kind].get(p["pid"], {}).get("rss_mib", -1):
                        peaks[kind][p["pid"]] = p

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        traffic = asyncio.run(load(servers, data, args.clients, args.explain_clients, args.load_seconds))
    finally:
        stop.set()
        sampler.join()
    out = {}
    for kind in servers:
        out[kind] = summarise(list(peaks[kind].values()))  # each process's largest reading
        out[kind]["largest_total_rss_mib"] = round(totals[kind], 1)
        out[kind]["traffic"] = traffic[kind]
    return out


def export_rev(rev: str, into: Path, overlay: list[str], patches: list[Path]) -> str:
    """The tree of `rev` in `into` (git archive: no checkout of the working tree), the working tree's copies
    of `overlay` over it, then `patches` applied; what was served, in words."""
    commit = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    code = commit
    for path in overlay:
        (into / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, into / path)
        blob = subprocess.run(["git", "hash-object", path], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        code += f" + {path} (blob {blob})"
    for patch in patches:
        subprocess.run(["git", "apply", str(patch.resolve())], cwd=into, check=True)
        code += f" + {patch}"
    return code


def working_tree() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return f"{head} (working tree{', with uncommitted changes' if dirty.strip() else ''})"


def run(args) -> dict:
    data = real_inputs.load()
    servers: dict = {}
    with tempfile.TemporaryDirectory(prefix="servable-memory-") as tmp:
        source, code = None, working_tree()
        if args.rev:
            source = Path(tmp) / "src"
            source.mkdir()
            code = export_rev(args.rev, source, args.overlay, args.patch)
        env = {"SERVABLE_AUTH_KEYS": f"memory:{benchmark.KEY}"}
        if args.image_tag:
            env["SERVABLE_IMAGE_SERVE_MODEL_TAG"] = args.image_tag
        if args.text_tag:
            env["SERVABLE_TEXT_SERVE_MODEL_TAG"] = args.text_tag
        if source is not None:  # the exported code first on the servers' import path
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
        result: dict = {"label": args.label, "code": code, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                        "load_average_before": [round(x, 2) for x in os.getloadavg()], "phases": {}}  # fmt: skip
        try:
            for kind in MODELS:
                print(f"starting {launch.SERVICES[kind]} ...", flush=True)
                servers[kind] = launch.start_ready(launch.SERVICES[kind], env, timeout_s=240, cwd=source,
                                                   log_path=Path(tmp) / f"{kind}.log")  # fmt: skip
            phases = result["phases"]
            phases["at_rest"] = settled(servers, args.settle_mib, args.settle_s, args.settle_max_s)
            show("at_rest", phases["at_rest"])
            statuses = {kind: one_explanation(s, kind, data) for kind, s in servers.items()}
            phases["after_one_explanation"] = settled(servers, args.settle_mib, 4.0, args.settle_max_s)
            phases["after_one_explanation"]["statuses"] = statuses
            show("after_one_explanation", phases["after_one_explanation"])
            phases["under_load"] = under_load(servers, data, args)
            show("under_load", phases["under_load"])
            phases["after_load"] = settled(servers, args.settle_mib, 4.0, args.settle_max_s)
            show("after_load", phases["after_load"])
            result["models"] = {kind: json.loads(launch.get(s.url + "/info",
                                                            {"x-api-key": benchmark.KEY})[1] or b"{}").get("model_tag")
                                for kind, s in servers.items()}  # fmt: skip
        finally:
            for s in servers.values():
                s.stop()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def show(phase: str, found: dict) -> None:
    for kind in MODELS:
        if kind not in found:
            continue
        rep = found[kind]
        roles = ", ".join(f"{r} {v['count']} x = {v['rss_mib']:.0f}" for r, v in rep["by_role"].items())
        print(f"{phase:22} {kind:5} RSS {rep['rss_mib']:6.0f} MiB  PSS {rep['pss_mib']:6.0f} MiB  ({roles})",
              flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="current", help="key of this run in the JSON file (e.g. before, after)")
    p.add_argument("--rev", default="", help="serve this git revision's code (exported) instead of the working tree")
    p.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="PATH",
        help="with --rev: the working tree's copy of this file over the export (repeatable)",
    )
    p.add_argument(
        "--patch",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="with --rev: apply this diff to the export (git apply; repeatable)",
    )
    p.add_argument("--image-tag", default="", help="default: the service's own (fashion-cnn:latest)")
    p.add_argument("--text-tag", default="", help="default: the service's own (sentiment-bert:latest)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop prediction clients per model under load")
    p.add_argument("--explain-clients", type=int, default=2, help="explanation clients per model under load")
    p.add_argument("--load-seconds", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=20.0, help="least wait after ready before the at-rest reading")
    p.add_argument("--settle-max-s", type=float, default=120.0)
    p.add_argument("--settle-mib", type=float, default=3.0, help="steady: total RSS within this over three reads")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if (args.overlay or args.patch) and not args.rev:
        p.error("--overlay and --patch need --rev")
    result = run(args)
    result["command"] = "python -m loadtest.memory " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["machine"] = f"{describe_machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB memory"
    result["python"] = platform.python_version()
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.setdefault("about", "python -m loadtest.memory: resident memory per replica and per process "
                      "(MiB; RSS as ps shows it, PSS shared pages split), see the module docstring")  # fmt: skip
    report.setdefault("runs", {})[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (run {args.label!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
