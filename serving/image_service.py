"""Image classification service.

`bentoml serve serving.image_service:ImageClassifier` starts the public API (validation,
decoding and pre-processing per request, FastAPI routes inside BentoML) and the model service
it depends on (ONNX Runtime behind BentoML's adaptive batching), as separate processes.
"""

from __future__ import annotations

import base64
import binascii
import time

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile

from servable.config import ImageServeSettings
from servable.preprocessing import InvalidImage, preprocess_image
from serving import frontend, metrics, schemas
from serving.audit import set_model_tag
from serving.errors import ClientError
from serving.feedback.hook import FeedbackHook
from serving.loading import ServedModel
from serving.onnx_runtime import softmax

SETTINGS = ImageServeSettings()
TASK = "image-classification"
BATCH = (
    {"batchable": True, "max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms}
    if SETTINGS.batching_enabled()
    else {}
)


@bentoml.service(name="image_model", workers=SETTINGS.workers, **frontend.service_config(SETTINGS))
class ImageModel:
    """ONNX Runtime over a batch of pre-processed images -> class probabilities."""

    def __init__(self) -> None:
        self.model = ServedModel(SETTINGS, TASK, with_session=True)
        if self.model.ready:
            prep = self.model.manifest.image_preprocessing
            self.input_name = prep.input_name
            self.model.warm_up(lambda n: np.zeros((n, 3, prep.size, prep.size), np.float32), self._run)

    def __is_ready__(self) -> bool:
        return self.model.ready

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self.model.session.run(["logits"], {self.input_name: pixels})[0]
        metrics.MODEL_SECONDS.labels(model=self.model.name).observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(model=self.model.name).observe(len(pixels))
        return softmax(logits)

    @bentoml.api
    def runtime(self) -> dict:
        """The execution provider this worker really uses (CUDA can fall back to CPU)."""
        return self.model.runtime()

    @bentoml.api(**BATCH)
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        if not self.model.ready:
            raise bentoml.exceptions.ServiceUnavailable(f"model not ready: {self.model.error}")
        return self._run(pixels.astype(np.float32, copy=False))


app = FastAPI(
    title="Servable image classifier",
    description="Top-k image classification (ONNX Runtime behind BentoML adaptive batching). "
    "Inference endpoints need an API key (x-api-key header or Bearer token).",
)  # fmt: skip
_instance: ImageClassifier | None = None

B64 = {"type": "string", "description": "base64-encoded image (JPEG, PNG, ...)"}
CLASSIFY_BODY = schemas.json_body(
    {"type": "object", "properties": {"image": B64, "images": {"type": "array", "items": B64, "minItems": 1},
                                      "top_k": {"type": "integer", "minimum": 1}}},
    ("multipart/form-data", {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one or more image files (JPEG, PNG, ...)"},
        "top_k": {"type": "integer", "minimum": 1}}}),
)  # fmt: skip
ERRORS = (400, 401, 413, 415, 422, 429, 503, 504)
V2_ERRORS = (400, 401, 404, 413, 415, 422, 429, 503, 504)


