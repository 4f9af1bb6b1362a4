"""Shadow scoring (serving/shadow.py): a candidate version scores sampled live rows off the request path.

Real BentoML servers on 127.0.0.1 with the suite's fixture models: the image classifier of
tests/conftest.py (its t1, and t1's files registered again as t2 with two labels swapped, so that
some answers disagree and some agree), and the house-price regressor of tests/fixtures/tabular
(t1, and candidates built with another bias, slower runs or a fifth feature).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deploy import launch, render
from servable import artifact
from servable.config import FeedbackSettings, ImageServeSettings
from serving.feedback.store import FeedbackStore
from serving.heads import ClassifierHead, RegressorHead
from tests.conftest import API_KEY, _serve
from tests.fixtures.tabular import build
from tests.fixtures.tabular.config import ENTRY as TABULAR
from tests.polling import wait_for

KEY = {"x-api-key": API_KEY}
OPT_IN = {**KEY, "x-servable-feedback": "opt-in"}
ROOT = Path(__file__).resolve().parents[1]
ROWS = [[1500, 3, 30, 10], [2400, 4, 5, 2], [800, 1, 80, 25]]  # live values about 300k, 482k and 115k


def _metrics(server) -> list:
    """Every sample of the server's /metrics."""
    text = requests.get(server.url + "/metrics", timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def _register_swapped(tag: str, version: str) -> tuple[str, list[str]]:
    """`tag`'s files registered again (new manifest, checksums) as `version` with its first two labels swapped:
    the same scores, another answer for rows whose top label is one of those two."""
    art = artifact.load(tag)
    labels = list(art.manifest.labels)
    labels[0], labels[1] = labels[1], labels[0]
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        for rel in art.manifest.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(art.file(rel).read_bytes())
        manifest = art.manifest.model_copy(update={"version": version, "labels": labels, "files": {}})
        return artifact.register(manifest, staging), labels


def _png(image_run, i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_run.splits.test_x[i][:, :, 0])).save(buf, "PNG")
    return buf.getvalue()


def _tabular(env: dict[str, str], tmp_path_factory, ready: bool = True) -> launch.Server:
    env = {f"{TABULAR.env_prefix}MODEL_TAG": build.register(), f"{TABULAR.env_prefix}WORKERS": "1",
           "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}", **env}  # fmt: skip
    log = tmp_path_factory.mktemp("tabular-shadow") / "server.log"
    start = launch.start_ready if ready else launch.start
    return start(TABULAR.service, env, log_path=log, cwd=ROOT)


# ---------------------------------------------------------------- the head's comparison, the settings


def test_heads_compare_by_their_own_answer():
    live = ClassifierHead(["a", "b", "c"])
    reordered = ClassifierHead(["c", "a", "b"])  # the same model, its labels in another order
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    same = live.compare(p, reordered, p[:, [2, 0, 1]], 0.0)
    assert same.agreed.all() and same.abs_diff == pytest.approx(0) and same.pairs == [("a", "a"), ("c", "c")]
    other = live.compare(p, live, p[:, [1, 0, 2]], 0.0)  # a and b swapped
    assert other.agreed.tolist() == [False, True] and other.pairs == [("a", "b"), ("c", "c")]
    assert other.abs_diff == pytest.approx((0.5 + 0.5 + 0.2 + 0.2) / 6)
    reg = RegressorHead(["price"], interval=True)
    values = np.array([[100.0, 90, 110], [1000.0, 900, 1100]], np.float32)
    found = reg.compare(values, reg, values + np.float32(6), 0.05)  # 6 is 6 % of 100, 0.6 % of 1000
    assert found.agreed.tolist() == [False, True] and found.abs_diff == pytest.approx(6) and found.pairs == []


def test_shadow_settings_refused_where_they_cannot_work():
    assert not ImageServeSettings(shadow_tag="fashion-cnn:t2").shadow_on()  # a tag alone: off (share 0)
    with pytest.raises(ValueError, match="needs shadow_tag"):
        ImageServeSettings(shadow_share=0.1)
    with pytest.raises(ValueError, match="in-process topology only"):
        ImageServeSettings(shadow_tag="fashion-cnn:t2", shadow_share=0.1, topology="split")


# ---------------------------------------------------------------- off: nothing changes


