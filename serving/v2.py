"""Open Inference Protocol (KServe V2) over HTTP, written once for every model.

An infer request carries its input tensor as JSON (`data`) or, with the binary tensor data extension
(tritonclient's default), as raw little-endian bytes after the JSON header, whose length the
`Inference-Header-Content-Length` header gives. Outputs are answered as JSON, or as binary after the
JSON header where the request asks for it (`parameters.binary_data_output`, an output's
`parameters.binary_data`). Everything is validated here, per request and before any batch: a mistake
is a 4xx `ClientError` that names it. Spec: the KServe "Open Inference Protocol" and Triton's
"Binary Tensor Data Extension".
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.errors import ClientError
from serving.io_spec import Tensor
from serving.request_body import content_type, parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
# tritonclient sends no Content-Type; a binary body is octet-stream; anything else is a client mistake.
MEDIA_TYPES = ("", "application/json", "application/octet-stream")
NUMPY = {"FP32": np.dtype("<f4")}  # the numeric input datatypes models take, as little-endian numpy types
# Parameters of other protocol extensions: refused by name rather than silently ignored.
UNSUPPORTED = {"shared_memory_region": "shared memory", "classification": "the classification extension",
               "sequence_id": "sequence batching"}  # fmt: skip


@dataclass
class InferRequest:
    """One validated V2 infer request: its input tensor, id and the outputs it wants (name -> binary)."""

    name: str
    shape: list[int]
    data: np.ndarray | list  # FP32: float32 array of `shape`; BYTES: flat list of str (JSON) or bytes (binary)
    id: str | None
    outputs: dict[str, bool]


def server_metadata() -> dict:
    try:
        served = version("servable")
    except PackageNotFoundError:  # run from a source tree that was never installed
        served = "unknown"
    return {"name": "servable", "version": served, "extensions": EXTENSIONS}


def check_model(manifest, name: str, model_version: str | None) -> None:
    """A 404 for a V2 call naming a model (or version) this service does not serve."""
    if name != manifest.name:
        raise ClientError(404, "unknown_model", f"no model named {name!r}; this service serves {manifest.name!r}")
    if model_version is not None and model_version != manifest.version:
        raise ClientError(404, "unknown_version", f"model {name!r} has no version {model_version!r}; "
                                                  f"this service serves version {manifest.version!r}")  # fmt: skip


def metadata(manifest, tag: str, inputs: list[Tensor], outputs: list[Tensor], preprocessing: dict) -> dict:
    """Model metadata: the declared input and output tensors, and the artifact's labels and pre-processing
    (what a client that sends pre-processed tensors must do)."""
    parameters = {"tag": tag, "labels": manifest.labels, "preprocessing": preprocessing}
    return {"name": manifest.name, "versions": [manifest.version], "platform": "onnxruntime",
            "inputs": [t.spec() for t in inputs], "outputs": [t.spec() for t in outputs],
            "parameters": parameters}  # fmt: skip


# ---------------------------------------------------------------- requests


async def read_request(request: Request, inputs: list[Tensor], outputs: list[Tensor], max_items: int) -> InferRequest:
    """The validated infer request of `request` (JSON or JSON + binary tensors); raises ClientError."""
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise ClientError(415, "unsupported_media_type", "compressed request bodies (Content-Encoding) are not "
                                                         "supported: send the body uncompressed")  # fmt: skip
    ctype = content_type(request)
    if ctype not in MEDIA_TYPES:
        allowed = "application/json, application/octet-stream (binary tensors) or no content type"
        raise ClientError(415, "unsupported_media_type", f"send {allowed}, not {ctype}")
    return parse_request(await request.body(), request.headers.get(HEADER_LENGTH), inputs, outputs, max_items)


def parse_request(raw: bytes, header_length: str | None, inputs: list[Tensor], outputs: list[Tensor],
                  max_items: int) -> InferRequest:  # fmt: skip
    """Validate a V2 infer body against the model's declared `inputs`: the one input tensor (name, datatype,
    rank and every fixed dimension), at most `max_items` in its batch dimension, the requested `outputs`
    and the request id."""
    head, binary = split_body(raw, header_length)
    body = parse_json(head)
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ClientError(422, "invalid_v2", "a V2 infer request needs a non-empty `inputs` list")
    declared = {t.name: t for t in inputs}
    if len(body["inputs"]) != 1:
        raise ClientError(422, "invalid_v2", f"send exactly one input: {' or '.join(sorted(declared))}")
    spec = body["inputs"][0]
    name, dtype, shape, params = tensor_header(spec, declared, max_items)
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if header_length is None:
            raise ClientError(400, "missing_header", f"input {name} has binary_data_size: send the "
                                                     f"{HEADER_LENGTH} header (the JSON part's length)")  # fmt: skip
        if not _count(size) or size != len(binary):
            raise ClientError(400, "invalid_binary", f"input {name} declares binary_data_size {size!r}, but "
                                                     f"{len(binary)} bytes follow the JSON header")  # fmt: skip
        data = from_binary(name, dtype, shape, binary)
    else:
        if binary:
            raise ClientError(400, "invalid_binary", f"{len(binary)} bytes follow the JSON header, but no input "
                                                     "declares binary_data_size")  # fmt: skip
        data = from_json(name, dtype, shape, spec.get("data"))
    rid = body.get("id")
    wanted = requested_outputs(body, tuple(t.name for t in outputs))
    return InferRequest(name, shape, data, rid if isinstance(rid, str) else None, wanted)


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary part) of a body, split at `Inference-Header-Content-Length` when given."""
    if header_length is None:
        return raw, b""
    if not re.fullmatch(r"[0-9]{1,15}", header_length.strip()):
        raise ClientError(400, "invalid_binary", f"{HEADER_LENGTH} must be a byte count, not {header_length!r}")
    n = int(header_length)
    if not 0 < n <= len(raw):
        raise ClientError(400, "invalid_binary", f"{HEADER_LENGTH} is {n}, but the body has {len(raw)} bytes")
    return raw[:n], raw[n:]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parameters(owner: dict, what: str) -> dict:
    params = owner.get("parameters", {})
    if not isinstance(params, dict):
        raise ClientError(422, "invalid_v2", f"parameters of {what} must be an object")
    for key, feature in UNSUPPORTED.items():
        if key in params:
            raise ClientError(400, "unsupported", f"{feature} ({key}) is not supported by this server")
    return params