@bentoml.service(name="image_classifier", **frontend.service_config(SETTINGS))
@bentoml.asgi_app(app)
class ImageClassifier:
    model_service = bentoml.depends(ImageModel)

    def __init__(self) -> None:
        global _instance
        self.front = ServedModel(SETTINGS, TASK, with_session=False)
        set_model_tag("image_classifier", self.front.art.tag if self.front.ready else SETTINGS.model_tag)
        if self.front.ready:
            self.feedback = FeedbackHook(
                self.front.name, self.front.manifest.labels, "image", max_pixels=SETTINGS.max_pixels
            )
        _instance = self

    def __is_ready__(self) -> bool:
        return self.front.ready

    async def is_ready(self) -> bool:
        return self.front.ready and await frontend.dependency_ready(self.model_service)

    # ---------------------------------------------------------------- pre-processing

    def _decode_all(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            raise ClientError(400, "no_image", "send at least one image")
        if len(blobs) > SETTINGS.max_items:
            raise ClientError(413, "too_many_items", f"at most {SETTINGS.max_items} images per request")
        prep = self.front.manifest.image_preprocessing
        out = []
        for i, blob in enumerate(blobs):
            try:
                out.append(preprocess_image(blob, prep, max_pixels=SETTINGS.max_pixels))
            except InvalidImage as exc:
                status = 413 if exc.reason == "too_many_pixels" else 400
                raise ClientError(status, exc.reason, f"image {i}: {exc}") from exc
        return np.stack(out)

    async def _read_request(self, request: Request) -> tuple[list[bytes], int]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=SETTINGS.max_items + 1, max_fields=8)
            except Exception as exc:
                raise ClientError(400, "invalid_multipart", f"the multipart body could not be parsed: {exc}") from exc
            files = [f for key in ("image", "images") for f in form.getlist(key) if isinstance(f, UploadFile)]
            blobs = [await f.read() for f in files]
            top_k = form.get("top_k", SETTINGS.top_k)
        else:
            body = await frontend.json_body(request)
            if not isinstance(body, dict):
                raise ClientError(422, "invalid_field", "the JSON body must be an object with image or images")
            items = body.get("images", [body["image"]] if "image" in body else [])
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ClientError(422, "invalid_field", "images must be a list of base64 strings")
            if len(items) > SETTINGS.max_items:
                raise ClientError(413, "too_many_items", f"at most {SETTINGS.max_items} images per request")
            blobs = []
            for i, item in enumerate(items):
                try:
                    blobs.append(base64.b64decode(item.split(",", 1)[-1], validate=True))
                except (binascii.Error, ValueError) as exc:
                    raise ClientError(400, "invalid_base64", f"image {i} is not valid base64") from exc
            top_k = body.get("top_k", SETTINGS.top_k)
        try:
            top_k = int(top_k)
        except (TypeError, ValueError) as exc:
            raise ClientError(422, "invalid_field", "top_k must be an integer") from exc
        if top_k < 1:
            raise ClientError(422, "invalid_field", "top_k must be at least 1")
        return blobs, min(top_k, len(self.front.manifest.labels))

    async def _predict(self, request: Request, pixels: np.ndarray, blobs: list):
        call = lambda: self.model_service.to_async.predict(pixels)  # noqa: E731
        return await frontend.predict(self.front, call, self.feedback, request.headers, blobs)

    # ---------------------------------------------------------------- routes

    @app.post("/classify", tags=["image"], openapi_extra=CLASSIFY_BODY,
              responses=schemas.responses(schemas.ClassifyResponse, *ERRORS))  # fmt: skip
    async def classify(self, request: Request):
        """Classify one or more images (multipart files, or base64 strings in JSON); top-k labels each."""
        if not self.front.ready:
            return frontend.not_ready(self.front)
        start = time.perf_counter()
        try:
            blobs, top_k = await self._read_request(request)
            pixels = self._decode_all(blobs)
        except ClientError as err:
            return frontend.rejected(self.front, err)
        metrics.PREPROCESS_SECONDS.labels(model=self.front.name).observe(time.perf_counter() - start)
        probs = await self._predict(request, pixels, blobs)
        if not isinstance(probs, np.ndarray):
            return probs
        labels = self.front.manifest.labels
        order = np.argsort(-probs, axis=1)[:, :top_k]
        return {
            "model": self.front.art.tag, "variant": SETTINGS.variant,
            "predictions": [{"label": labels[row[0]], "probability": round(float(p[row[0]]), 6),
                             "top_k": [{"label": labels[j], "probability": round(float(p[j]), 6)} for j in row]}
                            for row, p in zip(order, probs, strict=True)],
        }  # fmt: skip

    @app.get("/info", tags=["image"])
    async def info(self) -> dict:
        """Model tag, labels, provider in use, quantised or not, batching settings."""
        runtime = await frontend.model_runtime(self.model_service)
        return {**self.front.info(), **runtime, "service": "image_classifier"}

    # ---------------------------------------------------------------- Open Inference Protocol (V2)

    def _v2_io(self) -> tuple[list[dict], list[dict]]:
        s = self.front.manifest.image_preprocessing.size
        return ([{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, s, s]},
                 {"name": "image", "datatype": "BYTES", "shape": [-1]}],
                [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.front.manifest.labels)]},
                 {"name": "label", "datatype": "BYTES", "shape": [-1]}])  # fmt: skip

    def _known(self, name: str):
        return frontend.v2_model_error(self.front, name)

    @app.get("/v2/models/{name}", tags=["v2"], responses=schemas.responses(schemas.V2ModelMetadata, *V2_ERRORS))
    async def v2_model(self, name: str):
        if (err := self._known(name)) is not None:
            return err
        return frontend.v2_metadata(self.front, *self._v2_io())

    @app.get("/v2/models/{name}/ready", tags=["v2"], responses=schemas.responses(schemas.V2ModelReady, *V2_ERRORS))
    async def v2_model_ready(self, name: str):
        return self._known(name) or {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", tags=["v2"], responses=schemas.responses(schemas.V2InferResponse, *V2_ERRORS),
              openapi_extra=schemas.v2_infer_body([
                  {"name": "image", "datatype": "BYTES", "items": B64},
                  {"name": "pixels", "datatype": "FP32", "items": {"type": "number"}}]))  # fmt: skip
    async def v2_infer(self, name: str, request: Request):
        """V2 infer: FP32 `pixels` [N,3,S,S] (pre-processed) or BYTES `image` [N] (base64 images)."""
        if (err := self._known(name)) is not None:
            return err
        s = self.front.manifest.image_preprocessing.size
        blobs: list[bytes] | None = None  # pre-processed pixels are not a storable image
        try:
            inputs, rid = frontend.v2_request_inputs(await frontend.json_body(request))
            if len(inputs) != 1:
                raise ClientError(422, "invalid_v2", "send exactly one input: pixels or image")
            tname, _, shape, data = frontend.v2_tensor(inputs[0], {"pixels": "FP32", "image": "BYTES"})
            if tname == "pixels":
                if len(shape) != 4 or shape[1:] != [3, s, s]:
                    raise ClientError(422, "wrong_shape", f"pixels must have shape [N, 3, {s}, {s}], got {shape}")
                if shape[0] > SETTINGS.max_items:
                    raise ClientError(413, "too_many_items", f"at most {SETTINGS.max_items} images per request")
                try:
                    pixels = np.asarray(data, dtype=np.float32).reshape(shape)
                except (TypeError, ValueError) as exc:
                    raise ClientError(422, "wrong_datatype", "pixels must be numbers") from exc
                if not np.isfinite(pixels).all():
                    raise ClientError(422, "non_finite", "pixels must be finite numbers")
            else:
                if len(shape) != 1 or not all(isinstance(x, str) for x in data):
                    raise ClientError(422, "wrong_shape", "image must be a [N] BYTES tensor of base64 strings")
                try:
                    blobs = [base64.b64decode(x, validate=True) for x in data]
                except (binascii.Error, ValueError) as exc:
                    raise ClientError(400, "invalid_base64", "image data must be base64") from exc
                pixels = self._decode_all(blobs)
        except ClientError as err:
            return frontend.rejected(self.front, err)
        probs = await self._predict(request, pixels, blobs or [None] * len(pixels))
        if not isinstance(probs, np.ndarray):
            return probs
        return frontend.v2_response(self.front, probs, rid)


frontend.v2_health_routes(app, lambda: _instance)
frontend.install_middleware(ImageClassifier, SETTINGS, "image_classifier")
