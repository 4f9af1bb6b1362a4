"""Each cited proof passes when run alone (`pytest "<path>::<name>"`), as docs/deployment-answers.md says.

The suite runs the proofs together, sharing servers: a proof that leaned on an earlier test's traffic or
state would pass there and fail alone. This runs a sample of the cited tests, each in a pytest of its own
(its own model store, trained fixtures and servers), and fails if any of them fails.

    python -m tests.proofs_alone            # make proofs-alone: the always-run ones + 1 rotating by date
    python -m tests.proofs_alone --all      # every cited test, one by one (long)
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time

from tests.test_docs import ROOT, answer_rows

# Proofs that once depended on other tests' traffic: run alone every time.
ALWAYS = (
    "tests/test_serving.py::test_secret_content_never_logged",
    "tests/test_privacy.py::test_opt_in_text_is_scrubbed_before_it_reaches_disk",
)


def cited() -> list[str]:
    return sorted({f"{path}::{name}" for _, _, tests in answer_rows() for path, name in tests})


def sample(tests: list[str], extra: int, day: datetime.date) -> list[str]:
    """ALWAYS, plus `extra` others picked by the date: every cited proof gets its turn over the days."""
    rest = [t for t in tests if t not in ALWAYS]
    start = (day.toordinal() * extra) % len(rest)
    return [*ALWAYS, *(rest[(start + i) % len(rest)] for i in range(min(extra, len(rest))))]


def run_bounded(cmd: list[str], timeout_s: float) -> int:
    """`cmd`'s exit code, or 124 past `timeout_s`. A pytest past its time gets SIGINT first, so that its fixtures'
    finalizers stop the servers they started (each in a process group of its own, out of reach of a kill of
    pytest's); SIGKILL only if it has not ended a minute later."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra", type=int, default=1, help="rotating proofs besides the always-run ones")
    p.add_argument("--all", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per proof")
    args = p.parse_args(argv)
    tests = cited()
    chosen = tests if args.all else sample(tests, args.extra, datetime.datetime.now(datetime.UTC).date())
    failed = []
    for test in chosen:
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
        rc = run_bounded(cmd, args.timeout)
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {test} alone ({time.monotonic() - start:.0f} s)", flush=True)
        if rc != 0:
            failed.append(test)
    print(f"{len(chosen) - len(failed)}/{len(chosen)} cited proofs passed alone")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
