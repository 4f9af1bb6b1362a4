"""Open Inference Protocol (KServe V2): request validation and answers, the same for every model."""

from __future__ import annotations

import numpy as np
from starlette.responses import JSONResponse

from serving.errors import ClientError, error_response


def unknown_model(served: str, name: str) -> JSONResponse | None:
    """404 for a V2 call naming a model this service does not serve; None when it serves `name`."""
    if name != served:
        return error_response(404, "unknown_model", f"no model named {name!r}; this service serves {served!r}")
    return None


def metadata(manifest, tag: str, inputs: list[dict]) -> dict:
    """Model metadata: the adapter's input tensors, and the outputs every classifier answers with."""
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(manifest.labels)]},
               {"name": "label", "datatype": "BYTES", "shape": [-1]}]  # fmt: skip
    return {"name": manifest.name, "versions": [manifest.version], "platform": "onnxruntime", "inputs": inputs,
            "outputs": outputs, "parameters": {"tag": tag, "labels": manifest.labels}}  # fmt: skip


def tensor(spec: object, datatypes: dict[str, str]) -> tuple[str, str, list[int], list]:
    """Validate one V2 input tensor: known name, matching datatype, shape and data length."""
    if not isinstance(spec, dict):
        raise ClientError(422, "invalid_v2", "each input must be an object with name, shape, datatype, data")
    name, dtype, shape, data = spec.get("name"), spec.get("datatype"), spec.get("shape"), spec.get("data")
    if name not in datatypes:
        raise ClientError(422, "unknown_input", f"unknown input {name!r}; this model takes {sorted(datatypes)}")
    if dtype != datatypes[name]:
        raise ClientError(422, "wrong_datatype", f"input {name} must have datatype {datatypes[name]}, got {dtype!r}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ClientError(422, "wrong_shape", f"input {name}: shape must be a list of positive integers")
    if not isinstance(data, list):
        raise ClientError(422, "invalid_v2", f"input {name}: data must be a (flat or nested) list")
    flat = np.asarray(data, dtype=object).ravel().tolist() if data and isinstance(data[0], list) else data
    if len(flat) != int(np.prod(shape)):
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {int(np.prod(shape))} values, "
                                              f"got {len(flat)}")  # fmt: skip
    return name, dtype, shape, flat


def request_input(body: object, inputs: list[dict]) -> tuple[str, list[int], list, str | None]:
    """The one input tensor of a V2 infer request, validated against the model's `inputs`, and the request id."""
    datatypes = {spec["name"]: spec["datatype"] for spec in inputs}
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ClientError(422, "invalid_v2", "a V2 infer request needs a non-empty `inputs` list")
    if len(body["inputs"]) != 1:
        raise ClientError(422, "invalid_v2", f"send exactly one input: {' or '.join(sorted(datatypes))}")
    name, _, shape, data = tensor(body["inputs"][0], datatypes)
    rid = body.get("id")
    return name, shape, data, rid if isinstance(rid, str) else None


def response(manifest, probs: np.ndarray, request_id: str | None) -> dict:
    labels = [manifest.labels[i] for i in probs.argmax(1)]
    out = {
        "model_name": manifest.name, "model_version": manifest.version,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.astype(float).ravel().round(6).tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
        ],
    }  # fmt: skip
    if request_id is not None:
        out["id"] = request_id
    return out
