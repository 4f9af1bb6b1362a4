"""`make time-all` (servable/make_timing.py) times the stages of the Makefile's `all`, in its order, stops at the
first failing one as make does, and counts the disk the job left; on a small Makefile of its own, no training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from servable import make_timing

ROOT = Path(__file__).resolve().parents[1]

MAKEFILE = """\
all: first second third  ## a comment, not a stage
first:
\t@sleep 0.3; mkdir -p runs; head -c 5000 /dev/zero > runs/out
second:
\t@test "$(FAIL)" != 1
third:
\t@head -c 7000 /dev/zero > .venv/lib
"""


def test_stages_are_the_prerequisites_of_all_in_the_makefile():
    assert make_timing.stages(ROOT / "Makefile") == ["setup", "train-image", "train-text", "summary", "demo",
                                                     "loadtest"]  # fmt: skip


def test_each_stage_is_timed_in_order_and_the_disk_counted(tmp_path, monkeypatch):
    (tmp_path / "Makefile").write_text(MAKEFILE)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "python").symlink_to(sys.executable)  # a link is not followed
    (tmp_path / "store" / "models").mkdir(parents=True)
    (tmp_path / "store" / "models" / "m").write_bytes(b"x" * 300)
    os.link(tmp_path / "store" / "models" / "m", tmp_path / "store" / "models" / "same")  # one file, counted once
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    assert make_timing.main(["--out", "results/t.json"]) == 0
    record = json.loads((tmp_path / "results" / "t.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["first", "second", "third"]
    assert all(s["exit"] == 0 for s in record["stages"]) and record["exit"] == 0
    assert 0.3 <= record["stages"][0]["wall_s"] <= record["total_s"]
    assert record["venv_existed"] and record["command"] == "make all"
    assert set(record["load_average_1m"]) == {"start", "end"} and record["finished"]
    link_size = (tmp_path / ".venv" / "python").lstat().st_size
    assert record["disk_bytes"] == {"venv": 7000 + link_size, "cache": None, "runs": 5000, "model_store": 300}


def test_the_first_failing_stage_ends_the_job_with_its_exit_code(tmp_path, monkeypatch):
    (tmp_path / "Makefile").write_text(MAKEFILE)
    monkeypatch.chdir(tmp_path)
    assert make_timing.main(["--out", "t.json", "FAIL=1"]) == 2  # make's code for a failed recipe
    record = json.loads((tmp_path / "t.json").read_text())
    assert [(s["stage"], s["exit"]) for s in record["stages"]] == [("first", 0), ("second", 2)]
    assert record["command"] == "make all FAIL=1" and not record["venv_existed"]


def test_a_job_stopped_part_way_keeps_the_stages_it_finished(tmp_path, monkeypatch):
    (tmp_path / "Makefile").write_text(MAKEFILE.replace('test "$(FAIL)" != 1', "sleep 30"))
    monkeypatch.chdir(tmp_path)
    job = subprocess.Popen([sys.executable, "-m", "servable.make_timing", "--out", "t.json"],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)  # fmt: skip
    try:
        for _ in range(100):  # the first stage done, the second one running
            if (tmp_path / "t.json").exists() and json.loads((tmp_path / "t.json").read_text())["stages"]:
                break
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=10)
    record = json.loads((tmp_path / "t.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["first"] and not record["finished"]
