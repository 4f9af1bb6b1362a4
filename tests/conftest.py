"""Shared fixtures: an isolated BentoML model store and tiny real training runs (reused)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports bentoml: every test session gets its own model store, removed when the session
# ends (about 0.7 GB each: left behind, repeated runs such as tests.proofs_alone fill the disk).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="servable-test-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _reliability_report():
    """The figures the reliability and slow-client tests recorded, printed and written at the end."""
    yield
    from tests import reliability_report

    reliability_report.write()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


# The image fixture's recipe (`python -m training image` takes each as a flag): 400 Fashion-MNIST images at 32 px.
IMAGE_FIXTURE_RECIPE = {
    "limit": 400, "test_limit": 300, "image_size": 32, "epochs_head": 1, "epochs_finetune": 2, "batch_size": 32,
    "lr_finetune": 1e-3, "calibration_size": 64, "progress": False, "average_last": 2,
}  # fmt: skip


@pytest.fixture(scope="session")
def image_run(runs_dir):
    """A real fine-tune on 400 Fashion-MNIST images at 32 px: seconds, not minutes."""
    from servable.config import ImageTrainConfig
    from training.image_pipeline import train_image

    return train_image(ImageTrainConfig(runs_dir=runs_dir, version="t1", **IMAGE_FIXTURE_RECIPE))


@pytest.fixture(scope="session")
def text_run(runs_dir):
    """A real fine-tune of the bundled MiniLM on 400 review sentences."""
    from servable.config import TextTrainConfig
    from training.text_pipeline import train_text

    cfg = TextTrainConfig(
        runs_dir=runs_dir, limit=600, test_limit=150, max_length=48, epochs_head=1, epochs_finetune=2, lr_finetune=1e-4,
        batch_size=32, progress=False, version="t1", datasets_dir=ROOT / ".cache" / "datasets",
    )  # fmt: skip
    return train_text(cfg)


API_KEY = "test-key-0123456789"
SECRET_SENTENCE = "my passport number is X1234567 and the secret word is PURPLE-ELEPHANT-42"


# The suite sends many wrong keys from 127.0.0.1 on purpose; the failed-authentication limit per
# client address (tests/test_auth_identity.py proves it on its own servers) is lifted for the rest.
UNTHROTTLED_AUTH = {"SERVABLE_AUTH_FAILED_LIMIT": "1000000"}


def _serve(kind: str, tag: str, tmp_path_factory, extra_env: dict | None = None, shipped: bool = False):
    """A server of the `kind` model on a free port. The test settings (fp32, 8 items per request so the
    limits are cheap to reach, a 5 s batching-queue bound for a busy machine) unless `shipped`: then
    every setting is the shipped default but the model tag, the key and the failed-authentication limit."""
    from deploy import launch
    from servable.config import SERVED_MODELS

    prefix = SERVED_MODELS[kind].env_prefix
    env = {f"{prefix}MODEL_TAG": tag, "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}", **UNTHROTTLED_AUTH}
    if not shipped:
        env |= {f"{prefix}MAX_ITEMS": "8", f"{prefix}MAX_LATENCY_MS": "5000", f"{prefix}VARIANT": "fp32"}
    env |= extra_env or {}
    log = tmp_path_factory.mktemp(f"{kind}-server") / "server.log"
    return launch.start_ready(launch.SERVICES[kind], env, log_path=log)


@pytest.fixture(scope="session")
def image_server(image_run, tmp_path_factory):
    server = _serve("image", image_run.tag, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def text_server(text_run, tmp_path_factory):
    server = _serve("text", text_run.tag, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shipped_text_server(text_run, tmp_path_factory):
    """The sentiment service as shipped (2 s queue bound, 64 items, one worker per core): the concurrency
    proofs run against it. One setting differs: the variant is fp32, not auto. Auto serves int8 when its
    recorded accuracy is within half a point, and the text int8 is dynamically quantised (activation
    scales from the whole batch), so its scores move with batch-mates (test_text_int8_on_two_workers):
    the proofs that a caller gets exactly its own answer need a batch-independent variant."""
    server = _serve("text", text_run.tag, tmp_path_factory, {"SERVABLE_TEXT_SERVE_VARIANT": "fp32"}, shipped=True)
    yield server
    server.stop()
