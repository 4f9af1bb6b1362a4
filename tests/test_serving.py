"""The real services over HTTP: answers match in-process ONNX Runtime, batching, guards, metrics."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from servable.config import SERVED_MODELS
from servable.preprocessing import encode_texts, load_tokenizer, preprocess_image
from serving.heads import softmax
from tests.conftest import API_KEY, SECRET_SENTENCE
from tests.polling import wait_for
from training import onnx_tools

KEY = {"x-api-key": API_KEY}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_images(image_run, n=6) -> list[bytes]:
    # Real Fashion-MNIST test images at their stored resolution, as a client would send them.
    return [png(image_run.splits.test_x[i][:, :, 0]) for i in range(n)]


test_images.__test__ = False


def calibrated(logits: np.ndarray, run) -> np.ndarray:
    """What the served head answers: the softmax of the logits over the temperature stored in the artifact."""
    from servable import artifact

    return softmax(logits / artifact.load(run.tag).manifest.calibration.temperature)


def local_probs(image_run, blobs: list[bytes]) -> np.ndarray:
    prep = image_run.preprocessing
    sess = onnx_tools.cpu_session(image_run.staging / "model.onnx")
    x = np.stack([preprocess_image(b, prep) for b in blobs])
    return calibrated(sess.run(["logits"], {prep.input_name: x})[0], image_run)


def test_image_multipart_matches_in_process_onnx(image_server, image_run):
    blobs = test_images(image_run, 3)
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    r = requests.post(image_server.url + "/classify", files=files, data={"top_k": "3"}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == image_run.tag and len(body["predictions"]) == 3
    expected = local_probs(image_run, blobs)
    labels = image_run.splits.labels
    for pred, p in zip(body["predictions"], expected, strict=True):
        assert len(pred["top_k"]) == 3
        assert pred["label"] == labels[int(p.argmax())]
        assert pred["probability"] == pytest.approx(float(p.max()), abs=1e-4)


def test_image_base64_json_and_v2(image_server, image_run):
    blobs = test_images(image_run, 2)
    expected = local_probs(image_run, blobs)
    b64 = [base64.b64encode(b).decode() for b in blobs]
    r = requests.post(image_server.url + "/classify", json={"images": b64, "top_k": 1}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [image_run.splits.labels[i] for i in expected.argmax(1)]
    name = image_run.tag.split(":")[0]
    meta = requests.get(f"{image_server.url}/v2/models/{name}", headers=KEY, timeout=10).json()
    assert meta["name"] == name and meta["platform"] == "onnxruntime"
    v2 = {"id": "abc", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": b64}]}
    out = requests.post(f"{image_server.url}/v2/models/{name}/infer", json=v2, headers=KEY, timeout=30).json()
    assert out["id"] == "abc" and out["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 10), expected, atol=1e-4)
    prep = image_run.preprocessing
    pixels = np.stack([preprocess_image(b, prep) for b in blobs])
    v2 = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                      "data": pixels.ravel().tolist()}]}  # fmt: skip
    out = requests.post(f"{image_server.url}/v2/models/{name}/infer", json=v2, headers=KEY, timeout=30).json()
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 10), expected, atol=1e-4)


def test_text_endpoints_match_in_process_onnx(text_server, text_run):
    texts = [t for t, _ in text_run.splits.test[:5]] + ["ok", "word " * 200]
    r = requests.post(text_server.url + "/sentiment", json={"texts": texts}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    prep = text_run.preprocessing
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    sess = onnx_tools.cpu_session(text_run.staging / "model.onnx")
    expected = calibrated(sess.run(["logits"], encode_texts(tok, texts, prep))[0], text_run)
    got = np.array([[p["scores"][lab] for lab in text_run.splits.labels] for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    one = requests.post(text_server.url + "/sentiment", json={"text": texts[0]}, headers=KEY, timeout=30).json()
    assert one["predictions"][0]["scores"]["positive"] == pytest.approx(expected[0, 1], abs=1e-4)
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts[:2]}]}
    out = requests.post(text_server.url + "/v2/models/sentiment-bert/infer", json=v2, headers=KEY, timeout=30)
    np.testing.assert_allclose(np.array(out.json()["outputs"][0]["data"]).reshape(2, 2), expected[:2], atol=1e-4)


def _metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def served_text_probs(server, text_run, texts: list[str]) -> np.ndarray:
    """Each text's probabilities from in-process ONNX Runtime, alone, with the variant `server` serves."""
    from servable import artifact

    variant = requests.get(server.url + "/info", headers=KEY, timeout=30).json()["variant"]
    prep = text_run.preprocessing
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    sess = onnx_tools.cpu_session(artifact.load(text_run.tag).onnx_path(variant))
    return np.stack([calibrated(sess.run(["logits"], encode_texts(tok, [t], prep))[0], text_run)[0] for t in texts])


def test_concurrent_calls_are_batched_and_answered_to_the_right_caller(shipped_text_server, text_run):
    """16 concurrent callers against the service as shipped: each gets its own text's answer (the answers
    differ between callers, so a mix-up would show), and batches larger than one form."""
    server = shipped_text_server
    texts = [f"{t} ({i})" for i, (t, _) in enumerate(text_run.splits.test[:32])]
    expected = served_text_probs(server, text_run, texts)[:, 1]
    assert len({round(float(e), 3) for e in expected}) >= len(texts) // 2, "callers' answers must differ"
    runs_before = _metric(server, "servable_batch_size_count")
    items_before = _metric(server, "servable_batch_size_sum")

    def call(t):
        r = requests.post(server.url + "/sentiment", json={"text": t}, headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]["scores"]["positive"]

    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(call, texts))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # each caller got its own answer
    runs = _metric(server, "servable_batch_size_count") - runs_before
    items = _metric(server, "servable_batch_size_sum") - items_before
    # In-process (the CPU default) every text runs exactly once; with length buckets a batch may run
    # as several bucket batches, each observed.
    assert items == len(texts)
    assert runs < items, "no batch larger than one was formed under 16 concurrent callers"


