"""Input drift (docs/serving.md#drift): the fixture models' artifacts carry their training inputs' reference
distributions, written by the training pipelines; serving computes the same statistics with the same functions;
a real server exports each feature's PSI, which stays under the alert threshold on the fixtures' own data and
goes over it on shifted inputs (inverted images, very long or non-English texts); an artifact without a
reference serves as before and exports no drift."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import unicodedata

import numpy as np
import pytest
import requests
from PIL import Image

from servable import drift_reference
from servable.config import FASHION_MNIST_DIR, ImageServeSettings, ServeCommon, TextServeSettings
from tests.conftest import API_KEY, _serve

KEY = {"x-api-key": API_KEY}
THRESHOLD = ServeCommon.model_fields["drift_psi_alert"].default
IMAGE_FEATURES = {"brightness", "contrast", "pixels", "aspect", "predicted_class"}
TEXT_FEATURES = {"length", "oov", "predicted_class"}
WINDOW, ITEMS = 40, 8  # requests per window, items per request (the test servers' MAX_ITEMS)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _psi(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    found = {}
    for labels, value in re.findall(r"^servable_drift_psi\{([^}]*)\} ([0-9.e+-]+)$", text, re.M):
        found[re.search(r'feature="([^"]+)"', labels)[1]] = float(value)
    return found


def _drift_server(kind: str, tag: str, tmp_path_factory, window: int = WINDOW):
    """One HTTP worker (one window) with a short window, so a test fills it in seconds."""
    prefix = "SERVABLE_IMAGE_SERVE_" if kind == "image" else "SERVABLE_TEXT_SERVE_"
    return _serve(kind, tag, tmp_path_factory, {f"{prefix}WORKERS": "1", f"{prefix}DRIFT_WINDOW": str(window)})


# ---------------------------------------------------------------- the reference, written by training


def test_training_writes_the_reference_into_the_artifact(image_run, text_run):
    """Both pipelines' artifacts (the fixtures are built by the ordinary training code) carry a reference for
    every feature, on the fixed edges, over their training inputs."""
    from servable import artifact

    for run, features in ((image_run, IMAGE_FEATURES), (text_run, TEXT_FEATURES)):
        ref = artifact.load(run.tag).manifest.drift_reference
        assert ref is not None and set(ref.features) == features, run.tag
        assert ref.split == "train"
        n = len(run.splits.train_x) if run is image_run else len(run.splits.train)
        assert ref.n == n
        for name, feature in ref.features.items():
            assert sum(feature.counts) == n, name
            if name == drift_reference.PREDICTED_CLASS:
                assert feature.edges is None and len(feature.counts) == len(run.splits.labels)
                assert np.count_nonzero(feature.counts) >= 2  # a mix, not one class
            else:
                assert feature.edges == list(drift_reference.EDGES[name])
    image_ref = artifact.load(image_run.tag).manifest.drift_reference.features
    # Fashion-MNIST: every training image is a 28 x 28 square
    assert image_ref["pixels"].counts[0] == image_run.splits.train_x.shape[0]
    assert image_ref["aspect"].counts[drift_reference.bin_index(image_ref["aspect"].edges, [1.0])[0]] == len(
        image_run.splits.train_x
    )


def test_serving_computes_the_image_statistics_training_recorded(image_run):
    """Parity: the serving adapter's decode, fed the training images as a client sends them, yields statistics
    whose histograms are the artifact's reference (one function, `servable/drift_reference.py`, on the same
    pre-processed values on both sides)."""
    from servable import artifact
    from serving.adapters.image import ImageAdapter
    from serving.loading import load_model

    adapter, _, _ = load_model(ImageAdapter, ImageServeSettings(model_tag=image_run.tag, max_items=10_000),
                               with_session=False)  # fmt: skip
    x = image_run.splits.train_x  # uint8 at the model's size, as training saw them
    _, _, drift_input = adapter.decode("image", [_png(a) for a in x])
    stats = adapter.drift_statistics([drift_input])
    served = drift_reference.reference(stats, image_run.splits.labels, "served")
    ref = artifact.load(image_run.tag).manifest.drift_reference
    for name in ("brightness", "contrast"):
        assert served.features[name].counts == ref.features[name].counts, name
    # the upload's size is the file's: a 28 x 28 upload lands where the training images did
    raw = np.asarray(Image.open(io.BytesIO(_png(x[0][:, :, 0]))).resize((28, 28)))
    one = adapter.drift_statistics([adapter.decode("image", [_png(raw)])[2]])
    assert one["pixels"].tolist() == [784.0] and one["aspect"].tolist() == [1.0]
    # a chunk of requests gives each image the statistics it has alone; a pre-processed tensor has no size
    alone = [adapter.drift_statistics([adapter.decode("image", [_png(a)])[2]]) for a in x[:3]]
    pixels = adapter.decode("pixels", np.stack(adapter.decode("image", [_png(x[3])])[0]))[2]
    chunk = adapter.drift_statistics([adapter.decode("image", [_png(a)])[2] for a in x[:3]] + [pixels])
    for name in ("brightness", "contrast"):
        np.testing.assert_allclose(chunk[name][:3], [a[name][0] for a in alone], rtol=1e-6)
    assert len(chunk["brightness"]) == 4 and len(chunk["pixels"]) == 3


def test_serving_computes_the_text_statistics_training_recorded(text_run):
    """Parity, text: the serving adapter's decode of the training texts gives the artifact's length and
    unknown-token histograms."""
    from servable import artifact
    from serving.adapters.text import TextAdapter
    from serving.loading import load_model

    text, _, _ = load_model(TextAdapter, TextServeSettings(model_tag=text_run.tag, max_items=10_000),
                            with_session=False)  # fmt: skip
    texts = [t for t, _ in text_run.splits.train]
    # two requests counted as one chunk, as a worker's drift monitor does
    stats = text.drift_statistics([text.decode("text", part)[2] for part in (texts[:10], texts[10:])])
    served = drift_reference.reference(stats, text_run.splits.labels, "served")
    ref = artifact.load(text_run.tag).manifest.drift_reference
    for name in ("length", "oov"):
        assert served.features[name].counts == ref.features[name].counts, name


def test_an_artifact_without_a_reference_loads_and_has_no_monitor(image_run):
    """Version tolerance: a manifest written before drift (no `drift_reference` key) still validates, and its
    replica gets no drift monitor (it serves as before: tests/test_drift.py::test_no_reference_no_drift_export)."""
    from servable import artifact
    from serving.drift import DriftMonitor

    manifest = artifact.load(image_run.tag).manifest
    old = json.loads(manifest.model_dump_json())
    del old["drift_reference"]
    older = artifact.ModelManifest.model_validate(old)
    assert older.drift_reference is None
    assert DriftMonitor.of(older, ImageServeSettings(), dict) is None
    assert DriftMonitor.of(manifest, ImageServeSettings(), dict) is not None


def test_the_window_counts_chunks_and_keeps_the_last_requests():
    """Window 40, so chunks of 4 requests: nothing is counted or published before a chunk and a full window;
    then the window holds the last 40 requests (up to a chunk more), so 40 shifted requests replace the
    quiet ones and the PSI follows them."""
    from serving.drift import DriftMonitor

    edges = list(drift_reference.EDGES["brightness"])
    reference = drift_reference.DriftReference(split="t", n=10 * (len(edges) + 1), features={
        "brightness": drift_reference.FeatureReference(edges=edges, counts=[10] * (len(edges) + 1))})  # fmt: skip
    # one value in each bin, the outer two included
    mid = [edges[0] - 1.0, *((a + b) / 2 for a, b in itertools.pairwise(edges)), edges[-1] + 1.0]
    monitor = DriftMonitor(reference, "m", "v1", 40, 0.2, _concatenate)
    quiet = [{"brightness": np.array([mid[i % len(mid)]])} for i in range(40)]
    for stats in quiet[:3]:
        monitor.observe(stats, np.zeros((1, 2)))
    assert monitor.counts.sum() == 0 and len(monitor.pending) == 3  # the chunk is not full yet
    for stats in quiet[3:]:
        monitor.observe(stats, np.zeros((1, 2)))
    assert monitor.in_window == 40 and monitor.counts.sum() == 40
    low = monitor.psi()["brightness"]
    for _ in range(40):
        monitor.observe({"brightness": np.array([edges[0] - 1.0])}, np.zeros((1, 2)))  # all in the first bin
    assert 40 <= monitor.in_window < 44 and monitor.counts[0] == 40  # only the shifted requests remain
    assert monitor.psi()["brightness"] > 1 > low


def _concatenate(inputs):
    from serving.adapters.base import Adapter

    return Adapter.drift_statistics(None, inputs)  # the base adapter's: inputs that are statistics already


def test_psi_is_zero_for_the_same_mix_and_grows_with_the_shift():
    ref = np.array([10, 30, 40, 20, 0])
    assert drift_reference.psi(ref, ref * 3) == pytest.approx(0.0, abs=1e-12)
    small = drift_reference.psi(ref, np.array([12, 28, 40, 20, 0]))
    large = drift_reference.psi(ref, np.array([40, 30, 20, 10, 0]))
    moved = drift_reference.psi(ref, np.array([0, 0, 0, 0, 10]))  # all in a bin the reference never saw
    assert 0 < small < 0.01 < THRESHOLD < large < moved


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def image_drift_server(image_run, tmp_path_factory):
    server = _drift_server("image", image_run.tag, tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def text_drift_server(text_run, tmp_path_factory):
    server = _drift_server("text", text_run.tag, tmp_path_factory)
    yield server
    server.stop()


def _send_images(server, images: np.ndarray) -> None:
    for i in range(0, len(images), ITEMS):
        files = [("image", (f"{j}.png", _png(a), "image/png")) for j, a in enumerate(images[i : i + ITEMS])]
        r = requests.post(server.url + "/classify", files=files, headers=KEY, timeout=60)
        assert r.status_code == 200, r.text


def _sendable(text: str) -> bool:
    """Not refused for control characters (a few of the bundled sentences have them: 422, as documented)."""
    return not any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text)


def _send_texts(server, texts: list[str]) -> None:
    for i in range(0, len(texts), ITEMS):
        r = requests.post(server.url + "/sentiment", json={"texts": texts[i : i + ITEMS]}, headers=KEY, timeout=60)
        assert r.status_code == 200, r.text


def test_image_drift_quiet_on_the_fixture_data_and_fires_on_inverted_images(image_drift_server):
    """Fashion-MNIST images the fixture never trained on (uploaded as the 28 x 28 files they are) keep every PSI
    under the threshold; the same images inverted push brightness (and the predicted-class mix) over it,
    while contrast, size and aspect, which inversion keeps, stay under."""
    from servable.idx import read_idx

    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[1000 : 1000 + WINDOW * ITEMS]
    assert _psi(image_drift_server) == {}  # nothing before a window is full
    _send_images(image_drift_server, images)
    quiet = _psi(image_drift_server)
    assert set(quiet) == IMAGE_FEATURES, quiet
    assert all(v < THRESHOLD for v in quiet.values()), quiet
    metrics = requests.get(image_drift_server.url + "/metrics", timeout=10).text  # the alert's threshold
    assert re.search(rf"^servable_drift_psi_alert{{[^}}]*}} {THRESHOLD}$", metrics, re.M), metrics[-2000:]
    _send_images(image_drift_server, 255 - images)
    shifted = _psi(image_drift_server)
    assert shifted["brightness"] > THRESHOLD, shifted
    assert all(shifted[f] < THRESHOLD for f in ("contrast", "pixels", "aspect")), shifted


def test_text_drift_quiet_on_the_fixture_data_and_fires_on_unseen_domains(text_drift_server, text_run):
    """Review sentences the fixture never trained on keep every PSI under the threshold; long random-word texts
    push length over it (their words are the training texts', so the unknown-token share stays under), and
    short texts in a script the tokenizer does not know (runes) push the unknown-token share over it."""
    held = [t for t, _ in text_run.splits.val + text_run.splits.test if _sendable(t)]
    texts = [held[i % len(held)] for i in range(WINDOW * ITEMS)]
    assert _psi(text_drift_server) == {}
    _send_texts(text_drift_server, texts)
    quiet = _psi(text_drift_server)
    assert set(quiet) == TEXT_FEATURES, quiet
    assert all(v < THRESHOLD for v in quiet.values()), quiet

    rng = random.Random(0)
    words = sorted({w for t, _ in text_run.splits.train if _sendable(t) for w in t.split()})
    long_texts = [" ".join(rng.choices(words, k=rng.randint(150, 300))) for _ in range(WINDOW * ITEMS)]
    _send_texts(text_drift_server, [t[:4000] for t in long_texts])
    shifted = _psi(text_drift_server)
    assert shifted["length"] > THRESHOLD and shifted["oov"] < THRESHOLD, shifted

    runes = [chr(c) for c in range(0x16A0, 0x16EB)]
    runic = [" ".join("".join(rng.choices(runes, k=rng.randint(3, 7))) for _ in range(rng.randint(4, 10)))
             for _ in range(WINDOW * ITEMS)]  # fmt: skip
    _send_texts(text_drift_server, runic)
    assert _psi(text_drift_server)["oov"] > THRESHOLD


def test_no_reference_no_drift_export(image_run, tmp_path, tmp_path_factory):
    """An artifact registered without a reference (as before drift) is served as before, and its replica
    exports no drift gauge, even with a window of one request."""
    import shutil

    from servable import artifact

    staging = tmp_path / "no-drift"
    shutil.copytree(image_run.staging, staging)
    (staging / artifact.MANIFEST).unlink(missing_ok=True)
    manifest = artifact.load(image_run.tag).manifest
    tag = artifact.register(manifest.model_copy(update={"version": "t1-nodrift", "drift_reference": None}), staging)
    server = _drift_server("image", tag, tmp_path_factory, window=1)
    try:
        _send_images(server, image_run.splits.test_x[:4])
        assert _psi(server) == {}
        assert "servable_drift_psi{" not in requests.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
