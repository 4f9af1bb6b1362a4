"""The load-test tools' own arithmetic and options: setting_cost (per-priority CPU of a server's children, the
rounds' medians, KEY=VALUE settings), timing_cost, and the options loadtest/cli.py gives every tool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from loadtest.setting_cost import main, settings, summary, thread_cpu_by_nice

# A child with one thread at nice 19 that spins until it has used 0.5 s of CPU (however long a busy machine
# makes that take), then stays alive, the main thread asleep: like a worker whose shadow lane works.
CHILD = """
import os, threading, time
def spin():
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while time.thread_time() < 0.5:
        pass
    time.sleep(60)
threading.Thread(target=spin, daemon=True).start()
time.sleep(60)
"""


def test_cpu_is_split_by_thread_priority_over_the_servers_children():
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CHILD!r}])"],
        start_new_session=True,
    )
    try:
        deadline, cpu = time.monotonic() + 50, {}
        while time.monotonic() < deadline and cpu.get(19, 0) < 0.45:
            time.sleep(0.5)
            cpu = thread_cpu_by_nice(parent.pid)  # the parent itself (the arbiter) is not counted: only its children
        assert cpu.get(19, 0) >= 0.45 and cpu.get(19, 0) > 3 * cpu.get(0, 0), cpu
        assert thread_cpu_by_nice(os.getpid() + 10_000_000) == {}  # no such process: nothing, no error
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)


def test_summary_compares_the_medians_of_each_side():
    points = [{"label": "off", "rps": r, "p99_ms": p} for r, p in ((100, 50), (90, 70), (120, 60))]
    points += [{"label": "on", "rps": r, "p99_ms": p} for r, p in ((80, 66), (95, 90), (70, 40))]
    s = summary(points)
    assert s["off"] == {"rps": 100, "p99_ms": 60} and s["on"] == {"rps": 80, "p99_ms": 66}
    assert s["rps_on_over_off"] == 0.8 and s["p99_on_over_off"] == 1.1


def test_settings_are_key_value_pairs_and_an_empty_comparison_is_refused():
    assert settings(["SERVER_TIMING=false", "X=a=b", "EMPTY="]) == {"SERVER_TIMING": "false", "X": "a=b", "EMPTY": ""}
    with pytest.raises(Exception, match="KEY=VALUE"):
        settings(["SERVER_TIMING"])
    with pytest.raises(SystemExit) as exc:
        main(["--models", "image"])  # neither --on/--off nor --shadow-share: refused before any server starts
    assert exc.value.code == 2


def test_summary_with_the_peer_takes_each_rounds_ratio_before_the_median():
    """Round by round: off 100/50, 90/30, 120/60 = 2, 3, 2; on 80/50, 95/30, 70/60 = 1.6, 3.17, 1.17."""
    points = [{"label": side, "rps": r, "p99_ms": 10} for trio in ((100, 80, 50), (90, 95, 30), (120, 70, 60))
              for side, r in zip(("off", "on", "peer"), trio, strict=True)]  # fmt: skip
    s = summary(points)
    assert s["off_over_peer"] == 2.0 and s["on_over_peer"] == 1.6 and s["peer"]["rps"] == 50


def test_timing_headers_cost_is_their_rendering_over_the_workers_cpu_per_answer():
    from loadtest.timing_cost import headers_seconds, report

    seconds = headers_seconds(number=2000, repeat=3)
    assert 0 < seconds < 1e-3, seconds  # rendering five numbers: microseconds, not nothing, not milliseconds
    point = {"label": "off", "rps": 100.0, "seconds": 10.0, "worker_cpu_s": {"nice 0": 9.0, "nice 19": 1.0}}
    rounds = {"models": {"text": {"points": [point, {**point, "label": "on"}], "summary": {"rps_on_over_off": 0.99}}}}
    out = report(rounds, 5e-6)  # 10 s of worker CPU for 1,000 answers: 10 ms each; 5 µs of it is 0.05 %
    assert out["models"]["text"] == {"worker_cpu_ms_per_answer": 10.0, "headers_share_of_cpu": 0.0005,
                                     "rounds_rps_on_over_off": 0.99}  # fmt: skip


def test_the_load_tools_model_options_cover_the_models_with_requests():
    """loadtest/cli.py's models are the served entries the benchmark has request bodies for, each with its
    service's default tag."""
    from loadtest import benchmark, cli
    from servable.config import SERVED_MODELS

    assert set(cli.KINDS) == set(benchmark.FORMATS) and set(cli.KINDS) <= set(SERVED_MODELS)
    args = benchmark.parse([])
    tags = {k: cli.tag_of(args, k) for k in cli.KINDS}
    assert tags == {"image": "fashion-cnn:latest", "text": "sentiment-bert:latest"}