@pytest.mark.parametrize(
    ("kwargs", "status", "reason"),
    [
        ({"data": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
        ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": [("image", ("x.png", b"", "image/png"))]}, 400, "empty"),
        ({"files": [("image", ("x.png", b"not an image at all", "image/png"))]}, 415, "unsupported_format"),
        ({"files": [("image", ("x.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 50, "image/jpeg"))]}, 400, None),
        ({"json": {"images": ["%%%"]}}, 400, "invalid_base64"),
        ({"json": {"images": "abc"}}, 422, "invalid_field"),
        ({"json": [1, 2]}, 422, "invalid_field"),
        ({"json": {"images": []}}, 400, "no_image"),
        ({"json": {"images": ["aGk="] * 9}}, 413, "too_many_items"),
        ({"json": {"image": "aGk=", "top_k": "many"}}, 422, "invalid_field"),
        # top_k is an integer option with bounds (serving/io_spec.py::Option): never int(inf) on the event loop
        *[
            (
                {"data": b'{"image": "aGk=", "top_k": ' + v + b"}", "headers": {"content-type": "application/json"}},
                422,
                "invalid_field",
            )
            for v in (b"Infinity", b"-Infinity", b"NaN", b"1e400", b"2.5", b"true", b"0", b'"9' + b"9" * 40 + b'"')
        ],
        ({"data": b"{" * 100 + b"}" * 100, "headers": {"content-type": "application/json"}}, 400, "too_deep"),
        ({"data": b'{"image": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "not_utf8"),
        ({"data": b'{"image": ', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"data": b"--x\r\nnot a part", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_multipart"),
        ({"files": [("image", (f"{i}.png", b"x", "image/png")) for i in range(10)]}, 400, "invalid_multipart"),
    ],
)
def test_bad_image_requests_get_json_4xx(image_server, image_run, kwargs, status, reason):
    headers = {**KEY, **kwargs.pop("headers", {})}
    r = requests.post(image_server.url + "/classify", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]
    if reason:
        assert r.json()["reason"] == reason


def test_image_limits_bombs_and_truncation(image_server, image_run):
    from tests.test_preprocessing import _bomb_png

    good = test_images(image_run, 1)[0]
    cases = [
        (_bomb_png(30000, 30000), 413, "too_many_pixels"),
        (good[: len(good) // 2], 400, "corrupt"),
        (b"\x00" * (9 * 1024 * 1024), 413, "body_too_large"),
    ]
    for blob, status, reason in cases:
        r = requests.post(image_server.url + "/classify", files={"image": ("x.png", blob)}, headers=KEY, timeout=30)
        assert (r.status_code, r.json()["reason"]) == (status, reason)
    # and it still serves
    r = requests.post(image_server.url + "/classify", files={"image": ("x.png", good)}, headers=KEY, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"text": ""}, 422, "empty_text"),
        ({"text": "   "}, 422, "empty_text"),
        ({"text": 5}, 422, "invalid_field"),
        ({"texts": "not a list"}, 422, "invalid_field"),
        ({"texts": []}, 422, "no_text"),
        ({"texts": ["a"] * 9}, 413, "too_many_items"),
        ({"text": "x" * 5001}, 413, "text_too_long"),
        ({"text": "bell \x07 and nul \x00"}, 422, "control_characters"),
        ({"text": "a", "texts": ["b"]}, 422, "invalid_field"),
        ({}, 422, "invalid_field"),
    ],
)
def test_bad_text_requests_get_json_4xx(text_server, body, status, reason):
    r = requests.post(text_server.url + "/sentiment", json=body, headers=KEY, timeout=30)
    assert (r.status_code, r.json().get("reason")) == (status, reason), r.text


def test_v2_errors(text_server, image_server, image_run):
    name = image_run.tag.split(":")[0]
    size = image_run.preprocessing.size
    pixels = [0.0] * (3 * size * size)
    bad = [
        (text_server, "/v2/models/nope/infer", {"inputs": []}, 404, "unknown_model"),
        (text_server, "/v2/models/sentiment-bert/infer", {"inputs": []}, 422, "invalid_v2"),
        (text_server, "/v2/models/sentiment-bert/infer",
         {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["x"]}]}, 422, "wrong_datatype"),
        (text_server, "/v2/models/sentiment-bert/infer",
         {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}, 422, "wrong_shape"),
        (text_server, "/v2/models/sentiment-bert/infer",
         {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}, 422, "invalid_unicode"),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 5, 5], "data": [0.0] * 75}]}, 422,
         "wrong_shape"),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}, 422, "wrong_shape"),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [1]}]}, 422, "unknown_input"),
        (image_server, f"/v2/models/{name}/infer",  # sent as JSON Infinity: a tensor no model should see
         {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, size, size],
                      "data": [float("inf"), *pixels[1:]]}]}, 422, "non_finite"),
    ]  # fmt: skip
    for server, path, body, status, reason in bad:
        # json.dumps writes inf as Infinity, which Python's parser (the server's) reads back as inf
        r = requests.post(server.url + path, data=json.dumps(body), headers={**KEY, "content-type": "application/json"},
                          timeout=30)  # fmt: skip
        assert (r.status_code, r.json().get("reason")) == (status, reason), (path, body if len(str(body)) < 300 else
                                                                               "...", r.text)  # fmt: skip
        assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


def test_unknown_routes_and_methods_answer_json(image_server, text_server):
    """Routing errors too are JSON with a reason (serving/errors.py::JsonRouterErrors), never an HTML page."""
    for server, route in ((image_server, "/classify"), (text_server, "/sentiment")):
        for method, path, status, reason in (("GET", "/nowhere", 404, "not_found"),
                                             ("GET", route, 405, "method_not_allowed"),
                                             ("DELETE", "/info", 405, "method_not_allowed")):  # fmt: skip
            r = requests.request(method, server.url + path, headers=KEY, timeout=10)
            assert (r.status_code, r.json()["reason"]) == (status, reason), (method, path, r.text)
            assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