def test_shadow_off_leaves_predict_as_it_is_and_counts_nothing(image_server, image_run):
    """Share 0 (the default): the replica's predict is the class's own method (no wrapper, no sampling draw),
    and no shadow series exists on a served replica after traffic."""
    from serving.adapters.image import ImageAdapter
    from serving.model_service import Replica

    replica = Replica(ImageAdapter, ImageServeSettings(model_tag=image_run.tag, shadow_tag=image_run.tag,
                                                       warmup_batches=[1]))  # fmt: skip
    try:
        assert replica.ready and replica.shadow is None and "predict" not in vars(replica)
    finally:
        replica.stop()
    files = [("image", (f"{i}.png", _png(image_run, i), "image/png")) for i in range(2)]
    for _ in range(3):
        assert requests.post(image_server.url + "/classify", files=files, headers=OPT_IN, timeout=60).ok
    assert not [s for s in _metrics(image_server) if s.name.startswith("servable_shadow_")]


# ---------------------------------------------------------------- on: classifier and regressor


@pytest.fixture(scope="module")
def image_shadow(image_run, tmp_path_factory):
    """The image model t1 with candidate t2 at share 1.0, one worker, the feedback loop on for the test key
    (confidence threshold 0: only shadow disagreements are queued)."""
    tag, swapped = _register_swapped(image_run.tag, "t2")
    queue_dir = tmp_path_factory.mktemp("shadow-feedback")
    server = _serve("image", image_run.tag, tmp_path_factory, {
        "SERVABLE_IMAGE_SERVE_SHADOW_TAG": tag, "SERVABLE_IMAGE_SERVE_SHADOW_SHARE": "1.0",
        "SERVABLE_IMAGE_SERVE_WORKERS": "1", "SERVABLE_FEEDBACK_ENABLED": "true",
        "SERVABLE_FEEDBACK_DIR": str(queue_dir), "SERVABLE_FEEDBACK_FLAG_KEYS": "tester",
        "SERVABLE_FEEDBACK_CONFIDENCE_THRESHOLD": "0",
    })  # fmt: skip
    yield server, tag, swapped, queue_dir
    server.stop()


def test_classifier_shadow_scores_every_row_and_never_changes_answers(image_run, image_server, image_shadow):
    """Share 1.0, candidate t2 (t1 with two labels swapped): every row scored; agreed = rows whose live label
    is not a swapped one; the confusion holds each live label against its candidate label; a disagreement is
    queued for labelling (reason shadow-disagree) for the opted-in caller; the answers are the shadow-off
    server's, byte for byte. (The module's first test on this server: it counts from zero.)"""
    server, tag, swapped, queue_dir = image_shadow
    live_labels = artifact.load(image_run.tag).manifest.labels
    got: list[str] = []
    test_y = image_run.splits.test_y
    # trousers (label 1, swapped) and others, two per request
    picked = [i for i in range(len(test_y)) if int(test_y[i]) == 1][:6] + [
        i for i in range(len(test_y)) if int(test_y[i]) not in (0, 1)][:6]  # fmt: skip
    for a, b in zip(picked[::2], picked[1::2], strict=True):
        files = [("image", (f"{i}.png", _png(image_run, i), "image/png")) for i in (a, b)]
        on = requests.post(server.url + "/classify", files=files, headers=OPT_IN, timeout=60)
        off = requests.post(image_server.url + "/classify", files=files, headers=OPT_IN, timeout=60)
        assert on.status_code == off.status_code == 200, on.text
        assert on.json() == off.json()
        got += [p["label"] for p in on.json()["predictions"]]
    rows = len(got)
    labels = {"model": "fashion-cnn", "version": "t1", "candidate": "t2"}
    done = wait_for(lambda: _total(_metrics(server), "servable_shadow_scored_total", **labels) == rows, 60)
    samples = _metrics(server)
    assert done, [s for s in samples if s.name.startswith("servable_shadow")]
    swap = dict(zip(live_labels, swapped, strict=True))
    disagree = sum(swap[lab] != lab for lab in got)
    assert 0 < disagree < rows, got  # both outcomes happen, else the test proves less
    assert _total(samples, "servable_shadow_agreed_total", **labels) == rows - disagree
    assert _total(samples, "servable_shadow_dropped_total", **labels) == 0
    assert _total(samples, "servable_shadow_abs_diff_count", **labels) == len(picked) // 2
    assert _total(samples, "servable_shadow_latency_seconds_count", **labels) >= 1
    for lab in set(got):
        n = _total(samples, "servable_shadow_confusion_total", **labels, live_label=lab, candidate_label=swap[lab])
        assert n == got.count(lab), lab
    assert _total(samples, "servable_shadow_confusion_total", **labels) == rows
    assert not [s for s in samples if s.name == "servable_model_info" and s.labels["tag"] == tag]  # not served
    store = FeedbackStore(FeedbackSettings(dir=queue_dir))
    assert wait_for(lambda: len(store.items("fashion-cnn")) >= disagree, 30)
    items = [i.meta for i in store.items("fashion-cnn")]
    assert sorted(m["predicted_label"] for m in items) == sorted(lab for lab in got if swap[lab] != lab)
    assert {m["reason"] for m in items} == {"shadow-disagree"}