def tensor_header(spec: object, declared: dict[str, Tensor], max_items: int) -> tuple[str, str, list[int], dict]:
    """Name, datatype, shape and parameters of one input tensor, checked against its declaration: the
    shape's rank before anything walks it, then each dimension (serving/io_spec.py::Tensor.check_shape)."""
    if not isinstance(spec, dict):
        raise ClientError(422, "invalid_v2", "each input must be an object with name, shape, datatype, data")
    name, dtype = spec.get("name"), spec.get("datatype")
    if not isinstance(name, str) or name not in declared:
        raise ClientError(422, "unknown_input", f"unknown input; this model takes {sorted(declared)}")
    tensor = declared[name]
    if dtype != tensor.datatype:
        raise ClientError(422, "wrong_datatype", f"input {name} must have datatype {tensor.datatype}")
    shape = tensor.check_shape(spec.get("shape"), max_items)
    return name, dtype, shape, _parameters(spec, f"input {name}")


def from_json(name: str, dtype: str, shape: list[int], data: object) -> np.ndarray | list:
    """A JSON tensor's `data` (flat or nested, row-major): float32 array of `shape`, or a flat list of strings."""
    if not isinstance(data, list):
        raise ClientError(422, "invalid_v2", f"input {name}: data must be a (flat or nested) list, or the tensor "
                                             "sent as binary data (parameters.binary_data_size)")  # fmt: skip
    count = math.prod(shape)
    if dtype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {count} values, got {len(flat)}")
        if not all(isinstance(x, str) for x in flat):
            raise ClientError(422, "wrong_datatype", f"input {name}: BYTES data in JSON must be strings")
        return flat
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise ClientError(422, "wrong_shape", f"input {name}: data is not a regular (non-ragged) array") from exc
    if values.dtype.kind not in "iuf":
        raise ClientError(422, "wrong_datatype", f"input {name}: {dtype} data must be numbers")
    if values.size != count:
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {count} values, got {values.size}")
    with np.errstate(over="ignore"):  # out of float32 range becomes inf: the adapter refuses non-finite values
        return values.astype(NUMPY[dtype]).reshape(shape)