def test_auth_and_open_endpoints(image_server, text_server):
    for server, path in ((image_server, "/classify"), (text_server, "/sentiment"), (text_server, "/info")):
        assert requests.post(server.url + path, json={"text": "x"}, timeout=10).status_code in (401, 405)
        r = requests.post(server.url + path, json={"text": "x"}, headers={"x-api-key": "wrong-key-000"}, timeout=10)
        assert r.status_code in (401, 405)
    r = requests.post(text_server.url + "/sentiment", json={"text": "fine"}, timeout=10)
    assert r.status_code == 401 and r.json()["reason"] == "unauthenticated"
    r = requests.post(text_server.url + "/sentiment", json={"text": "fine"}, timeout=10,
                      headers={"authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert r.status_code == 200
    for path in ("/readyz", "/livez", "/v2/health/live", "/v2/health/ready", "/metrics", "/docs.json"):
        assert requests.get(text_server.url + path, timeout=10).status_code == 200, path


def test_info_and_openapi(image_server, text_server, image_run):
    info = requests.get(image_server.url + "/info", headers=KEY, timeout=10).json()
    assert info["model_tag"] == image_run.tag and info["labels"] == image_run.splits.labels
    # the provider ONNX Runtime says it uses, never assumed: on a machine without an NVIDIA device it is CPU
    # even though onnxruntime-gpu asked for CUDA first (test_device_auto_reports_..._logs_a_fallback_once)
    from servable.config import gpu_present

    assert info["provider"] == info["providers"][0]
    if not gpu_present():
        assert info["provider"] == "CPUExecutionProvider"
    assert info["quantized"] is False and info["variants_available"] == ["fp32", "int8"]
    spec = requests.get(text_server.url + "/docs.json", timeout=10).json()
    assert {"/sentiment", "/info", "/v2/models/{name}/infer", "/v2/health/ready"} <= set(spec["paths"])
    assert "application/json" in spec["paths"]["/sentiment"]["post"]["requestBody"]["content"]


def test_the_stored_temperature_and_threshold_are_served_and_shown(image_server, text_server, image_run, text_run):
    """The head divides the logits by the artifact's temperature (fitted on validation at training), says per
    answer whether it is below the abstention threshold (REST and V2), and /info shows both."""
    from servable import artifact

    n, texts = 8, [t for t, _ in text_run.splits.test[:8]]  # the test servers take at most 8 items
    images = [base64.b64encode(b).decode() for b in test_images(image_run, n)]
    for server, run, route, body in (
        (image_server, image_run, "/classify", {"images": images}),
        (text_server, text_run, "/sentiment", {"texts": texts}),
    ):
        cal = artifact.load(run.tag).manifest.calibration
        assert cal.temperature != 1.0 and 0 < cal.abstain_below < 1 and cal.fitted_on == "validation"
        info = requests.get(server.url + "/info", headers=KEY, timeout=10).json()["calibration"]
        assert info == {"temperature": cal.temperature, "abstain_below": cal.abstain_below, "fitted_on": "validation"}
        preds = requests.post(server.url + route, json=body, headers=KEY, timeout=60).json()["predictions"]
        if run is image_run:  # the answers are the softmax of the logits over the stored temperature
            expected = local_probs(image_run, test_images(image_run, n))
        else:
            prep = text_run.preprocessing
            tok, sess = (
                load_tokenizer(text_run.staging / prep.tokenizer_file, prep),
                onnx_tools.cpu_session(text_run.staging / "model.onnx"),
            )
            expected = calibrated(sess.run(["logits"], encode_texts(tok, texts, prep))[0], text_run)
        assert [p["probability"] for p in preds] == pytest.approx(expected.max(1).tolist(), abs=1e-4)
        below = [p["probability"] < cal.abstain_below for p in preds]
        assert [p["below_threshold"] for p in preds] == below
        name = run.tag.split(":")[0]
        v2_input = {"name": "image" if "images" in body else "text", "datatype": "BYTES", "shape": [n],
                    "data": images if "images" in body else texts}  # fmt: skip
        v2 = requests.post(f"{server.url}/v2/models/{name}/infer", json={"inputs": [v2_input]}, headers=KEY,
                           timeout=60).json()  # fmt: skip
        flags = next(o for o in v2["outputs"] if o["name"] == "below_threshold")
        assert flags["datatype"] == "BOOL" and flags["data"] == below


def test_metrics_after_traffic(image_server, text_server):
    requests.post(text_server.url + "/sentiment", json={"text": "great"}, headers=KEY, timeout=30)
    requests.post(text_server.url + "/sentiment", json={"text": ""}, headers=KEY, timeout=30)
    text = requests.get(text_server.url + "/metrics", timeout=10).text
    for name in (
        "servable_preprocess_seconds_count",
        "servable_model_seconds_count",
        "servable_batch_size_count",
        "servable_confidence_count",
        "servable_predictions_total",
        "servable_rejected_total",
        "servable_model_call_seconds_count",
        "servable_padding_ratio_count",
        "bentoml_service_request_total",
    ):
        assert _metric(text_server, name) > 0, name
    assert re.search(r'servable_rejected_total\{[^}]*reason="empty_text"', text)
    provider = requests.get(text_server.url + "/info", headers=KEY, timeout=10).json()["provider"]
    served = re.findall(r'servable_model_info\{[^}]*provider="([^"]+)"[^}]*\} 1', text)
    assert served and set(served) == {provider}, (served, provider)  # the metric says what the session uses
    # The replica's capacity for ServableReplicaSaturated: every live HTTP worker's limit, summed (not one
    # worker's). Both workers must have loaded: poll until the sum stops short of nothing.
    settings = SERVED_MODELS["text"].settings()  # the test server's settings: its env sets no limit or workers
    want = settings.max_concurrency * settings.http_workers()
    limit = wait_for(lambda: _metric(text_server, "servable_concurrency_limit") == want, 60)
    assert limit, (_metric(text_server, "servable_concurrency_limit"), want)


def _server_timing(r: requests.Response) -> dict[str, float]:
    """The Server-Timing header's parts, in milliseconds."""
    parts = [p.strip().split(";dur=") for p in r.headers["server-timing"].split(",")]
    return {name: float(ms) for name, ms in parts}


def test_every_answer_says_where_its_time_went_and_the_metrics_agree(image_server, text_server, image_run):
    """Server-Timing (decode, queue, model, encode, total) and x-batch-size on REST and V2 answers, the parts
    within the total; each answer counted once in the queue-wait histogram; each batch released with a reason."""
    image = test_images(image_run, 1)[0]
    v2_text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["fine", "awful"]}]}
    calls = [
        (text_server, lambda: requests.post(text_server.url + "/sentiment", json={"texts": ["a", "b", "c"]},
                                            headers=KEY, timeout=30), 3),
        (text_server, lambda: requests.post(text_server.url + "/v2/models/sentiment-bert/infer", json=v2_text,
                                            headers=KEY, timeout=30), 2),
        (image_server, lambda: requests.post(image_server.url + "/classify", files={"image": ("x.png", image)},
                                             headers=KEY, timeout=30), 1),
    ]  # fmt: skip
    for server, call, items in calls:
        waits, releases = (_metric(server, f"servable_{m}") for m in ("queue_wait_seconds_count",
                                                                       "batch_releases_total"))  # fmt: skip
        r = call()
        assert r.status_code == 200, r.text
        parts = _server_timing(r)
        assert list(parts) == ["decode", "queue", "model", "encode", "total"], r.headers["server-timing"]
        assert all(ms >= 0 for ms in parts.values()) and parts["model"] > 0
        assert sum(ms for name, ms in parts.items() if name != "total") <= parts["total"] + 0.05, parts
        assert items <= int(r.headers["x-batch-size"]) <= 32  # its own items at least, at most max_batch_size
        assert _metric(server, "servable_queue_wait_seconds_count") == waits + 1
        assert _metric(server, "servable_batch_releases_total") >= releases + 1
    text = requests.get(text_server.url + "/metrics", timeout=10).text
    assert re.search(r'servable_batch_releases_total\{[^}]*reason="queue_empty"', text)
    # refusals carry no timing: the request never reached the model
    r = requests.post(text_server.url + "/sentiment", json={"text": ""}, headers=KEY, timeout=30)
    assert r.status_code == 422 and "server-timing" not in r.headers


@pytest.mark.parametrize("given", ["0", "-5", "abc", "1e3", "NaN", "99999999", "5" * 20, "1.5.5"])
def test_a_malformed_or_out_of_range_deadline_header_is_a_400(text_server, given):
    r = requests.post(text_server.url + "/sentiment", json={"text": "fine"}, timeout=30,
                      headers={**KEY, "x-request-deadline-ms": given})  # fmt: skip
    assert r.status_code == 400 and r.json()["reason"] == "bad_deadline", r.text