def _prometheus(tmp_path: Path, target: str, job: str) -> tuple[subprocess.Popen, str]:
    """A real Prometheus scraping `target` every second as `job`, with the rules deploy/render.py generates."""
    rules = tmp_path / "rules.yml"
    rules.write_text(render.GENERATED[render.RULES_YML]())
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = launch.free_port()
    cmd = [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
           f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _query(url: str, expr: str) -> list[dict]:
    try:
        r = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    except requests.ConnectionError:
        return []  # not listening yet
    assert r.status_code == 200, (expr, r.text)
    return r.json()["data"]["result"]


def test_shadow_rules_alert_and_dashboard_read_a_shadowing_replica(image_run, image_shadow, tmp_path):
    """The generated agreement rule, the alert's signal and every shadow panel of the dashboard return data from
    a real Prometheus scraping the shadowing replica (the local stack runs no shadow); the agreement is the
    ratio of the replica's own counters."""
    server = image_shadow[0]
    shadow_exprs = [e for e in render.dashboard_exprs() if "servable_shadow" in e or "servable:shadow" in e]
    alert = "servable:shadow_agreement:ratio_rate5m"
    rules = render.GENERATED[render.RULES_YML]()
    assert len(shadow_exprs) >= 6 and f"expr: {alert} < " in rules
    proc, url = _prometheus(tmp_path, server.url.removeprefix("http://"), "servable-image")
    files = [("image", (f"{i}.png", _png(image_run, i), "image/png")) for i in range(4)]
    try:
        missing, deadline = [alert, *shadow_exprs], time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            assert requests.post(server.url + "/classify", files=files, headers=KEY, timeout=60).ok
            time.sleep(0.5)
            missing = [e for e in missing if not _query(url, e)]
        assert not missing, (missing, (tmp_path / "prometheus.log").read_text()[-2000:])
        (ratio,) = _query(url, alert)
        # per job too: deploy/release.py's canary check selects the model's job
        want = {"__name__": alert, "job": "servable-image", "model": "fashion-cnn", "version": "t1", "candidate": "t2"}
        assert ratio["metric"] == want
        assert 0 <= float(ratio["value"][1]) <= 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_regressor_shadow_reports_the_candidates_error(tmp_path_factory):
    """Candidate t2 = t1 with a bias 6,000 higher: every request's mean absolute difference is 6,000 (the
    regressor's error), a row agrees when that is within 5 % of its live value (not for the 115k house), and
    the answers are the shadow-off server's."""
    candidate = build.register("t2", bias=build.BIAS + 6000)
    shadow = _tabular({f"{TABULAR.env_prefix}SHADOW_TAG": candidate, f"{TABULAR.env_prefix}SHADOW_SHARE": "1"},
                      tmp_path_factory)  # fmt: skip
    off = _tabular({}, tmp_path_factory)
    try:
        n = 5
        for _ in range(n):
            on = requests.post(shadow.url + TABULAR.route, json={"rows": ROWS}, headers=KEY, timeout=30)
            assert on.status_code == 200 and on.json() == requests.post(
                off.url + TABULAR.route, json={"rows": ROWS}, headers=KEY, timeout=30).json()  # fmt: skip
        labels = {"model": "house-price", "version": "t1", "candidate": "t2"}
        assert wait_for(lambda: _total(_metrics(shadow), "servable_shadow_scored_total", **labels) == n * len(ROWS), 30)
        samples = _metrics(shadow)
        live = build.expected(np.array(ROWS, np.float64))[:, 0]
        assert _total(samples, "servable_shadow_agreed_total", **labels) == n * int((0.05 * live >= 6000).sum()) == 10
        assert _total(samples, "servable_shadow_abs_diff_count", **labels) == n
        assert _total(samples, "servable_shadow_abs_diff_sum", **labels) == pytest.approx(n * 6000, rel=1e-4)
        assert not [s for s in samples if s.name == "servable_shadow_confusion_total"]  # a regressor has no labels
    finally:
        shadow.stop()
        off.stop()


def test_full_shadow_queue_drops_and_counts_without_slowing_answers(tmp_path_factory):
    """A candidate whose every run takes about 0.2 s and a queue of one request: under 6 concurrent callers
    most sampled rows are dropped and counted (scored + dropped = rows sent), and the answers come back
    faster than one candidate run: no answer waited for the candidate."""
    candidate = build.register("t3", slow_layers=250)
    server = _tabular({f"{TABULAR.env_prefix}SHADOW_TAG": candidate, f"{TABULAR.env_prefix}SHADOW_SHARE": "1",
                       f"{TABULAR.env_prefix}SHADOW_QUEUE": "1"}, tmp_path_factory)  # fmt: skip
    try:
        session = requests.Session()

        def call(_: int) -> float:
            start = time.perf_counter()
            r = session.post(server.url + TABULAR.route, json={"rows": ROWS[:1]}, headers=KEY, timeout=30)
            assert r.status_code == 200, r.text
            return time.perf_counter() - start

        sent = 120
        with cf.ThreadPoolExecutor(6) as pool:
            took = sorted(pool.map(call, range(sent)))
        labels = {"model": "house-price", "version": "t1", "candidate": "t3"}

        def accounted() -> bool:
            s = _metrics(server)
            return _total(s, "servable_shadow_scored_total", **labels) + _total(
                s, "servable_shadow_dropped_total", **labels) == sent  # fmt: skip

        assert wait_for(accounted, 60)
        samples = _metrics(server)
        dropped = _total(samples, "servable_shadow_dropped_total", **labels)
        run_s = _total(samples, "servable_shadow_latency_seconds_sum", **labels) / _total(
            samples, "servable_shadow_latency_seconds_count", **labels)  # fmt: skip
        assert dropped >= sent / 2, dropped
        assert _total(samples, "servable_shadow_agreed_total", **labels) == sent - dropped  # same answers as t1
        assert took[int(0.9 * sent)] < run_s, (took[int(0.9 * sent)], run_s)  # p90 answer < one candidate run
    finally:
        server.stop()


# ---------------------------------------------------------------- refusals at start


def test_candidate_with_other_inputs_keeps_the_replica_unready(tmp_path_factory):
    """A candidate declaring five features beside the four-feature live model: the replica never becomes ready,
    its /info and the prediction's 503 say why; a shadow in the split topology stops the server at start."""
    candidate = build.register("t5", n_features=5)
    server = _tabular({f"{TABULAR.env_prefix}SHADOW_TAG": candidate, f"{TABULAR.env_prefix}SHADOW_SHARE": "0.5"},
                      tmp_path_factory, ready=False)  # fmt: skip
    try:

        def refused() -> dict:
            status, body = launch.get(server.url + "/info", KEY)
            return info if status == 200 and "error" in (info := json.loads(body)) else {}

        info = wait_for(refused, 120)
        assert info and not info["ready"] and "declares other inputs" in info["error"], info
        assert "house-price:t5" in info["error"] and "house-price:t1" in info["error"]
        assert launch.get(server.url + "/readyz")[0] == 503
        r = requests.post(server.url + TABULAR.route, json={"rows": ROWS}, headers=KEY, timeout=30)
        assert r.status_code == 503 and "declares other inputs" in r.json()["error"], r.text
    finally:
        server.stop()
    split = _tabular({f"{TABULAR.env_prefix}SHADOW_TAG": build.register(), f"{TABULAR.env_prefix}SHADOW_SHARE": "1",
                      f"{TABULAR.env_prefix}TOPOLOGY": "split"}, tmp_path_factory, ready=False)  # fmt: skip
    try:
        assert wait_for(lambda: split.proc.poll() is not None, 120), "the split server with a shadow started"
        assert "shadow scoring runs in the in-process topology only" in split.log()
    finally:
        split.stop()
