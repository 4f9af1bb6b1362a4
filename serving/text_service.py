"""Sentiment service.

`bentoml serve serving.text_service:SentimentClassifier` starts the public API (validation and
tokenisation per request with the tokenizer shipped in the artifact) and the model service
(ONNX Runtime behind BentoML's adaptive batching, with length buckets so a batch of short and
long texts does not pay for padding everything to its longest member).
"""

from __future__ import annotations

import time
import unicodedata

import bentoml
import numpy as np
from fastapi import FastAPI, Request

from servable.config import TextServeSettings
from servable.preprocessing import load_tokenizer, pad_encodings
from serving import frontend, metrics, schemas
from serving.audit import set_model_tag
from serving.errors import ClientError
from serving.feedback.hook import FeedbackHook
from serving.loading import ServedModel
from serving.onnx_runtime import softmax

SETTINGS = TextServeSettings()
TASK = "text-classification"
BATCH = (
    {"batchable": True, "max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms}
    if SETTINGS.batching_enabled()
    else {}
)


def length_buckets(lengths: list[int], max_waste: float) -> list[list[int]]:
    """Group indices of similar length so that padding stays under `max_waste` of each group."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = []
    current: list[int] = []
    for i in order:
        candidate = [*current, i]
        longest = lengths[i]  # sorted ascending: the newest is the longest
        waste = 1 - sum(lengths[j] for j in candidate) / (longest * len(candidate))
        if current and waste > max_waste:
            buckets.append(current)
            candidate = [i]
        current = candidate
    if current:
        buckets.append(current)
    return buckets


@bentoml.service(name="sentiment_model", workers=SETTINGS.workers, **frontend.service_config(SETTINGS))
class SentimentModel:
    """ONNX Runtime over a batch of token-id lists -> class probabilities."""

    def __init__(self) -> None:
        self.model = ServedModel(SETTINGS, TASK, with_session=True)
        if self.model.ready:
            self.prep = self.model.manifest.text_preprocessing
            self.model.warm_up(lambda n: [[1] * 16] * n, self._run_all)  # any in-vocabulary ids

    def __is_ready__(self) -> bool:
        return self.model.ready

    def _run(self, ids: list[list[int]]) -> np.ndarray:
        feeds = pad_encodings(ids, [[0] * len(x) for x in ids], self.prep)
        start = time.perf_counter()
        logits = self.model.session.run(["logits"], feeds)[0]
        metrics.MODEL_SECONDS.labels(model=self.model.name).observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(model=self.model.name).observe(len(ids))
        mask = feeds["attention_mask"]
        metrics.PADDING_RATIO.labels(model=self.model.name).observe(float(1 - mask.mean()))
        return softmax(logits)

    def _run_all(self, ids: list[list[int]]) -> np.ndarray:
        if not SETTINGS.length_buckets:
            return self._run(ids)
        out = np.empty((len(ids), len(self.model.manifest.labels)), np.float32)
        for bucket in length_buckets([len(x) for x in ids], SETTINGS.bucket_waste):
            out[bucket] = self._run([ids[i] for i in bucket])
        return out

    @bentoml.api
    def runtime(self) -> dict:
        """The execution provider this worker really uses (CUDA can fall back to CPU)."""
        return self.model.runtime()

    @bentoml.api(**BATCH)
    def predict(self, token_ids: list[list[int]]) -> np.ndarray:
        if not self.model.ready:
            raise bentoml.exceptions.ServiceUnavailable(f"model not ready: {self.model.error}")
        return self._run_all(token_ids)


app = FastAPI(
    title="Servable sentiment classifier",
    description="Sentiment of English texts (MiniLM BERT, ONNX Runtime behind BentoML adaptive batching). "
    "Inference endpoints need an API key (x-api-key header or Bearer token).",
)  # fmt: skip
_instance: SentimentClassifier | None = None

TEXT = {"type": "string", "minLength": 1, "maxLength": SETTINGS.max_text_chars, "pattern": r"\S"}
SENTIMENT_BODY = schemas.json_body({"oneOf": [
    {"type": "object", "required": ["text"], "properties": {"text": TEXT}, "additionalProperties": False},
    {"type": "object", "required": ["texts"], "additionalProperties": False, "properties": {
        "texts": {"type": "array", "minItems": 1, "maxItems": SETTINGS.max_items, "items": TEXT}}},
]})  # fmt: skip
ERRORS = (400, 401, 413, 415, 422, 429, 503, 504)
V2_ERRORS = (400, 401, 404, 413, 415, 422, 429, 503, 504)


def check_text(i: int, text: object) -> str:
    if not isinstance(text, str):
        raise ClientError(422, "invalid_field", f"text {i} must be a string")
    if not text.strip():
        raise ClientError(422, "empty_text", f"text {i} is empty")
    if len(text) > SETTINGS.max_text_chars:
        raise ClientError(413, "text_too_long", f"text {i} has {len(text)} characters; limit {SETTINGS.max_text_chars}")
    if not text.isascii():
        try:
            text.encode("utf-8")  # JSON can carry lone surrogates ("\ud800") that no tokenizer accepts
        except UnicodeEncodeError as exc:
            raise ClientError(422, "invalid_unicode", f"text {i} is not valid Unicode (lone surrogate)") from exc
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        raise ClientError(422, "control_characters", f"text {i} contains control characters")
    return text


@bentoml.service(name="sentiment_classifier", **frontend.service_config(SETTINGS))
@bentoml.asgi_app(app)
class SentimentClassifier:
    model_service = bentoml.depends(SentimentModel)

    def __init__(self) -> None:
        global _instance
        self.front = ServedModel(SETTINGS, TASK, with_session=False)
        if self.front.ready:
            prep = self.front.manifest.text_preprocessing
            self.tokenizer = load_tokenizer(self.front.art.file(prep.tokenizer_file), prep)
            self.feedback = FeedbackHook(self.front.name, self.front.manifest.labels, "text")
        set_model_tag("sentiment_classifier", self.front.art.tag if self.front.ready else SETTINGS.model_tag)
        _instance = self

    def __is_ready__(self) -> bool:
        return self.front.ready

    async def is_ready(self) -> bool:
        return self.front.ready and await frontend.dependency_ready(self.model_service)

    def _tokenize(self, texts: list) -> list[list[int]]:
        if not texts:
            raise ClientError(422, "no_text", "send text or a non-empty texts list")
        if len(texts) > SETTINGS.max_items:
            raise ClientError(413, "too_many_items", f"at most {SETTINGS.max_items} texts per request")
        checked = [check_text(i, t) for i, t in enumerate(texts)]
        return [e.ids for e in self.tokenizer.encode_batch(checked)]

    async def _predict(self, request: Request, ids: list[list[int]], texts: list[str]):
        call = lambda: self.model_service.to_async.predict(ids)  # noqa: E731
        return await frontend.predict(self.front, call, self.feedback, request.headers, texts)

    def _answer(self, probs: np.ndarray) -> list[dict]:
        labels = self.front.manifest.labels
        return [{"label": labels[int(p.argmax())], "probability": round(float(p.max()), 6),
                 "scores": {lab: round(float(v), 6) for lab, v in zip(labels, p, strict=True)}}
                for p in probs]  # fmt: skip

    @app.post("/sentiment", tags=["sentiment"], openapi_extra=SENTIMENT_BODY,
              responses=schemas.responses(schemas.SentimentResponse, *ERRORS))  # fmt: skip
    async def sentiment(self, request: Request):
        """Sentiment of one text (`text`) or several (`texts`): label, probability and scores each."""
        if not self.front.ready:
            return frontend.not_ready(self.front)
        start = time.perf_counter()
        try:
            body = await frontend.json_body(request)
            if not isinstance(body, dict) or ("text" in body) == ("texts" in body):
                raise ClientError(422, "invalid_field", "send an object with either text or texts")
            texts = [body["text"]] if "text" in body else body["texts"]
            if not isinstance(texts, list):
                raise ClientError(422, "invalid_field", "texts must be a list of strings")
            ids = self._tokenize(texts)
        except ClientError as err:
            return frontend.rejected(self.front, err)
        metrics.PREPROCESS_SECONDS.labels(model=self.front.name).observe(time.perf_counter() - start)
        probs = await self._predict(request, ids, texts)
        if not isinstance(probs, np.ndarray):
            return probs
        return {"model": self.front.art.tag, "variant": SETTINGS.variant, "predictions": self._answer(probs)}

    @app.get("/info", tags=["sentiment"])
    async def info(self) -> dict:
        """Model tag, labels, provider in use, quantised or not, batching settings."""
        runtime = await frontend.model_runtime(self.model_service)
        return {**self.front.info(), **runtime, "service": "sentiment_classifier",
                "max_text_chars": SETTINGS.max_text_chars, "length_buckets": SETTINGS.length_buckets}  # fmt: skip

    # ---------------------------------------------------------------- Open Inference Protocol (V2)

    def _known(self, name: str):
        return frontend.v2_model_error(self.front, name)

    @app.get("/v2/models/{name}", tags=["v2"], responses=schemas.responses(schemas.V2ModelMetadata, *V2_ERRORS))
    async def v2_model(self, name: str):
        if (err := self._known(name)) is not None:
            return err
        n = len(self.front.manifest.labels)
        return frontend.v2_metadata(self.front, [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                                    [{"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
                                     {"name": "label", "datatype": "BYTES", "shape": [-1]}])  # fmt: skip

    @app.get("/v2/models/{name}/ready", tags=["v2"], responses=schemas.responses(schemas.V2ModelReady, *V2_ERRORS))
    async def v2_model_ready(self, name: str):
        return self._known(name) or {"name": name, "ready": True}

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        responses=schemas.responses(schemas.V2InferResponse, *V2_ERRORS),
        openapi_extra=schemas.v2_infer_body([{"name": "text", "datatype": "BYTES", "items": TEXT}]),
    )
    async def v2_infer(self, name: str, request: Request):
        """V2 infer: BYTES `text` tensor of shape [N] (UTF-8 strings)."""
        if (err := self._known(name)) is not None:
            return err
        try:
            inputs, rid = frontend.v2_request_inputs(await frontend.json_body(request))
            if len(inputs) != 1:
                raise ClientError(422, "invalid_v2", "send exactly one input: text")
            _, _, shape, data = frontend.v2_tensor(inputs[0], {"text": "BYTES"})
            if len(shape) != 1:
                raise ClientError(422, "wrong_shape", f"text must have shape [N], got {shape}")
            ids = self._tokenize(data)
        except ClientError as err:
            return frontend.rejected(self.front, err)
        probs = await self._predict(request, ids, data)
        if not isinstance(probs, np.ndarray):
            return probs
        return frontend.v2_response(self.front, probs, rid)


frontend.v2_health_routes(app, lambda: _instance)
frontend.install_middleware(SentimentClassifier, SETTINGS, "sentiment_classifier")