def test_every_batch_size_is_warmed_up_before_ready(image_server, text_server):
    """Each worker ran a batch of every size the batcher can form (1 to max_batch_size; for text also each
    length up to the maximum) before it reported ready, and said so in its log. (A replica answers /readyz
    from its first ready worker; a worker still warming up accepts no connection yet.)"""
    for server, other_shapes in ((image_server, 0), (text_server, 1)):
        info = requests.get(server.url + "/info", headers=KEY, timeout=30).json()
        sizes = info["batching"]["max_batch_size"] if info["batching"]["enabled"] else 1

        def warmed(server=server, workers=info["workers"], least=sizes + other_shapes) -> list[int]:
            # the workers' lines; an explanation process, started on first use, warms its chunk size only
            found = [int(n) for n in re.findall(r"warm-up: (\d+) shapes in [0-9.]+ s", server.log())]
            return found if sum(n >= least for n in found) >= workers else []

        assert wait_for(warmed, timeout_s=120), (sizes, server.log()[-2000:])


def test_secret_content_never_logged(text_server, image_server, image_run):
    """Runs alone as well as in the suite: it sends its own traffic to both servers (success, refusal)."""
    text, image = text_server.url + "/sentiment", image_server.url + "/classify"
    text_calls = [
        requests.post(text, json={"text": SECRET_SENTENCE}, headers=KEY, timeout=30),
        requests.post(text, json={"text": SECRET_SENTENCE + "\x00"}, headers=KEY, timeout=30),
    ]
    blob = test_images(image_run, 1)[0]
    image_calls = [
        requests.post(
            image,
            files={"image": (SECRET_SENTENCE + ".png", blob)},
            headers=KEY,
            timeout=30,
            data={"note": SECRET_SENTENCE},
        ),
        requests.post(image, json={"images": [SECRET_SENTENCE]}, headers=KEY, timeout=30),
    ]
    assert [c.status_code for c in text_calls + image_calls] == [200, 422, 200, 400]

    def request_ids(log: str) -> set[str]:
        return {json.loads(line)["request_id"] for line in log.splitlines() if line.startswith("{") and
                '"request_id"' in line}  # fmt: skip

    def logged(server, calls) -> tuple[set[str], str]:
        """The calls' request ids and the server's log once it holds them: a worker writes its access line once
        the answer is sent, so the last call's line may trail it."""
        ids = {c.headers["x-request-id"] for c in calls}
        wait_for(lambda: ids <= request_ids(server.log()), timeout_s=10)
        return ids, server.log()

    for server, calls in ((text_server, text_calls), (image_server, image_calls)):
        ids, log = logged(server, calls)
        assert ids <= request_ids(log)  # the JSON access log is there, a line per call ...
        assert "PURPLE-ELEPHANT" not in log and "X1234567" not in log  # ... without the content
        assert API_KEY not in log


def test_incoming_request_id_is_propagated_and_logged(text_server):
    """A caller's (or the proxy's) X-Request-ID comes back on the answer and in the access log line; an
    unusable one (too long) is replaced by a fresh id."""
    rid = "trace-7f3a9c2e-incoming"
    r = requests.post(text_server.url + "/sentiment", json={"text": "fine"}, headers={**KEY, "x-request-id": rid},
                      timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    bad = requests.post(text_server.url + "/sentiment", json={"text": ""}, timeout=30,
                        headers={**KEY, "x-request-id": "x" * 200})  # fmt: skip
    assert bad.status_code == 422 and len(bad.headers["x-request-id"]) == 32 != 200
    wait_for(lambda: rid in text_server.log(), timeout_s=10)
    lines = [json.loads(line) for line in text_server.log().splitlines() if rid in line]
    assert lines and lines[-1]["request_id"] == rid and lines[-1]["status"] == 200


def test_a_malformed_api_key_stops_the_server_at_start(tmp_path):
    """A real server started with a key under 8 characters exits (non-zero) before serving anything, and
    its log says what is wrong without printing the key; it never starts and fails each request instead."""
    import time

    from deploy import launch

    (Path(os.environ["BENTOML_HOME"]) / "models").mkdir(exist_ok=True)  # the store, empty when run alone
    server = launch.start(launch.SERVICES["image"], {"SERVABLE_AUTH_KEYS": f"ops:Zq7x,ci:{API_KEY}"},
                          log_path=tmp_path / "server.log")  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while server.proc.poll() is None and time.monotonic() < deadline:
            assert launch.get(server.url + "/livez")[0] != 200, "it started serving with a malformed key"
            time.sleep(0.5)
        assert server.proc.poll() not in (None, 0), server.log()[-3000:]
        assert "at least 8 characters" in server.log() and "Zq7x" not in server.log(), server.log()[-3000:]
    finally:
        server.stop()


def test_wrong_tag_keeps_replica_unready(tmp_path_factory, text_run):
    from deploy import launch

    server = launch.start(launch.SERVICES["text"], {"SERVABLE_TEXT_SERVE_MODEL_TAG": "sentiment-bert:nope",
                                                    "SERVABLE_AUTH_KEYS": f"t:{API_KEY}"})  # fmt: skip
    try:
        assert launch.wait_until(server, "/livez", 200, timeout_s=120)
        assert launch.get(server.url + "/readyz")[0] == 503
        assert launch.get(server.url + "/v2/health/ready")[0] == 503
        r = requests.post(server.url + "/sentiment", json={"text": "x"}, headers=KEY, timeout=10)
        assert r.status_code == 503 and "sentiment-bert:nope" in r.json()["error"]
        assert "NOT loaded" in server.log() and "sentiment-bert:nope" in server.log()
    finally:
        server.stop()


def test_sustained_concurrency_never_fails_a_call(shipped_text_server, text_run):
    """Thousands of calls from 16 clients all succeed: BentoML recycles its connection pool to the
    model worker every 100 calls, dropping calls in flight (and, about once in 1,000 calls, leaving
    one without an answer); the front retries those. SERVABLE_CONCURRENCY_CALLS sets how many."""
    texts = [t for t, _ in text_run.splits.test[:40]]
    n_calls = int(os.environ.get("SERVABLE_CONCURRENCY_CALLS", "1600"))

    def call(i: int) -> int:
        return requests.post(shipped_text_server.url + "/sentiment", json={"text": texts[i % len(texts)]}, headers=KEY,
                             timeout=60).status_code  # fmt: skip

    with cf.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(call, range(n_calls)))
    failed = [line for line in shipped_text_server.log().splitlines() if "model call failed" in line]
    assert codes.count(200) == len(codes), ({c: codes.count(c) for c in set(codes)}, failed[-5:])


def test_dropped_model_connections_are_retried_other_errors_are_not():
    """The errors real aiohttp raises when BentoML closes its session under a call count as dropped."""
    import asyncio

    import aiohttp
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.streams import StreamReader

    from serving.model_call import dropped

    async def raised() -> list[Exception]:
        errors = []
        session = aiohttp.ClientSession()
        await session.close()
        reader = StreamReader(ResponseHandler(asyncio.get_running_loop()), 2**16, loop=asyncio.get_running_loop())
        for call in (lambda: session.post("http://127.0.0.1:9/"), reader.read):  # closed session, closed connection
            try:
                await call()
            except Exception as exc:
                errors.append(exc)
        return errors

    closed_session, closed_connection = asyncio.run(raised())
    assert str(closed_session) == "Session is closed" and str(closed_connection) == "Connection closed."
    for exc in (closed_session, closed_connection, aiohttp.ServerDisconnectedError(), aiohttp.ClientOSError()):
        assert dropped(exc), exc
    for exc in (RuntimeError("model output has the wrong shape"), ValueError("bad"), TimeoutError()):
        assert not dropped(exc), exc


