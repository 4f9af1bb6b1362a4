"""Opt-in, not CI: the CPU image built from deploy/Dockerfile with podman and run with the model
store mounted, answering /classify and /sentiment (deploy/podman/build_and_run.sh).

    SERVABLE_PODMAN_TEST=1 .venv/bin/pytest -q tests/test_podman.py

Needs podman, runc and mmdebstrap (`make image-cpu-podman` installs them), root or rootless podman,
a Debian mirror, PyPI, and a model store with both models (SERVABLE_PODMAN_MODEL_STORE, default
~/bentoml/models as `make all` leaves it). Takes several minutes; docs/deploy.md records a run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("SERVABLE_PODMAN_TEST") != "1", reason="opt-in: SERVABLE_PODMAN_TEST=1 builds and runs the image"
)


def test_cpu_image_builds_runs_and_answers_both_endpoints(tmp_path):
    store = Path(os.environ.get("SERVABLE_PODMAN_MODEL_STORE", Path.home() / "bentoml" / "models"))
    assert (store / "fashion-cnn" / "latest").exists() and (store / "sentiment-bert" / "latest").exists(), store
    env = {**os.environ, "MODEL_STORE": str(store), "WORK": str(tmp_path)}
    out = subprocess.run([str(ROOT / "deploy" / "podman" / "build_and_run.sh")], env=env, capture_output=True,
                         text=True, timeout=1800, check=False)  # fmt: skip
    log = out.stdout + out.stderr
    print(log)  # with -s: the run's own report (docs/deploy.md quotes one)
    assert out.returncode == 0, log[-4000:]
    assert "user=10001:10001" in log and "no pip in the final image" in log and "HEALTHCHECK command: healthy" in log
    answers = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"predictions"' in line]
    classify, sentiment = answers
    assert classify["model"].startswith("fashion-cnn:") and classify["predictions"][0]["label"]
    assert sentiment["model"].startswith("sentiment-bert:") and len(sentiment["predictions"]) == 2
    assert re.search(r"fashion-cnn:\S+ CPUExecutionProvider", log)
