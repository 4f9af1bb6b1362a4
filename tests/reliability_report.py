"""The reliability figures of one pytest run, written to SERVABLE_RELIABILITY_REPORT when it is set.

`make reliability` runs the reliability suite and the slow-client attacks in one pytest run, so their
figures land in one file (docs/results/reliability.json) with the machine, the load and the date:
docs/reliability.md quotes that file, and tests/doc_figures/ compares each quoted figure with it.
"""

from __future__ import annotations

import json
import os
import time

REPORT: dict[str, dict] = {}


def write() -> None:
    """Print the recorded figures and, with SERVABLE_RELIABILITY_REPORT=path.json, write them there."""
    if not REPORT:
        return
    print("\nreliability figures:", json.dumps(REPORT, indent=1))
    if path := os.environ.get("SERVABLE_RELIABILITY_REPORT"):
        from servable.machine import describe_machine

        # where and when, so a figure quoted from this file names its machine (tests/doc_figures/)
        about = {"command": "make reliability", "machine": describe_machine(), "load_average_1m": os.getloadavg()[0],
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        with open(path, "w") as f:
            json.dump(about | REPORT, f, indent=2)