@pytest.mark.parametrize("stuck_attempts", [1, 3])
def test_stuck_model_call_is_abandoned_and_retried(stuck_attempts):
    """split topology: an attempt with no answer is cut at model_call_timeout_s and retried; if every
    attempt is stuck the call fails (a 503 for the caller) well before the request timeout, not a hang."""
    import asyncio
    import itertools
    import time

    from serving.model_call import MODEL_CALL_ATTEMPTS, ModelUnavailable, call_model

    started: list[float] = []

    async def model_call():
        started.append(time.perf_counter())
        if len(started) <= stuck_attempts:
            await asyncio.Event().wait()  # an answer that never comes
        return [[0.25, 0.75]]

    if stuck_attempts < MODEL_CALL_ATTEMPTS:
        out = asyncio.run(call_model({"model": "stuck-test", "version": "t1"}, 0.2, model_call))
        assert len(started) == stuck_attempts + 1 and np.allclose(out, [[0.25, 0.75]])
    else:
        with pytest.raises(ModelUnavailable):
            asyncio.run(call_model({"model": "stuck-test", "version": "t1"}, 0.2, model_call))
        assert len(started) == MODEL_CALL_ATTEMPTS
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(started))


def test_raw_image_body_is_the_same_as_multipart(image_server, image_run):
    blob = test_images(image_run, 1)[0]
    expected = local_probs(image_run, [blob])[0]
    headers = {**KEY, "content-type": "image/png"}
    r = requests.post(image_server.url + "/classify?top_k=2", data=blob, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert len(pred["top_k"]) == 2 and pred["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
    r = requests.post(image_server.url + "/classify", data=b"GIF89a not really", headers=headers, timeout=30)
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_format"  # JPEG, PNG, WebP only


def test_a_hostile_request_never_fails_a_good_batch_mate(image_server, shipped_text_server, image_run, text_run):
    """Good and malformed requests at the same time from many clients (truncated image, decompression
    bomb, wrong field, lone surrogate, wrong V2 shapes, a non-string text): every good one answers 200
    with the same answer as when sent alone; every bad one its 4xx; the good images shared batches."""
    from tests.test_preprocessing import _bomb_png

    good_img = test_images(image_run, 4)
    alone_img = local_probs(image_run, good_img)
    texts = [t for t, _ in text_run.splits.test[:4]]
    alone_txt = served_text_probs(shipped_text_server, text_run, texts)
    img, txt = image_server.url + "/classify", shipped_text_server.url + "/sentiment"
    img_v2 = f"{image_server.url}/v2/models/{image_run.tag.split(':')[0]}/infer"
    txt_v2 = shipped_text_server.url + "/v2/models/sentiment-bert/infer"
    size = image_run.preprocessing.size
    bomb = _bomb_png(30000, 30000)
    as_json = {**KEY, "content-type": "application/json"}
    bad = [  # (call, expected status, expected reason)
        (lambda: requests.post(img, files={"image": ("x.png", good_img[0][: len(good_img[0]) // 2])}, headers=KEY),
         400, "corrupt"),
        (lambda: requests.post(img, files={"image": ("x.png", bomb)}, headers=KEY), 413, "too_many_pixels"),
        (lambda: requests.post(img, files={"picture": ("x.png", good_img[0])}, headers=KEY), 400, "no_image"),
        (lambda: requests.post(txt, data=b'{"text": "ok \\ud800"}', headers=as_json), 422, "invalid_unicode"),
        (lambda: requests.post(txt, json={"texts": ["fine", 3]}, headers=KEY), 422, "invalid_field"),
        (lambda: requests.post(txt_v2, json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1],
                                                         "data": ["a", "b"]}]}, headers=KEY), 422, "wrong_shape"),
        (lambda: requests.post(img_v2, json={"inputs": [{"name": "pixels", "datatype": "FP32",
                                                         "shape": [1, 3, size + 1, size],
                                                         "data": [0.0] * (3 * (size + 1) * size)}]}, headers=KEY),
         422, "wrong_shape"),
    ]  # fmt: skip

    def call(i: int):
        kind, k = i % 3, (i // 3) % 4
        if kind == 2:
            j = (i // 3) % len(bad)
            r = bad[j][0]()
            return ("bad", j), r.status_code, r.json()
        if kind == 0:
            r = requests.post(img, files={"image": ("x.png", good_img[k])}, headers=KEY, timeout=60)
            return ("img", k), r.status_code, r.json()
        r = requests.post(txt, json={"text": texts[k]}, headers=KEY, timeout=60)
        return ("txt", k), r.status_code, r.json()

    # The good images must share batches for a batch-mate's failure to show. Whether they do depends on the
    # machine's timing (on a quiet machine each may finish before the next arrives), so a burst with no
    # shared batch is sent again, at most three times; every burst's answers are checked.
    for _ in range(3):
        batches_before = _metric(image_server, "servable_batch_size_count")
        with cf.ThreadPoolExecutor(24) as ex:
            results = list(ex.map(call, range(252)))
        for (what, k), status, body in results:
            if what == "bad":
                assert (status, body.get("reason")) == bad[k][1:], (k, status, body)
                continue
            assert status == 200, body
            p = body["predictions"][0]
            if what == "img":
                assert p["probability"] == pytest.approx(float(alone_img[k].max()), abs=1e-4)
            else:
                assert p["scores"]["positive"] == pytest.approx(float(alone_txt[k][1]), abs=1e-4)
        assert {k for (what, k), *_ in results if what == "bad"} == set(range(len(bad)))  # every bad kind was sent
        batches = _metric(image_server, "servable_batch_size_count") - batches_before
        assert batches > 0, batches
        if batches < 84:  # the 84 good images ran in fewer batches: some beside each other
            break
    assert batches < 84, f"no shared batch in three bursts of 84 good images: {batches}"


def test_variant_auto_serves_int8_on_cpu_only_within_the_accuracy_bound():
    from types import SimpleNamespace

    from servable.config import TextServeSettings
    from serving.loading import resolve_variant

    def manifest(fp32: float, int8: float | None):
        test = {"fp32": {"accuracy": fp32}} | ({"int8": {"accuracy": int8}} if int8 is not None else {})
        onnx = {"fp32": "model.onnx"} | ({"int8": "model.int8.onnx"} if int8 is not None else {})
        return SimpleNamespace(onnx=onnx, metrics={"test": test})

    cpu = TextServeSettings(device="cpu")
    assert resolve_variant(cpu, manifest(0.85, 0.848)) == "int8"
    assert resolve_variant(cpu, manifest(0.85, 0.86)) == "int8"
    assert resolve_variant(cpu, manifest(0.85, 0.84)) == "fp32"  # a full point lost: not traded
    assert resolve_variant(cpu, manifest(0.85, None)) == "fp32"
    assert resolve_variant(TextServeSettings(device="cuda"), manifest(0.85, 0.85)) == "fp32"
    assert resolve_variant(TextServeSettings(device="cpu", variant="fp32"), manifest(0.85, 0.85)) == "fp32"


def test_split_topology_starts_and_answers_like_the_in_process_one(text_run, text_server, tmp_path_factory):
    """The GPU layout (one batching model process fed by HTTP workers over BentoML's dependency call),
    run on CPU: same answers, /info says which layout and variant, the model process is un-ready-aware."""
    from tests.conftest import _serve

    server = _serve("text", text_run.tag, tmp_path_factory, {"SERVABLE_TEXT_SERVE_TOPOLOGY": "split",
                                                              "SERVABLE_TEXT_SERVE_VARIANT": "auto"})  # fmt: skip
    try:
        texts = [t for t, _ in text_run.splits.test[:6]]
        split = requests.post(server.url + "/sentiment", json={"texts": texts}, headers=KEY, timeout=60)
        info = requests.get(server.url + "/info", headers=KEY, timeout=30).json()
        assert info["topology"] == "split" and info["provider"] == "CPUExecutionProvider"
        test = text_run.metrics["test"]
        expected = "int8" if test["fp32"]["accuracy"] - test["int8"]["accuracy"] <= 0.005 else "fp32"
        assert info["variant"] == expected and split.json()["variant"] == expected
        with cf.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda t: requests.post(server.url + "/sentiment", json={"text": t}, headers=KEY,
                                                        timeout=60).status_code, texts * 20))  # fmt: skip
        assert codes == [200] * len(codes)
        # explanations: rows built in the front worker, scored by the model process (no explain process here)
        text = "A warm, funny film, though the ending drags."
        exp = requests.post(server.url + "/sentiment/explain", json={"text": text}, headers=KEY, timeout=60)
        assert exp.status_code == 200 and exp.json()["explanation"]["rows"] == 1 + len(text.split()), exp.text
        calls = _metric(server, "servable_model_call_seconds_count")
        assert calls >= len(codes)
        # BentoML's session recycling is out of reach (runner_max_requests): a retry is left only for an
        # attempt with no answer within model_call_timeout_s, rare enough that more than 1 % means a fault
        retries = _metric(server, "servable_model_call_retries_total")
        assert retries <= calls / 100, (retries, calls)
        local = requests.get(text_server.url + "/info", headers=KEY, timeout=30).json()
        assert local["topology"] == "inprocess"
        if expected == "fp32":
            ref = requests.post(text_server.url + "/sentiment", json={"texts": texts}, headers=KEY, timeout=60)
            assert split.json()["predictions"] == ref.json()["predictions"]
    finally:
        server.stop()


def test_tracing_is_skipped_on_the_hot_routes_unless_turned_on(monkeypatch):
    """OpenTelemetry's ASGI middleware (BentoML adds it to every service) excludes the inference routes,
    the V2 routes, the probes and the model process's routes unless tracing is on (OTEL_TRACES_EXPORTER names
    an exporter: serving/tracing.py). In the split topology BentoML's client to the model process is told not
    to recycle its session every 100 calls."""
    from opentelemetry.util.http import ExcludeList

    from servable.config import ImageServeSettings
    from serving.model_service import service_config

    off = service_config(ImageServeSettings(), ["/classify"])["tracing"]["excluded_urls"]
    skipped = ExcludeList(off)
    for url in ("http://h/classify", "http://h/v2/models/m/infer", "http://h/readyz", "http://h/metrics"):
        assert skipped.url_disabled(url), url
    assert not skipped.url_disabled("http://h/info")
    for off_values in ("", "none", " None "):
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", off_values)
        assert service_config(ImageServeSettings(), ["/classify"])["tracing"]["excluded_urls"] == off
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    on = ExcludeList(service_config(ImageServeSettings(), ["/classify"])["tracing"]["excluded_urls"])
    assert not any(on.url_disabled(url) for url in ("http://h/classify", "http://h/v2/models/m/infer"))
    assert on.url_disabled("http://h/readyz") and on.url_disabled("http://h/metrics")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert service_config(ImageServeSettings(), ["/classify"])["tracing"]["excluded_urls"] == off
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    import serving.image_service as image_service

    assert image_service.ImageModel is None  # in-process on this CPU machine: no model process at all
    assert image_service.ImageClassifier.config["tracing"]["excluded_urls"] == [*off]
    from servable.config import TextServeSettings
    from serving.adapters.text import TextAdapter
    from serving.model_service import model_service

    # By default (BentoML's own is 100 calls per session, reached within seconds under load) and as set.
    split = model_service(TextAdapter, TextServeSettings(topology="split"))
    assert split.config["runner_connection"]["max_requests"] >= 10**6
    model_skipped = ExcludeList(split.config["tracing"]["excluded_urls"])
    assert all(model_skipped.url_disabled(f"http://h/{route}") for route in ("predict", "explain", "readyz"))
    split = model_service(TextAdapter, TextServeSettings(topology="split", runner_max_requests=10**9))
    assert split.config["runner_connection"]["max_requests"] == 10**9


# ---------------------------------------------------------------- loading: provider in use, warm-up (in-process)


@pytest.fixture
def servable_logs(caplog):
    """caplog for servable's loggers, each record once: they stop propagating to the root logger once a
    service module in this process has set up JSON logging (serving/access_log.py)."""
    import logging

    logger = logging.getLogger("servable")
    saved = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.level, logger.propagate = saved


def _runtime_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "servable.runtime" and r.levelname == "WARNING"]


def test_device_cuda_without_a_working_cuda_provider_keeps_the_replica_unready(image_run, servable_logs):
    """This machine has no GPU: the CUDA provider cannot load (onnxruntime-gpu lists it, then falls back;
    a CPU-only build does not list it). device=cuda must not serve on CPU: un-ready, with the reason logged."""

    from servable.config import ImageServeSettings, gpu_present
    from serving.adapters.image import ImageAdapter
    from serving.loading import load_model

    assert not gpu_present(), "a test of the CPU machine: with a GPU, device=cuda is expected to load"
    caplog = servable_logs
    settings = ImageServeSettings(model_tag=image_run.tag, device="cuda", variant="fp32")
    _, model, run = load_model(ImageAdapter, settings, with_session=True)
    assert not model.ready and run is None and model.session is None
    assert "device=cuda" in model.error and model.info()["ready"] is False
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "NOT loaded" in r.getMessage()]
    assert len(lines) == 1 and image_run.tag in lines[0] and "device=cuda" in lines[0], lines


