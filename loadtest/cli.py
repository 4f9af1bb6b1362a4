"""The command-line options the load-test tools share: which models, which versions, how hard and how long.

The models are the served entries the load tests have requests for (`benchmark.FORMATS`), and each one's
`--<kind>-tag` defaults to its service's own default tag, so a new served entry with requests gets its
options here, not in every tool.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loadtest import inputs as real_inputs
from servable.config import SERVED_MODELS

# The served models the load tests have request bodies for (loadtest/benchmark.py::request_bodies).
KINDS = ("image", "text")


def default_tag(kind: str) -> str:
    return SERVED_MODELS[kind].settings.model_fields["model_tag"].default


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--models and a --<kind>-tag for each."""
    ap.add_argument("--models", nargs="+", default=list(KINDS), choices=KINDS)
    for kind in KINDS:
        ap.add_argument(f"--{kind}-tag", default=default_tag(kind), help=f"the {kind} model's store tag")


def tag_of(args: argparse.Namespace, kind: str) -> str:
    return getattr(args, f"{kind}_tag")


def add_load_options(ap: argparse.ArgumentParser, clients: int = 32, seconds: float = 15.0,
                     warmup: float = 3.0) -> None:  # fmt: skip
    """--clients (closed loop), --seconds and --warmup per point, --inputs (the exported request inputs)."""
    ap.add_argument("--clients", type=int, default=clients, help="closed-loop clients")
    ap.add_argument("--seconds", type=float, default=seconds, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=warmup, help="seconds of load before each point")
    ap.add_argument("--inputs", type=Path, default=real_inputs.DEFAULT_DIR)


def write_result(out: Path, result: dict) -> int:
    """A tool's results file: `result` as JSON at `out` (its folder made), where it went printed; the exit status."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"-> {out}")
    return 0
