"""Flame graphs of the served request path under load: where a request's CPU time goes.

Starts a served configuration (as the benchmark does), drives it with the benchmark's closed-loop
client at `--clients` for `--seconds`, and records every process of the server (HTTP workers,
and the model process in the split topology) with py-spy (needs root or ptrace rights):

    python -m loadtest.profile                       # default and split (old design), both models
    python -m loadtest.profile --models image --configs default --seconds 10 --out /tmp/profiles

Writes `<model>-<config>.svg` (interactive flame graph) and a `profiles.json` with the load's
figures to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest import benchmark, cli
from loadtest import inputs as real_inputs

CONFIGS = {
    "default": {},
    "split-old-design": {"TOPOLOGY": "split", "VARIANT": "fp32", "BATCHING": "true", "DEVICE": "cpu", "WORKERS": "1"},
}


def py_spy() -> str:
    """py-spy beside this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy") or "py-spy"


def profile_one(model: str, tag: str, config: str, args, data, log_dir: Path) -> dict:
    server = benchmark.start_served(model, tag, CONFIGS[config], config, log_dir)
    out = args.out / f"{model}-{config}.svg"
    try:
        fmt = benchmark.FORMATS[model][0]  # the benchmark's main format
        path, headers, bodies = benchmark.request_bodies(model, data, fmt)
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(server.proc.pid), "--subprocesses",
             "--duration", str(int(args.seconds)), "--rate", "100", "--nonblocking", "--format", "flamegraph",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        records, secs = asyncio.run(
            benchmark.closed_loop(server.url + path, headers, bodies, args.clients, args.seconds, args.warmup)
        )
        _, err = spy.communicate(timeout=args.seconds + 60)
        if spy.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err[-500:]}")
        p = benchmark.to_point(model, config, "served", args.clients, records, secs)
        print(f"{model} {config}: {p.rps:.0f} req/s at {args.clients} clients, p99 {p.p99_ms:.1f} ms -> {out}")
        return {"model": model, "config": config, "settings": CONFIGS[config], "tag": tag, "svg": out.name,
                "clients": args.clients, "seconds": args.seconds, "rps": round(p.rps, 1),
                "p50_ms": round(p.p50_ms, 2), "p99_ms": round(p.p99_ms, 2), "errors": p.errors}  # fmt: skip
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    from servable.machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(ap)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    cli.add_load_options(ap, warmup=1.0)
    ap.add_argument("--out", type=Path, default=Path("docs/results/profiles"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = real_inputs.load(args.inputs)
    log_dir = Path(tempfile.mkdtemp(prefix="servable-profile-logs-"))
    print(f"server logs: {log_dir} (kept)")
    runs = [profile_one(m, cli.tag_of(args, m), c, args, data, log_dir) for m in args.models for c in args.configs]
    summary = {"command": " ".join(["python -m loadtest.profile", *(sys.argv[1:] if argv is None else argv)]),
               "machine": describe_machine(), "runs": runs}  # fmt: skip
    (args.out / "profiles.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