def test_device_auto_reports_the_provider_in_use_and_logs_a_fallback_once(image_run, servable_logs):
    """device=auto asks for CUDA whenever the onnxruntime build has it; here it falls back. The provider
    reported is the one ONNX Runtime says it uses, and the fallback is one warning, not one per batch."""

    import onnxruntime as ort

    from servable.config import ImageServeSettings
    from serving.adapters.image import ImageAdapter
    from serving.loading import load_model

    caplog = servable_logs
    settings = ImageServeSettings(model_tag=image_run.tag, device="auto", variant="fp32")
    adapter, model, run = load_model(ImageAdapter, settings, with_session=True)  # runs the warm-up batches too
    assert model.ready and model.provider == model.session.get_providers()[0] == "CPUExecutionProvider"
    assert model.runtime() == {"provider": "CPUExecutionProvider", "providers": model.session.get_providers()}
    run(adapter.warmup_rows(3))  # serving more batches adds no warning
    fallbacks = _runtime_warnings(caplog)
    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu: CUDA was requested
        assert fallbacks == ["requested CUDAExecutionProvider but ONNX Runtime fell back to CPUExecutionProvider"]
    else:
        assert fallbacks == []  # a CPU build never asks for CUDA, so nothing fell back


def test_the_provider_reported_is_the_sessions_not_the_one_asked_for(image_run, servable_logs, monkeypatch):
    """What /info and servable_model_info report is the provider the session says it runs on, not a name
    assumed: here an ONNX Runtime session (on this machine's CPU) that says CUDA loaded, as on a GPU machine."""
    import onnxruntime as ort

    from servable.config import ImageServeSettings
    from serving.adapters.image import ImageAdapter
    from serving.loading import load_model

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class SaysCuda(ort.InferenceSession):
        def __init__(self, path, opts, providers):
            assert providers == both  # device=auto asks for CUDA where the build has it
            super().__init__(path, opts, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return both

    monkeypatch.setattr(ort, "get_available_providers", lambda: both)
    monkeypatch.setattr(ort, "InferenceSession", SaysCuda)
    settings = ImageServeSettings(model_tag=image_run.tag, device="auto", variant="fp32")
    _, model, _ = load_model(ImageAdapter, settings, with_session=True)
    assert model.ready and model.provider == "CUDAExecutionProvider"
    assert model.runtime() == {"provider": "CUDAExecutionProvider", "providers": both}
    assert _runtime_warnings(servable_logs) == []  # CUDA was asked for and is in use: no fallback


def _onnx_image_model(path, size: int, bias: float, fixed_batch: bool = False) -> None:
    """A real ONNX classifier (flatten, matmul, add) over pixels [N, 3, size, size]; `bias` NaN poisons it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = 3 * size * size
    batch = 1 if fixed_batch else "N"
    inp = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    weights = numpy_helper.from_array(np.full((features, 10), 1e-3, np.float32), "w")
    b = numpy_helper.from_array(np.full((10,), bias, np.float32), "b")
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "fixture", [inp], [out], initializer=[weights, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _register_image_variant(image_run, tmp_path, version: str, make_onnx) -> str:
    """An image artifact like the fixture's, whose fp32 ONNX file is replaced by `make_onnx(path)`."""
    import shutil

    from servable import artifact

    staging = tmp_path / version
    shutil.copytree(image_run.staging, staging)
    (staging / artifact.MANIFEST).unlink(missing_ok=True)
    make_onnx(staging / "model.onnx")
    manifest = artifact.load(image_run.tag).manifest
    return artifact.register(manifest.model_copy(update={"name": "broken-cnn", "version": version}), staging)


@pytest.mark.parametrize("fault", ["non_finite_output", "wrong_input_shape", "wrong_task_graph", "valid"])
def test_a_model_that_loads_but_fails_its_warm_up_keeps_the_replica_unready(fault, image_run, text_run, tmp_path,
                                                                           servable_logs):  # fmt: skip
    """The checksum-verified model loads, but its warm-up batches fail: NaN logits, an input of a fixed
    shape the pre-processing does not produce, or a text graph in an image artifact. The replica stays
    un-ready (no batch function, `ready` False, what BentoML's /readyz reads) and the log says why, once.
    The same fixture with a sound graph warms up and becomes ready, so the failures are the faults'."""
    import shutil

    from servable.config import ImageServeSettings
    from serving.adapters.image import ImageAdapter
    from serving.loading import load_model

    size = image_run.preprocessing.size
    make = {
        "non_finite_output": lambda p: _onnx_image_model(p, size, float("nan")),
        "wrong_input_shape": lambda p: _onnx_image_model(p, size + 5, 0.0, fixed_batch=True),
        "wrong_task_graph": lambda p: shutil.copy(text_run.staging / "model.onnx", p),
        "valid": lambda p: _onnx_image_model(p, size, 0.0),
    }[fault]
    tag = _register_image_variant(image_run, tmp_path, fault.replace("_", "-"), make)
    caplog = servable_logs
    settings = ImageServeSettings(model_tag=tag, variant="fp32", device="cpu")
    adapter, model, run = load_model(ImageAdapter, settings, with_session=True)
    if fault == "valid":
        assert model.ready and model.error is None
        assert run(adapter.warmup_rows(2)).shape == (2, 10)
        return
    assert model.session is not None  # it loaded ...
    assert not model.ready and model.error.startswith("warm-up failed")  # ... but never became ready
    assert model.info() == {"ready": False, "model_tag": tag, "error": model.error}
    if fault == "non_finite_output":
        assert "non-finite" in model.error
    lines = [r.getMessage() for r in caplog.records if "NOT ready" in r.getMessage()]
    assert len(lines) == 1 and tag in lines[0] and "warm-up failed" in lines[0], lines


# ---------------------------------------------------------------- settings served end to end (one server each)

# name -> (model, SERVABLE_<MODEL>_SERVE_ settings). Each setting a user can choose is served once by a
# real server and checked for its effect; the servers start together and are shared by the tests below.
SETTINGS = {
    "text optimized, batching off, length buckets off, no timing headers, metrics need a key": (
        "text", {"VARIANT": "optimized", "BATCHING": "false", "LENGTH_BUCKETS": "false", "SERVER_TIMING": "false"}),
    "text int8, 2 workers": ("text", {"VARIANT": "int8", "WORKERS": "2"}),
    "image int8": ("image", {"VARIANT": "int8"}),
}  # fmt: skip


def worker_ids(server) -> set[str]:
    """--worker-id of each BentoML HTTP worker process under the server."""
    from deploy import launch

    ids = set()
    for pid in launch.descendants(server.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_bentoml_impl.worker.service" in args and b"--worker-id" in args:
            ids.add(args[args.index(b"--worker-id") + 1].decode())
    return ids


@pytest.fixture(scope="module")
def setting_servers(image_run, text_run, tmp_path_factory):
    from deploy import launch
    from servable.config import SERVED_MODELS

    tags = {"image": image_run.tag, "text": text_run.tag}
    servers = {}
    try:
        for name, (kind, settings) in SETTINGS.items():  # started together: their start-ups overlap
            prefix = SERVED_MODELS[kind].env_prefix
            env = {f"{prefix}MODEL_TAG": tags[kind], "SERVABLE_AUTH_KEYS": f"tester:{API_KEY}",
                   **{prefix + k: v for k, v in settings.items()}}  # fmt: skip
            if "metrics need a key" in name:
                env["SERVABLE_AUTH_METRICS_REQUIRE_KEY"] = "true"
            log = tmp_path_factory.mktemp("setting-server") / "server.log"
            servers[name] = launch.start(launch.SERVICES[kind], env, log_path=log)
        for name, server in servers.items():
            assert launch.wait_until(server, timeout_s=240), f"{name} did not become ready:\n{server.log()[-3000:]}"
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _burst(url: str, bodies: list[dict], files: bool = False) -> list[dict]:
    def call(body):
        kw = {"files": {"image": ("x.png", body)}} if files else {"json": body}
        r = requests.post(url, headers=KEY, timeout=60, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(8) as ex:
        return list(ex.map(call, bodies))


def test_text_variant_optimized_unbatched_unbucketed_and_metrics_behind_the_key(setting_servers, text_run):
    server = setting_servers["text optimized, batching off, length buckets off, no timing headers, metrics need a key"]
    info = requests.get(server.url + "/info", headers=KEY, timeout=30).json()
    assert (info["variant"], info["batching"]["enabled"], info["length_buckets"]) == ("optimized", False, False)
    # server_timing=false: answers without the timing headers
    plain = requests.post(server.url + "/sentiment", json={"text": "fine"}, headers=KEY, timeout=30)
    assert plain.status_code == 200 and not {"server-timing", "x-batch-size"} & set(plain.headers), plain.headers
    # SERVABLE_AUTH_METRICS_REQUIRE_KEY=true: /metrics refuses without a key, serves with one; probes stay open
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
    wrong = {"x-api-key": "wrong-key-000000"}
    assert requests.get(server.url + "/metrics", headers=wrong, timeout=10).status_code == 401
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200

    def metric(name: str) -> float:
        text = requests.get(server.url + "/metrics", headers=KEY, timeout=10).text
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))

    texts = [t for t, _ in text_run.splits.test[:16]] + ["ok", "word " * 40]
    expected = served_text_probs(server, text_run, texts)
    runs, items = metric("servable_batch_size_count"), metric("servable_batch_size_sum")
    got = _burst(server.url + "/sentiment", [{"text": t} for t in texts])
    np.testing.assert_allclose([g["predictions"][0]["scores"]["positive"] for g in got], expected[:, 1], atol=1e-4)
    assert all(g["variant"] == "optimized" for g in got)
    # batching off: 8 concurrent callers, still one item per model run
    assert metric("servable_batch_size_count") - runs == metric("servable_batch_size_sum") - items == len(texts)
    # length buckets off: a mixed-length request runs as one padded batch (one observation, one run)
    runs = metric("servable_batch_size_count")
    mixed = requests.post(server.url + "/sentiment", json={"texts": ["ok", "word " * 40, "fine"]}, headers=KEY,
                          timeout=60)  # fmt: skip
    assert mixed.status_code == 200 and metric("servable_batch_size_count") - runs == 1


def test_text_int8_on_two_workers(setting_servers, text_run):
    server = setting_servers["text int8, 2 workers"]
    info = requests.get(server.url + "/info", headers=KEY, timeout=30).json()
    assert (info["variant"], info["quantized"], info["workers"]) == ("int8", True, 2)
    assert worker_ids(server) == {"1", "2"}  # two HTTP worker processes, each with its own session
    texts = [t for t, _ in text_run.splits.test[:24]]
    expected = served_text_probs(server, text_run, texts)[:, 1]
    got = np.array([g["predictions"][0]["scores"]["positive"] for g in _burst(server.url + "/sentiment",
                                                                            [{"text": t} for t in texts])])  # fmt: skip
    # Dynamic int8 quantisation scales activations over the whole batch, so a text's int8 score moves
    # with its batch-mates (measured up to 0.027 on the movie-only fixture, 0.064 and then 0.128 on one
    # text of the three-domain one, depending on which texts shared its batch); alone it is exact. (fp32
    # and the optimised graph are batch-independent:
    # test_concurrent_calls_are_batched_and_answered_to_the_right_caller.) Each caller's own answer: the
    # typical text moves by far less than answers that went to the wrong caller would (median ~0.005).
    drift = np.abs(got - expected)
    assert drift.max() <= 0.2 and np.median(drift) <= 0.02, drift
    alone = requests.post(server.url + "/sentiment", json={"text": texts[0]}, headers=KEY, timeout=60).json()
    assert alone["predictions"][0]["scores"]["positive"] == pytest.approx(float(expected[0]), abs=1e-4)
    assert _metric(server, "servable_batch_size_sum") >= len(texts)  # both workers' metrics are aggregated


def test_image_int8_is_served_through_bentoml(setting_servers, image_run):
    from servable import artifact

    server = setting_servers["image int8"]
    info = requests.get(server.url + "/info", headers=KEY, timeout=30).json()
    assert (info["variant"], info["quantized"]) == ("int8", True)
    blobs = test_images(image_run, 6)
    prep = image_run.preprocessing
    sess = onnx_tools.cpu_session(artifact.load(image_run.tag).onnx_path("int8"))
    logits = sess.run(["logits"], {prep.input_name: np.stack([preprocess_image(b, prep) for b in blobs])})[0]
    expected = calibrated(logits, image_run)
    got = _burst(server.url + "/classify", blobs, files=True)
    for g, p in zip(got, expected, strict=True):
        assert g["variant"] == "int8"
        assert g["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-4)


def test_demo_counts_only_the_expected_answers_as_success(image_server, text_server, tmp_path):
    """`make demo`'s calls (deploy/launch.py::demo) against real servers: with the right key every call
    succeeds; with a wrong one the 401 JSON bodies count as failures, not as answers."""
    from deploy import launch

    sample = launch.demo_image(tmp_path / "ankle-boot.png")
    good = [launch.run_call(cmd, check) for cmd, check in launch.demo_calls(image_server.url, text_server.url, API_KEY,
                                                                            sample)]  # fmt: skip
    assert [ok for ok, _ in good] == [True, True, True], good
    assert '"predictions"' in good[0][1] and '"scores"' in good[1][1]
    bad = [launch.run_call(cmd, check) for cmd, check in launch.demo_calls(image_server.url, text_server.url,
                                                                           "wrong-key-000000", sample)]  # fmt: skip
    assert [ok for ok, _ in bad] == [False, False, True], bad  # health needs no key
    assert all("HTTP 401" in shown and "unauthenticated" in shown for _, shown in bad[:2])
    # a 200 that is not the promised answer fails too (the image call's answer checked as a sentiment one)
    cmd, _ = launch.demo_calls(image_server.url, text_server.url, API_KEY, sample)[0]
    assert launch.run_call(cmd, launch.demo_calls("", "", "", sample)[1][1])[0] is False
