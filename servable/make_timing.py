"""`make all`, timed: each stage's wall time and the disk the job left, written to a results file.

    python3 -m servable.make_timing [--out docs/results/make-all.json] [MAKE ARGUMENTS ...]

(`make time-all` runs it.) The stages are the prerequisites of the Makefile's `all` target, read from the
Makefile, each run as `make STAGE` in that order, so the record follows the Makefile; the first failing stage
ends the job, as it ends `make all`. The record is rewritten after each stage, so a job stopped part way
keeps the stages it finished. At the end, the sizes of the virtualenv, the download cache, the runs and the
model store (`$BENTOML_HOME/models`), each counted as its files' bytes (symbolic links not followed). Standard
library only: the first stage builds the virtualenv this runs before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from servable.machine import describe_machine

OUT = Path("docs/results/make-all.json")
TARGET = "all"


def stages(makefile: Path, target: str = TARGET) -> list[str]:
    """The prerequisites of `target` in the Makefile, in order."""
    found = re.search(rf"^{re.escape(target)}:([^#\n]*)", makefile.read_text(), re.M)
    if found is None:
        raise SystemExit(f"{makefile}: no `{target}:` rule")
    return found[1].split()


def size_bytes(path: Path) -> int | None:
    """The bytes of every file under `path` (links not followed, each file once); None when it does not exist."""
    if not path.exists():
        return None
    if not path.is_dir():
        return path.lstat().st_size
    seen, total = set(), 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = (Path(folder) / name).lstat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def disk(root: Path) -> dict[str, int | None]:
    store = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")).expanduser() / "models"
    places = {"venv": root / ".venv", "cache": root / ".cache", "runs": root / "runs", "model_store": store}
    return {name: size_bytes(path) for name, path in places.items()}


def commit(root: Path) -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def run(root: Path, make_args: list[str], out: Path, target: str = TARGET) -> dict:
    """Run each stage of `make target` in `root`; the record of the job, written to `out` after every stage (a
    job stopped part way keeps the stages it finished, with `"finished": false`)."""
    record: dict = {
        "command": " ".join(["make", target, *make_args]),
        # what `make time-all VAR=value` passes on to each stage's make
        "makeflags": os.environ.get("MAKEFLAGS", ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "commit": commit(root),
        "venv_existed": (root / ".venv").exists(),
        # other work on the machine stretches every stage: the 1-minute load average before and after
        "load_average_1m": {"start": round(os.getloadavg()[0], 1)},
        "finished": False,
        "stages": [],
    }
    write(record, out)
    start = time.monotonic()
    for stage in stages(root / "Makefile", target):
        began = time.monotonic()
        code = subprocess.run(["make", stage, *make_args], cwd=root, check=False).returncode
        record["stages"].append({"stage": stage, "wall_s": round(time.monotonic() - began, 1), "exit": code})
        write(record, out)
        if code:
            break
    record["total_s"] = round(time.monotonic() - start, 1)
    record["load_average_1m"]["end"] = round(os.getloadavg()[0], 1)
    record["exit"] = record["stages"][-1]["exit"] if record["stages"] else 0
    record["disk_bytes"] = disk(root)
    record["finished"] = True
    write(record, out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the results file (default: %(default)s)")
    args, make_args = parser.parse_known_args(argv)
    root = Path.cwd()
    out = args.out if args.out.is_absolute() else root / args.out
    record = run(root, make_args, out)
    for s in record["stages"]:
        print(f"{s['stage']:<12} {s['wall_s']:>8.1f} s  exit {s['exit']}")
    print(f"{'total':<12} {record['total_s']:>8.1f} s  -> {out}")
    return record["exit"]


if __name__ == "__main__":
    sys.exit(main())