def _flatten(data: list) -> list:
    out: list = []
    for x in data:  # nesting is bounded by the JSON depth guard
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def from_binary(name: str, dtype: str, shape: list[int], blob: bytes) -> np.ndarray | list[bytes]:
    """A binary tensor: little-endian values of `shape`, or BYTES elements (4-byte length, then the bytes)."""
    count = math.prod(shape)
    if dtype == "BYTES":
        return bytes_elements(name, shape, blob)
    need = count * NUMPY[dtype].itemsize
    if len(blob) != need:
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} of {dtype} needs {need} bytes, "
                                              f"got {len(blob)}")  # fmt: skip
    return np.frombuffer(blob, NUMPY[dtype]).reshape(shape)


def bytes_elements(name: str, shape: list[int], blob: bytes) -> list[bytes]:
    count, size, offset, out = math.prod(shape), len(blob), 0, []
    if size < 4 * count:  # every element has its 4-byte length: refused before a long loop
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {count} BYTES elements, "
                                              f"{size} bytes cannot hold them")  # fmt: skip
    while offset < size and len(out) <= count:
        if offset + 4 > size:
            raise ClientError(400, "invalid_binary", f"input {name}: truncated element length at byte {offset}")
        (n,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + n > size:
            raise ClientError(400, "invalid_binary", f"input {name}: element {len(out)} claims {n} bytes, "
                                                     f"{size - offset} are left")  # fmt: skip
        out.append(blob[offset : offset + n])
        offset += n
    if len(out) != count or offset != size:
        raise ClientError(422, "wrong_shape", f"input {name}: shape {shape} needs {count} BYTES elements, the "
                                              f"binary data holds {'more' if offset < size else len(out)}")  # fmt: skip
    return out


def requested_outputs(body: dict, outputs: tuple[str, ...]) -> dict[str, bool]:
    """Output name -> answer it as binary: all outputs unless `outputs` names some; binary where the output's
    `binary_data` says so, else as the request's `binary_data_output` says (default: JSON)."""
    default = _parameters(body, "the request").get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ClientError(422, "invalid_v2", "parameters.binary_data_output must be true or false")
    wanted = body.get("outputs") or [{"name": name} for name in outputs]
    if not isinstance(wanted, list):
        raise ClientError(422, "invalid_v2", "outputs must be a list of {name, parameters}")
    out: dict[str, bool] = {}
    for spec in wanted:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in outputs:
            raise ClientError(422, "unknown_output", f"unknown output; this model answers {list(outputs)}")
        binary = _parameters(spec, f"output {name}").get("binary_data", default)
        if not isinstance(binary, bool):
            raise ClientError(422, "invalid_v2", f"output {name}: parameters.binary_data must be true or false")
        out[name] = binary
    return out


# ---------------------------------------------------------------- answers


def response(manifest, outputs: dict[str, np.ndarray | list[str]], req: InferRequest) -> Response:
    """The infer answer from the head's output data (FP32 or bool arrays, or lists of strings): JSON, or the JSON
    header followed by the outputs asked for as binary."""
    tensors, blobs = [], []
    for name, binary in req.outputs.items():
        data = outputs[name]
        if isinstance(data, np.ndarray) and data.dtype == np.bool_:  # one byte per element, as the protocol says
            out = {"name": name, "datatype": "BOOL", "shape": list(data.shape)}
            blob = data.tobytes() if binary else b""
            values = None if binary else data.ravel().tolist()
        elif isinstance(data, np.ndarray):
            out: dict = {"name": name, "datatype": "FP32", "shape": list(data.shape)}
            blob = data.astype(NUMPY["FP32"]).tobytes() if binary else b""
            values = None if binary else data.astype(float).ravel().round(6).tolist()
        else:
            out = {"name": name, "datatype": "BYTES", "shape": [len(data)]}
            blob = b"".join(struct.pack("<I", len(e)) + e for e in map(str.encode, data)) if binary else b""
            values = None if binary else data
        if binary:
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values
        tensors.append(out)
    head: dict = {"model_name": manifest.name, "model_version": manifest.version, "outputs": tensors}
    if req.id is not None:
        head["id"] = req.id
    if not blobs:
        return JSONResponse(head)
    header = json.dumps(head, separators=(",", ":")).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})  # fmt: skip
