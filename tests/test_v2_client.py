"""The Open Inference Protocol (V2) through a client nobody here wrote: tritonclient's HTTP client, unchanged.

Its defaults are what most V2 users send: no Content-Type on the body, input tensors as binary data after
the JSON header (`Inference-Header-Content-Length`) and outputs asked for as binary. Every answer is
compared with the REST route's answer for the same input; mistakes come back as the client's
InferenceServerException with the status a user can act on.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from servable.preprocessing import preprocess_image
from tests.conftest import API_KEY
from tests.test_serving import test_images

IMAGE_MODEL, TEXT_MODEL = "fashion-cnn", "sentiment-bert"


def key() -> dict[str, str]:
    # A new dict per call: tritonclient writes its Inference-Header-Content-Length into the headers it is given.
    return {"x-api-key": API_KEY}


def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)


def tensor(name: str, value: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(value.shape), datatype)
    return t.set_data_from_numpy(value, binary_data=binary)


def json_outputs() -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "label")]


def rest_image_probs(server, blobs: list[bytes], labels: list[str]) -> np.ndarray:
    """Probabilities of every label per image, from the REST route (multipart, top_k = all labels)."""
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    r = requests.post(server.url + "/classify", files=files, data={"top_k": str(len(labels))}, headers=key(),
                      timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    scores = [{s["label"]: s["probability"] for s in p["top_k"]} for p in r.json()["predictions"]]
    return np.array([[s[lab] for lab in labels] for s in scores])


def rest_text_probs(server, texts: list[str], labels: list[str]) -> np.ndarray:
    r = requests.post(server.url + "/sentiment", json={"texts": texts}, headers=key(), timeout=30)
    assert r.status_code == 200, r.text
    return np.array([[p["scores"][lab] for lab in labels] for p in r.json()["predictions"]])


def check_answer(result: triton.InferResult, expected: np.ndarray, labels: list[str]) -> None:
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == expected.shape
    np.testing.assert_allclose(probs, expected, atol=2e-6)  # REST rounds to 6 decimals
    got = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    assert got == [labels[i] for i in expected.argmax(1)]


def test_server_and_model_metadata_and_readiness(image_server, text_server, image_run, text_run):
    for server, run, name in ((image_server, image_run, IMAGE_MODEL), (text_server, text_run, TEXT_MODEL)):
        c = client(server)
        assert c.is_server_live() and c.is_server_ready()
        meta = c.get_server_metadata(headers=key())
        assert meta["name"] == "servable" and meta["version"] and "binary_tensor_data" in meta["extensions"]
        version = run.tag.split(":")[1]
        model = c.get_model_metadata(name, headers=key())
        assert model == c.get_model_metadata(name, version, headers=key())
        assert model["name"] == name and model["versions"] == [version] and model["platform"] == "onnxruntime"
        assert model["parameters"]["labels"] == run.splits.labels
        assert model["parameters"]["preprocessing"] == run.preprocessing.model_dump(mode="json")
        assert {o["name"]: o["shape"] for o in model["outputs"]} == {
            "probabilities": [-1, len(run.splits.labels)], "label": [-1], "below_threshold": [-1]}  # fmt: skip
        assert c.is_model_ready(name, headers=key()) and c.is_model_ready(name, version, headers=key())
        assert not c.is_model_ready(name, "v0-not-served", headers=key())
        assert not c.is_model_ready("no-such-model", headers=key())
    image_inputs = {t["name"]: t for t in client(image_server).get_model_metadata(IMAGE_MODEL, headers=key())["inputs"]}
    size = image_run.preprocessing.size
    assert image_inputs == {"pixels": {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, size, size]},
                            "image": {"name": "image", "datatype": "BYTES", "shape": [-1]}}  # fmt: skip


def test_image_bytes_and_fp32_pixels_binary_and_json_match_the_rest_answer(image_server, image_run):
    blobs, labels = test_images(image_run, 3), image_run.splits.labels
    expected = rest_image_probs(image_server, blobs, labels)
    c, version = client(image_server), image_run.tag.split(":")[1]
    files = np.array(blobs, dtype=object)
    # The client's defaults: image files as a binary BYTES tensor, outputs answered as binary.
    result = c.infer(IMAGE_MODEL, [tensor("image", files, "BYTES")], headers=key(), request_id="img-1")
    assert result.get_response()["id"] == "img-1"
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    check_answer(result, expected, labels)
    # JSON both ways: base64 strings in (JSON cannot carry raw bytes), JSON data out.
    b64 = np.array([base64.b64encode(b).decode() for b in blobs], dtype=object)
    result = c.infer(IMAGE_MODEL, [tensor("image", b64, "BYTES", binary=False)], outputs=json_outputs(),
                     headers=key())  # fmt: skip
    assert all("data" in o for o in result.get_response()["outputs"])
    check_answer(result, expected, labels)
    # Pre-processed FP32 pixels, binary (the cheapest batch) and JSON, on the versioned route.
    pixels = np.stack([preprocess_image(b, image_run.preprocessing) for b in blobs]).astype(np.float32)
    for binary in (True, False):
        result = c.infer(IMAGE_MODEL, [tensor("pixels", pixels, "FP32", binary)], model_version=version, headers=key())
        check_answer(result, expected, labels)
    # One output only, the label, as JSON.
    result = c.infer(IMAGE_MODEL, [tensor("pixels", pixels, "FP32")], headers=key(),
                     outputs=[triton.InferRequestedOutput("label", binary_data=False)])  # fmt: skip
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.get_response()["outputs"][0]["data"] == [labels[i] for i in expected.argmax(1)]


def test_texts_binary_and_json_match_the_rest_answer(text_server, text_run):
    labels = text_run.splits.labels
    texts = [t for t, _ in text_run.splits.test[:3]] + ["Très bien, j'ai adoré ✓", "ok"]
    expected = rest_text_probs(text_server, texts, labels)
    c = client(text_server)
    for binary in (True, False):
        values = np.array([t.encode() if binary else t for t in texts], dtype=object)
        outputs = None if binary else json_outputs()
        result = c.infer(TEXT_MODEL, [tensor("text", values, "BYTES", binary)], outputs=outputs, headers=key())
        check_answer(result, expected, labels)
    # Nested [N, 1] is not the model's [N] text tensor.
    with pytest.raises(InferenceServerException) as err:
        c.infer(TEXT_MODEL, [tensor("text", np.array([[b"ok"]], dtype=object), "BYTES")], headers=key())
    assert err.value.status() == "422" and "shape" in err.value.message()


def _raises(status: str, call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    assert err.value.status() == status, str(err.value)
    assert err.value.message()  # the server's `error`: says what is wrong
    return err.value.message()


def test_mistakes_are_the_clients_exception_with_the_right_status(image_server, text_server, image_run):
    img, txt = client(image_server), client(text_server)
    size = image_run.preprocessing.size
    pixels = np.zeros((1, 3, size, size), np.float32)
    texts = np.array([b"fine"], dtype=object)
    assert "no model named" in _raises("404", lambda: img.infer("nope", [tensor("pixels", pixels, "FP32")],
                                                                headers=key()))  # fmt: skip
    assert "no version" in _raises("404", lambda: txt.infer(TEXT_MODEL, [tensor("text", texts, "BYTES")],
                                                            model_version="v0-not-served", headers=key()))  # fmt: skip
    _raises("404", lambda: txt.get_model_metadata("nope", headers=key()))
    small = np.zeros((1, 3, 5, 5), np.float32)
    assert "shape" in _raises("422", lambda: img.infer(IMAGE_MODEL, [tensor("pixels", small, "FP32")], headers=key()))
    wrong_type = tensor("text", np.array([1.0], np.float32), "FP32")
    assert "datatype" in _raises("422", lambda: txt.infer(TEXT_MODEL, [wrong_type], headers=key()))
    nan = np.full((1, 3, size, size), np.nan, np.float32)
    _raises("422", lambda: img.infer(IMAGE_MODEL, [tensor("pixels", nan, "FP32")], headers=key()))
    not_image = np.array([b"this is not an image"], dtype=object)
    _raises("415", lambda: img.infer(IMAGE_MODEL, [tensor("image", not_image, "BYTES")], headers=key()))
    not_utf8 = np.array([b"caf\xe9"], dtype=object)
    _raises("422", lambda: txt.infer(TEXT_MODEL, [tensor("text", not_utf8, "BYTES")], headers=key()))
    nine = np.array([b"fine"] * 9, dtype=object)  # the test servers take at most 8 items
    _raises("413", lambda: txt.infer(TEXT_MODEL, [tensor("text", nine, "BYTES")], headers=key()))
    huge = np.array([b"long " * 250_000], dtype=object)  # over the text service's body limit
    _raises("413", lambda: txt.infer(TEXT_MODEL, [tensor("text", huge, "BYTES")], headers=key()))
    unknown_output = [triton.InferRequestedOutput("logits")]
    _raises("422", lambda: txt.infer(TEXT_MODEL, [tensor("text", texts, "BYTES")], outputs=unknown_output,
                                     headers=key()))  # fmt: skip
    _raises("415", lambda: txt.infer(TEXT_MODEL, [tensor("text", texts, "BYTES")], headers=key(),
                                     request_compression_algorithm="gzip"))  # fmt: skip
    _raises("401", lambda: txt.infer(TEXT_MODEL, [tensor("text", texts, "BYTES")]))
    _raises("401", lambda: txt.get_server_metadata())
    # The servers kept serving.
    assert txt.infer(TEXT_MODEL, [tensor("text", texts, "BYTES")], headers=key()).as_numpy("label").shape == (1,)


def binary_body(request: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(request).encode()
    return head + blob, {**key(), "Inference-Header-Content-Length": str(len(head))}


def test_malformed_binary_bodies_get_clear_json_4xx(text_server):
    """What tritonclient never sends but a hand-written client might: each refused with a reason, no 500."""
    url = text_server.url + f"/v2/models/{TEXT_MODEL}/infer"
    one = struct.pack("<I", 4) + b"fine"
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(one)}}
    good = {"inputs": [text]}
    head = json.dumps(good).encode()
    two = [{**text, "shape": [2], "parameters": {"binary_data_size": 11}}]  # the second element's length cut short
    short = [{**text, "shape": [2], "parameters": {"binary_data_size": 8}}]  # one element for shape [2]
    shared_memory = [{**text, "parameters": {"shared_memory_region": "r"}}]
    json_data = [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]  # and bytes after it
    cases = [
        (head + one, {**key(), "Inference-Header-Content-Length": str(len(head) + 99)}, 400, "invalid_binary"),
        (head + one, {**key(), "Inference-Header-Content-Length": "ten"}, 400, "invalid_binary"),
        (head + one, key(), 400, "invalid_json"),  # no header: the binary part is read as JSON
        (head, {**key(), "content-type": "application/json"}, 400, "missing_header"),
        (*binary_body(good, one + b"x"), 400, "invalid_binary"),  # more bytes than binary_data_size
        (*binary_body(good, struct.pack("<I", 99) + b"fine"), 400, "invalid_binary"),  # element past the end
        (*binary_body({"inputs": two}, one + b"\x00\x00\x00"), 400, "invalid_binary"),
        (*binary_body({"inputs": short}, one), 422, "wrong_shape"),
        (*binary_body({"inputs": shared_memory}, b""), 400, "unsupported"),
        (*binary_body({"inputs": json_data}, one), 400, "invalid_binary"),
        (json.dumps(good).encode(), {**key(), "content-type": "text/plain"}, 415, "unsupported_media_type"),
    ]
    for body, headers, status, reason in cases:
        r = requests.post(url, data=body, headers=headers, timeout=30)
        assert (r.status_code, r.json().get("reason")) == (status, reason), (headers, body[:120], r.text)
        assert r.json()["error"]
    ok = requests.post(url, data=head + one, headers={**key(), "Inference-Header-Content-Length": str(len(head))},
                       timeout=30)  # fmt: skip
    assert ok.status_code == 200 and ok.json()["outputs"][1]["data"] in (["negative"], ["positive"])
    assert serialize_byte_tensor(np.array([b"fine"], dtype=object)).item() == one  # the framing tritonclient uses


def test_bad_v2_requests_never_fail_their_batch_mates(image_server, image_run):
    """Good and bad binary requests at the same time through the client's own concurrency: each good one gets
    the answer it gets alone, each bad one its 4xx."""
    blobs, labels = test_images(image_run, 4), image_run.splits.labels
    expected = rest_image_probs(image_server, blobs, labels)
    size = image_run.preprocessing.size
    c = triton.InferenceServerClient(image_server.url.removeprefix("http://"), concurrency=16, network_timeout=60.0)
    bad = [tensor("pixels", np.zeros((1, 3, 5, 5), np.float32), "FP32"),
           tensor("pixels", np.full((1, 3, size, size), np.inf, np.float32), "FP32"),
           tensor("image", np.array([b"not an image"], dtype=object), "BYTES")]  # fmt: skip
    calls = []
    for i in range(48):
        if i % 2:
            calls.append(("bad", c.async_infer(IMAGE_MODEL, [bad[i % 3]], headers=key())))
        else:
            k = i % 4
            inp = tensor("image", np.array([blobs[k]], dtype=object), "BYTES")
            calls.append((k, c.async_infer(IMAGE_MODEL, [inp], headers=key())))
    for what, call in calls:
        if what == "bad":
            with pytest.raises(InferenceServerException) as err:
                call.get_result()
            assert err.value.status() in ("400", "415", "422")
        else:
            check_answer(call.get_result(), expected[what : what + 1], labels)
    c.close()


def test_a_shape_of_100000_dimensions_is_refused_fast_while_a_good_call_is_answered(image_server, image_run):
    """A V2 shape is checked against the model's declared input, rank first: a `shape` of 100,000 large
    dimensions (whose product alone took a worker's event loop about a second) is a 422 in well under 50 ms
    of server time, and a good call sent at the same moment to the same server gets its normal answer."""
    import concurrent.futures
    import time

    blobs, labels = test_images(image_run, 1), image_run.splits.labels
    expected = rest_image_probs(image_server, blobs, labels)
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [999_999] * 100_000,
                                   "data": [0.0]}]}).encode()  # fmt: skip
    url = f"{image_server.url}/v2/models/{IMAGE_MODEL}/infer"

    def hostile() -> tuple[requests.Response, float]:
        start = time.perf_counter()
        r = requests.post(url, data=body, headers={**key(), "content-type": "application/json"}, timeout=30)
        return r, time.perf_counter() - start

    def good():
        inp = tensor("image", np.array([blobs[0]], dtype=object), "BYTES")
        return client(image_server).infer(IMAGE_MODEL, [inp], headers=key())

    before = len(_v2_lines(image_server, 422))
    hostile()  # one call first: the connection and the worker's first JSON parse out of the timing
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad, ok = pool.submit(hostile), pool.submit(good)
        (r, seconds), answer = bad.result(), ok.result()
    assert r.status_code == 422 and r.json()["reason"] == "wrong_shape", r.text
    assert len(r.content) < 300  # the shape is not echoed back
    # The server's own time for the call (the access log's, without the 0.7 MB upload) is what must be small;
    # the client-side time bounds it from above.
    assert seconds < 0.5, seconds
    from tests.polling import wait_for

    lines = wait_for(lambda: (found := _v2_lines(image_server, 422)[before:]) and len(found) >= 2 and found, 10)
    assert lines and len(lines) >= 2, "the two refusals' access-log lines were not written"
    served = max(float(line["latency_ms"]) for line in lines)
    assert served < 50, served
    check_answer(answer, expected, labels)


def _v2_lines(server, status: int) -> list[dict]:
    """The access-log lines of V2 infer calls that answered `status`, in order."""
    lines = [json.loads(x) for x in server.log_path.read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("status") == status and x.get("path", "").endswith("/infer")]
