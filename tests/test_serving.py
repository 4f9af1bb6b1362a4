"""The real services over HTTP: answers match in-process ONNX Runtime, batching, guards, metrics."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import re

import numpy as np
import pytest
import requests
from PIL import Image

from servable.preprocessing import encode_texts, load_tokenizer, preprocess_image
from serving.onnx_runtime import softmax
from tests.conftest import API_KEY, SECRET_SENTENCE
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


def local_probs(image_run, blobs: list[bytes]) -> np.ndarray:
    prep = image_run.preprocessing
    sess = onnx_tools.cpu_session(image_run.staging / "model.onnx")
    x = np.stack([preprocess_image(b, prep) for b in blobs])
    return softmax(sess.run(["logits"], {prep.input_name: x})[0])


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
    expected = softmax(sess.run(["logits"], encode_texts(tok, texts, prep))[0])
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


def test_concurrent_calls_are_batched_and_answered_to_the_right_caller(text_server, text_run):
    texts = [f"{t} ({i})" for i, (t, _) in enumerate(text_run.splits.test[:32])]
    prep = text_run.preprocessing
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    sess = onnx_tools.cpu_session(text_run.staging / "model.onnx")
    expected = [softmax(sess.run(["logits"], encode_texts(tok, [t], prep))[0])[0, 1] for t in texts]
    runs_before = _metric(text_server, "servable_batch_size_count")
    items_before = _metric(text_server, "servable_batch_size_sum")
    retries_before = _metric(text_server, "servable_model_call_retries_total")

    def call(t):
        r = requests.post(text_server.url + "/sentiment", json={"text": t}, headers=KEY, timeout=60)
        return r.json()["predictions"][0]["scores"]["positive"]

    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(call, texts))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # each caller got its own answer
    runs = _metric(text_server, "servable_batch_size_count") - runs_before
    items = _metric(text_server, "servable_batch_size_sum") - items_before
    # A call cut by BentoML's connection-pool recycling is retried (one text per call here) and may
    # have run before it was cut: every item ran once, plus at most one run per retry.
    retries = _metric(text_server, "servable_model_call_retries_total") - retries_before
    assert len(texts) <= items <= len(texts) + retries
    assert runs < items, "no batch larger than one was formed under 16 concurrent callers"


@pytest.mark.parametrize(
    ("kwargs", "status", "reason"),
    [
        ({"data": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
        ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": [("image", ("x.png", b"", "image/png"))]}, 400, "empty"),
        ({"files": [("image", ("x.png", b"not an image at all", "image/png"))]}, 400, "not_an_image"),
        ({"files": [("image", ("x.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 50, "image/jpeg"))]}, 400, None),
        ({"json": {"images": ["%%%"]}}, 400, "invalid_base64"),
        ({"json": {"images": "abc"}}, 422, "invalid_field"),
        ({"json": [1, 2]}, 422, "invalid_field"),
        ({"json": {"images": []}}, 400, "no_image"),
        ({"json": {"images": ["aGk="] * 9}}, 413, "too_many_items"),
        ({"json": {"image": "aGk=", "top_k": "many"}}, 422, "invalid_field"),
        ({"data": b"{" * 100 + b"}" * 100, "headers": {"content-type": "application/json"}}, 400, "too_deep"),
        ({"data": b'{"image": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "not_utf8"),
        ({"data": b'{"image": ', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
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
    bad = [
        (text_server, "/v2/models/nope/infer", {"inputs": []}, 404),
        (text_server, "/v2/models/sentiment-bert/infer", {"inputs": []}, 422),
        (text_server, "/v2/models/sentiment-bert/infer",
         {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["x"]}]}, 422),
        (text_server, "/v2/models/sentiment-bert/infer",
         {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}, 422),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 5, 5], "data": [0.0] * 75}]}, 422),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1], "data": ["a"]}]}, 422),
        (image_server, f"/v2/models/{name}/infer",
         {"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [1]}]}, 422),
    ]  # fmt: skip
    for server, path, body, status in bad:
        r = requests.post(server.url + path, json=body, headers=KEY, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]


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
    assert info["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert info["quantized"] is False and info["variants_available"] == ["fp32", "int8"]
    spec = requests.get(text_server.url + "/docs.json", timeout=10).json()
    assert {"/sentiment", "/info", "/v2/models/{name}/infer", "/v2/health/ready"} <= set(spec["paths"])
    assert "application/json" in spec["paths"]["/sentiment"]["post"]["requestBody"]["content"]


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
    assert re.search(r'servable_model_info\{[^}]*provider="CPUExecutionProvider"', text) or "CUDA" in text


def test_secret_content_never_logged(text_server, image_server):
    r = requests.post(text_server.url + "/sentiment", json={"text": SECRET_SENTENCE}, headers=KEY, timeout=30)
    assert r.status_code == 200
    requests.post(text_server.url + "/sentiment", json={"text": SECRET_SENTENCE + "\x00"}, headers=KEY, timeout=30)
    for server in (text_server, image_server):
        log = server.log()
        assert "request_id" in log  # the JSON access log is there ...
        assert "PURPLE-ELEPHANT" not in log and "X1234567" not in log  # ... without the content
        assert API_KEY not in log


def test_wrong_tag_keeps_replica_unready(tmp_path_factory, text_run):
    from serving import launch

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


def test_sustained_concurrency_never_fails_a_call(text_server, text_run):
    """Thousands of calls from 16 clients all succeed: BentoML recycles its connection pool to the
    model worker every 100 calls, dropping calls in flight (and, about once in 1,000 calls, leaving
    one without an answer); the front retries those. SERVABLE_CONCURRENCY_CALLS sets how many."""
    texts = [t for t, _ in text_run.splits.test[:40]]
    n_calls = int(os.environ.get("SERVABLE_CONCURRENCY_CALLS", "1600"))

    def call(i: int) -> int:
        return requests.post(text_server.url + "/sentiment", json={"text": texts[i % len(texts)]}, headers=KEY,
                             timeout=60).status_code  # fmt: skip

    with cf.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(call, range(n_calls)))
    failed = [line for line in text_server.log().splitlines() if "model call failed" in line]
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
        out = asyncio.run(call_model("stuck-test", 0.2, model_call))
        assert len(started) == stuck_attempts + 1 and np.allclose(out, [[0.25, 0.75]])
    else:
        with pytest.raises(ModelUnavailable):
            asyncio.run(call_model("stuck-test", 0.2, model_call))
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
    assert r.status_code == 400 and r.json()["reason"]


def test_a_hostile_request_never_fails_a_good_batch_mate(image_server, text_server, image_run, text_run):
    """Good and malformed requests at the same time from many clients: every good one answers 200 with
    the same answer as when sent alone; every bad one a 4xx; the batches kept forming."""
    from tests.test_preprocessing import _bomb_png

    good_img = test_images(image_run, 4)
    alone_img = local_probs(image_run, good_img)
    texts = [t for t, _ in text_run.splits.test[:4]]
    prep = text_run.preprocessing
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    sess = onnx_tools.cpu_session(text_run.staging / "model.onnx")
    alone_txt = [softmax(sess.run(["logits"], encode_texts(tok, [t], prep))[0])[0] for t in texts]
    img, txt = image_server.url + "/classify", text_server.url + "/sentiment"
    bomb = _bomb_png(30000, 30000)
    bad = [
        lambda: requests.post(img, files={"image": ("x.png", good_img[0][: len(good_img[0]) // 2])}, headers=KEY),
        lambda: requests.post(img, files={"image": ("x.png", bomb)}, headers=KEY),
        lambda: requests.post(img, files={"picture": ("x.png", good_img[0])}, headers=KEY),
        lambda: requests.post(txt, data=b'{"text": "ok \\ud800"}', headers={**KEY, "content-type": "application/json"}),
        lambda: requests.post(txt, json={"texts": ["fine", 3]}, headers=KEY),
    ]

    def call(i: int):
        kind = i % 3
        if kind == 2:
            return "bad", bad[(i // 3) % len(bad)]().status_code, None
        if kind == 0:
            k = (i // 3) % 4
            r = requests.post(img, files={"image": ("x.png", good_img[k])}, headers=KEY, timeout=60)
            return ("img", k), r.status_code, r.json()
        k = (i // 3) % 4
        r = requests.post(txt, json={"text": texts[k]}, headers=KEY, timeout=60)
        return ("txt", k), r.status_code, r.json()

    batches_before = _metric(image_server, "servable_batch_size_count")
    with cf.ThreadPoolExecutor(24) as ex:
        results = list(ex.map(call, range(240)))
    for what, status, body in results:
        if what == "bad":
            assert 400 <= status < 500, status
            continue
        assert status == 200, body
        p = body["predictions"][0]
        if what[0] == "img":
            assert p["probability"] == pytest.approx(float(alone_img[what[1]].max()), abs=1e-4)
        else:
            assert p["scores"]["positive"] == pytest.approx(float(alone_txt[what[1]][1]), abs=1e-4)
    image_items = _metric(image_server, "servable_batch_size_count") - batches_before
    assert 0 < image_items <= 80  # every good image ran (80 sent), some of them in shared batches or alone


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
        assert _metric(server, "servable_model_call_seconds_count") > 0
        local = requests.get(text_server.url + "/info", headers=KEY, timeout=30).json()
        assert local["topology"] == "inprocess"
        if expected == "fp32":
            ref = requests.post(text_server.url + "/sentiment", json={"texts": texts}, headers=KEY, timeout=60)
            assert split.json()["predictions"] == ref.json()["predictions"]
    finally:
        server.stop()


def test_tracing_is_skipped_on_the_hot_routes_unless_turned_on():
    """OpenTelemetry's ASGI middleware (BentoML adds it to every service) excludes the inference routes,
    the V2 routes and the probes unless SERVABLE_*_SERVE_TRACING=true. In the split topology BentoML's
    client to the model process is told not to recycle its session every 100 calls."""
    from opentelemetry.util.http import ExcludeList

    from servable.config import ImageServeSettings
    from serving.service_factory import service_config

    off = service_config(ImageServeSettings(), ["/classify"])["tracing"]["excluded_urls"]
    skipped = ExcludeList(off)
    for url in ("http://h/classify", "http://h/v2/models/m/infer", "http://h/readyz", "http://h/metrics"):
        assert skipped.url_disabled(url), url
    assert not skipped.url_disabled("http://h/info")
    assert "tracing" not in service_config(ImageServeSettings(tracing=True), ["/classify"])
    import serving.image_service as image_service

    assert image_service.ImageModel is None  # in-process on this CPU machine: no model process at all
    assert image_service.ImageClassifier.config["tracing"]["excluded_urls"] == [*off]
    from servable.config import TextServeSettings
    from serving.adapters.text import TextAdapter
    from serving.service_factory import model_service

    split = model_service(TextAdapter, TextServeSettings(topology="split", runner_max_requests=10**9))
    assert split.config["runner_connection"]["max_requests"] == 10**9
