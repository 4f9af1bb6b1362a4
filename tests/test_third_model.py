"""A third model, added the way docs/adding-a-model.md says, served next to the other two.

The fixture (tests/fixtures/tabular/) is a house-price regressor over four numeric features: a new
input type (tabular rows) and a new task (regression, `serving/heads.py::RegressorHead`), with no
change to the serving core. It is served by a real BentoML server beside the image and text
services and called over REST, V2 (`tritonclient`), `/info` and `/metrics`; a real Prometheus
scrapes it with the rules and the dashboard queries `deploy/render.py` generates once its entry is
in SERVED_MODELS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException

from deploy import launch, render
from servable.config import SERVED_MODELS
from tests.conftest import API_KEY
from tests.fixtures.tabular import build
from tests.fixtures.tabular.config import ENTRY
from tests.polling import wait_for

KEY = {"x-api-key": API_KEY}
ROWS = np.array([[1500, 3, 30, 10], [2400, 4, 5, 2], [800, 1, 80, 25]], np.float64)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tabular_server(tmp_path_factory):
    tag = build.register()
    env = {f"{ENTRY.env_prefix}MODEL_TAG": tag, "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}",
           f"{ENTRY.env_prefix}WORKERS": "1"}  # fmt: skip
    log = tmp_path_factory.mktemp("tabular-server") / "server.log"
    server = launch.start_ready(ENTRY.service, env, log_path=log, cwd=ROOT)
    yield server
    server.stop()


def _rest(server, rows) -> requests.Response:
    return requests.post(server.url + ENTRY.route, json={"rows": rows}, headers=KEY, timeout=30)


def test_rest_answers_next_to_the_other_two_models(tabular_server, image_server, text_server):
    r = _rest(tabular_server, ROWS.tolist())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"].startswith("house-price:") and body["variant"] == "fp32"
    want = build.expected(ROWS)
    got = np.array([[p["value"], *p["interval"]] for p in body["predictions"]])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert {p["name"] for p in body["predictions"]} == {"price"}
    # the other two services answer beside it, unchanged
    assert requests.get(image_server.url + "/readyz", timeout=5).status_code == 200
    text = requests.post(text_server.url + "/sentiment", json={"text": "fine"}, headers=KEY, timeout=30)
    assert text.status_code == 200 and text.json()["predictions"][0]["label"] in ("negative", "positive")


@pytest.mark.parametrize(
    ("rows", "reason"),
    [([], "no_rows"), ([[1, 2, 3]], "wrong_shape"), ([[1, 2, 3, "x"]], "invalid_field"),
     ([[1, 2, 3, True]], "invalid_field"), ([[1, 2, 3, 1e300]], "out_of_range"), ("rows", "invalid_field")],
)  # fmt: skip
def test_bad_rows_get_json_4xx(tabular_server, rows, reason):
    r = _rest(tabular_server, rows)
    assert 400 <= r.status_code < 500 and r.json()["reason"] == reason, r.text


def test_v2_through_tritonclient(tabular_server):
    c = triton.InferenceServerClient(tabular_server.url.removeprefix("http://"), network_timeout=60.0)
    meta = c.get_model_metadata("house-price", headers=dict(KEY))
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1]},
                               {"name": "interval", "datatype": "FP32", "shape": [-1, 2]}]  # fmt: skip
    assert meta["parameters"]["preprocessing"]["features"] == build.FEATURES
    want = build.expected(ROWS)
    for binary in (True, False):
        inp = triton.InferInput("features", list(ROWS.shape), "FP32")
        inp.set_data_from_numpy(ROWS.astype(np.float32), binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("value", "interval")]
        result = c.infer("house-price", [inp], outputs=outputs, headers=dict(KEY))
        np.testing.assert_allclose(result.as_numpy("value"), want[:, 0], rtol=1e-5)
        np.testing.assert_allclose(result.as_numpy("interval"), want[:, 1:], rtol=1e-5)
    # the declared shape is checked before anything else: a wrong rank or feature count is the client's error
    for shape in ([3, 5], [3, 4, 1], [3] * 50_000):
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": shape, "data": [0.0]}]}
        r = requests.post(f"{tabular_server.url}/v2/models/house-price/infer", json=body, headers=KEY, timeout=30)
        assert r.status_code == 422 and r.json()["reason"] == "wrong_shape", r.text
    with pytest.raises(InferenceServerException) as err:
        c.infer("house-price", [triton.InferInput("pixels", [1, 4], "FP32").set_data_from_numpy(
            np.zeros((1, 4), np.float32))], headers=dict(KEY))  # fmt: skip
    assert err.value.status() == "422"
    c.close()


def test_info_and_metrics(tabular_server):
    info = requests.get(tabular_server.url + "/info", headers=KEY, timeout=10).json()
    assert info["ready"], info
    assert info["task"] == "tabular-regression" and info["head"] == "RegressorHead"
    assert info["service"] == ENTRY.service_name and info["preprocessing"]["features"] == build.FEATURES
    assert info["provider"] == "CPUExecutionProvider"
    _rest(tabular_server, ROWS.tolist())
    metrics = requests.get(tabular_server.url + "/metrics", timeout=10).text
    version = info["version"]  # every metric about the model carries its version (a canary's stand apart)
    assert f'servable_predictions_total{{label="value",model="house-price",version="{version}"}}' in metrics
    assert f'servable_regression_value_count{{model="house-price",version="{version}"}}' in metrics
    assert f'service_name="{ENTRY.service_name}"' in metrics and f'endpoint="{ENTRY.route}"' in metrics


def _prometheus_query(url: str, expr: str) -> list[dict]:
    r = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_generated_rules_and_dashboard_see_the_new_model(tabular_server, monkeypatch, tmp_path):
    """Its entry in SERVED_MODELS is all the monitoring needs: a real Prometheus scraping the server with
    the rules rendered from that list records its request rate, error ratio and p99, and every dashboard
    query on BentoML's request metrics has a series for its route."""
    monkeypatch.setitem(SERVED_MODELS, ENTRY.kind, ENTRY)
    prometheus = shutil.which("prometheus") or "/usr/bin/prometheus"
    rules = tmp_path / "rules.yml"
    rules.write_text(render.GENERATED[render.RULES_YML]())
    subprocess.run([shutil.which("promtool") or "promtool", "check", "rules", str(rules)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    port = launch.free_port()
    target = {"targets": [tabular_server.url.removeprefix("http://")]}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": f"servable-{ENTRY.kind}", "static_configs": [target]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # traffic while the rate windows fill
            _rest(tabular_server, ROWS.tolist())
            if _prometheus_query(url, 'servable:requests:rate1m{endpoint="/regress"}') if _ready(url) else False:
                break
            time.sleep(0.5)
        found = wait_for(lambda: _prometheus_query(url, 'servable:latency_seconds:p99_1m{endpoint="/regress"}'), 20)
        assert found, (tmp_path / "prometheus.log").read_text()[-2000:]
        rate = _prometheus_query(url, 'servable:requests:rate1m{endpoint="/regress"}')
        assert rate and float(rate[0]["value"][1]) > 0 and rate[0]["metric"]["job"] == "servable-tabular"
        assert _prometheus_query(url, 'servable:errors5xx:ratio_rate1m{job="servable-tabular"}')
        panels = json.loads(render.dashboard_text())["panels"]
        exprs = [t["expr"] for p in panels for t in p["targets"] if "bentoml_service_request" in t["expr"]]
        assert exprs
        for expr in exprs:
            assert _prometheus_query(url, f"count by (endpoint) ({expr})"), expr
    finally:
        proc.terminate()
        proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
