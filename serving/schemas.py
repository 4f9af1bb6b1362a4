"""OpenAPI shapes of the public routes, so the served schema is accurate and fuzzable.

The routes parse and validate the body themselves (clear 4xx with a reason, never BentoML's
default 500); these pydantic models only *describe* requests and answers in `/docs.json`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from serving.io_spec import Tensor
from serving.request_timing import DEADLINE_HEADER, MILLISECONDS


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, for a person")
    reason: str = Field(description="Machine-readable code, e.g. empty_text, too_many_items")


class ScoredLabel(BaseModel):
    label: str
    probability: float


class Answer(ScoredLabel):
    below_threshold: bool = Field(
        description="The probability (calibrated by the model's temperature) is below the model's abstention "
        "threshold: treat the answer as unsure (always false for a model without a threshold; /info shows it)"
    )


class ImagePrediction(Answer):
    top_k: list[ScoredLabel]


class ClassifyResponse(BaseModel):
    model: str = Field(description="Model-store tag that answered (name:version)")
    variant: str
    predictions: list[ImagePrediction]


class TextPrediction(Answer):
    scores: dict[str, float]


class SentimentResponse(BaseModel):
    model: str = Field(description="Model-store tag that answered (name:version)")
    variant: str
    predictions: list[TextPrediction]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="absent when the output follows the JSON as binary data")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size of a binary output")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: Literal["onnxruntime"]
    inputs: list[V2TensorSpec]
    outputs: list[V2TensorSpec]
    parameters: dict[str, Any]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


def responses(ok: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=`: the 200 answer and the error statuses a route can give, with their bodies.

    Documented rather than declared as `response_model`, so FastAPI does not re-filter the answers.
    """
    meaning = {
        400: "bad body or image", 401: "missing or invalid API key", 404: "unknown model name",
        413: "body, image, text or item count too large", 415: "unsupported content type",
        422: "wrong field types or values",
        429: "too many requests in flight, or the answer predicted after the request's deadline",
        503: "model not ready or overloaded", 504: "request timed out",
    }  # fmt: skip
    return {200: {"description": "OK", "model": ok},
            **{code: {"description": meaning[code], "model": ErrorBody} for code in codes}}  # fmt: skip


DEADLINE_PARAMETER = {
    "name": DEADLINE_HEADER, "in": "header", "required": False,
    "description": "Milliseconds, from when the route starts reading the request, by which the answer is due "
    "(default: the model's max_latency_ms; at most the request timeout). A request the batcher predicts past it "
    "is refused at once: 429 would_miss_deadline with Retry-After.",
    "schema": {"type": "string", "pattern": f"^{MILLISECONDS.pattern}$"},
}  # fmt: skip
TIMING_HEADERS = {
    "Server-Timing": {"description": "Where the request's time went, in ms: decode, queue, model (split topology: "
                      "model_call), encode, total", "schema": {"type": "string"}},
    "x-batch-size": {"description": "Rows of the batch the request rode in (in-process topology)",
                     "schema": {"type": "integer"}},
}  # fmt: skip


def timed(openapi_extra: dict[str, Any], route_responses: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    """A prediction route's `openapi_extra` and `responses`: the deadline header, and the timing headers of its
    answers (serving/request_timing.py)."""
    route_responses[200]["headers"] = TIMING_HEADERS
    return {"openapi_extra": {**openapi_extra, "parameters": [DEADLINE_PARAMETER]}, "responses": route_responses}


def json_body(schema: dict[str, Any], *alternatives: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """`openapi_extra` for a required request body: JSON `schema`, plus other media types."""
    content = {"application/json": {"schema": schema}, **{m: {"schema": s} for m, s in alternatives}}
    return {"requestBody": {"required": True, "content": content}}


def v2_infer_body(inputs: list[Tensor], outputs: list[Tensor]) -> dict[str, Any]:
    """The V2 infer request: `inputs` holds one of the named typed tensors the model takes, as JSON data; or
    (binary tensor data extension) the JSON header, whose length a header gives, followed by the tensor's bytes."""
    tensor = {
        "oneOf": [
            {"type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
                "name": {"const": spec.name}, "datatype": {"const": spec.datatype},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": len(spec.shape),
                          "maxItems": len(spec.shape)},
                "data": {"type": "array", "minItems": 1, "items": spec.items}}}
            for spec in inputs
        ]
    }  # fmt: skip
    binary = {"type": "boolean", "description": "answer as binary data after the JSON header"}
    parameters = {"type": "object", "properties": {"binary_data": binary}}
    output = {"type": "object", "required": ["name"],
              "properties": {"name": {"enum": [t.name for t in outputs]}, "parameters": parameters}}  # fmt: skip
    body = json_body({
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"}, "inputs": {"type": "array", "minItems": 1, "maxItems": 1,
                                                            "items": tensor},
                       "outputs": {"type": "array", "items": output},
                       "parameters": {"type": "object", "properties": {"binary_data_output": binary}}},
    }, ("application/octet-stream", {"type": "string", "format": "binary", "description":
        "binary tensor data extension: the JSON request (its input with parameters.binary_data_size instead of "
        "data), then the tensor's bytes"}))  # fmt: skip
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "description": "length of the JSON part of a body that carries binary tensor data",
              "schema": {"type": "integer", "minimum": 1}}  # fmt: skip
    return {**body, "parameters": [header]}


def v2_infer_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses(V2InferResponse)`, and the binary answer (JSON header, then outputs asked for as binary)."""
    out = responses(V2InferResponse, *codes)
    out[200]["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return out


# ---------------------------------------------------------------- explanations (/classify/explain, /sentiment/explain)


class ImageExplanation(BaseModel):
    method: Literal["occlusion"]
    label: str = Field(description="The class explained (the top prediction unless `label` was asked)")
    probability: float
    grid: int
    heatmap: list[list[float]] = Field(description="grid x grid drops of the class's probability, row-major")
    rows: int = Field(description="Model rows the explanation ran (1 + grid²)")
    overlay_png: str | None = Field(None, description="base64 PNG: the heatmap over the image (overlay=true)")
    overlay_size: list[int] | None = Field(None, description="[width, height] of the overlay")


class ImageExplainResponse(BaseModel):
    model: str
    variant: str
    prediction: ImagePrediction
    explanation: ImageExplanation


class WordScore(BaseModel):
    word: str
    start: int = Field(description="Character offset of the word in the text")
    end: int
    score: float = Field(description="Drop of the class's probability with this word masked")


class TextExplanation(BaseModel):
    method: Literal["word_occlusion"]
    label: str
    probability: float
    rows: int = Field(description="Model rows the explanation ran (1 + words)")
    words: list[WordScore]


class TextExplainResponse(BaseModel):
    model: str
    variant: str
    prediction: TextPrediction
    explanation: TextExplanation