def test_paired_ratios_take_each_rounds_own_on_over_off_before_the_median():
    """Medians of the sides give 100 vs 80 (0.8); the pairs say 0.8, 1.056, 0.583 (median 0.8) for rps and
    1.32, 1.286, 0.667 for p99 (median 1.286, where the medians' ratio is 1.1): a drifting machine moves both
    sides of a pair together, so each pair's ratio, not the ratio of medians, is the fair one."""
    points = [{"label": "off", "rps": r, "p99_ms": p} for r, p in ((100, 50), (90, 70), (120, 60))]
    points += [{"label": "on", "rps": r, "p99_ms": p} for r, p in ((80, 66), (95, 90), (70, 40))]
    s = summary(points)
    assert s["rps_on_over_off_paired"] == 0.8 and s["p99_on_over_off_paired"] == 1.286


def test_slices_start_each_server_once_and_measure_every_side_in_every_slice(monkeypatch):
    import argparse

    from loadtest import setting_cost

    started, stopped, measured = [], [], []

    class Server:
        def __init__(self, label):
            self.label = label

        def stop(self):
            stopped.append(self.label)

    monkeypatch.setattr(setting_cost, "start", lambda m, t, label, *a: started.append(label) or Server(label))
    monkeypatch.setattr(setting_cost, "warm", lambda *a: None)
    monkeypatch.setattr(setting_cost, "measure", lambda server, m, label, *a: measured.append(label)
                        or {"label": label, "rps": 1.0, "p99_ms": 1.0})  # fmt: skip
    sides = [("off", {}, None), ("on", {}, None), ("peer", {}, None)]
    args = argparse.Namespace(slices=4, warmup=0.0, seconds=1.0)
    points = setting_cost.in_slices("image", "t", sides, None, args, None)
    assert started == ["off", "on", "peer"] and sorted(stopped) == sorted(started)
    assert [p["label"] for p in points] == ["off", "on", "peer"] * 4  # in side order per slice: summary pairs them
    assert [p["slice"] for p in points] == [i for i in range(4) for _ in sides]
    assert measured[:3] != measured[3:6] or measured[3:6] != measured[6:9]  # the order within a slice varies


def test_cpu_per_answer_is_paired_where_the_workers_cpu_was_read():
    """Pairs: off 10 s of CPU for 100 req/s x 10 s (10 ms an answer), on 12 s for 100 (12 ms): 1.2; then 1.0."""

    def point(label, rps, cpu):
        return {"label": label, "rps": rps, "p99_ms": 1.0, "seconds": 10.0, "worker_cpu_s": {"nice 0": cpu}}

    points = [point("off", 100, 10.0), point("on", 100, 12.0), point("off", 50, 5.0), point("on", 60, 6.0)]
    assert summary(points)["cpu_per_answer_on_over_off_paired"] == 1.1  # the median of 1.2 and 1.0
    assert "cpu_per_answer_on_over_off_paired" not in summary([{**p, "worker_cpu_s": {}} for p in points])
