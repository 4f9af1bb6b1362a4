"""Image classification: multipart files, a raw image/* body or base64 JSON -> top-k labels."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from servable import explain
from servable.config import SERVED_MODELS, ImageServeSettings
from servable.preprocessing import InvalidImage, decode_image, preprocess_image
from serving import metrics, schemas
from serving.adapters.base import Parsed, TaskAdapter
from serving.errors import ClientError
from serving.onnx_runtime import softmax
from serving.request_body import content_type, json_body

B64 = {"type": "string", "description": "base64-encoded image (JPEG, PNG, ...)"}
RAW_IMAGE = {"type": "string", "format": "binary", "description": "one image file as the whole body"}
# Options read from the query string, a form field or the JSON body; the proxy lets through only
# the query options SERVED_MODELS declares (explain reads them all, predict only top_k).
EXPLAIN_OPTIONS = SERVED_MODELS["image"].query_options
PREDICT_OPTIONS = ("top_k",)


def _b64(item: str, i: int) -> bytes:
    try:
        return base64.b64decode(item.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(400, "invalid_base64", f"image {i} is not valid base64") from exc


class ImageAdapter(TaskAdapter):
    kind = "image"
    task = "image-classification"
    service_name = SERVED_MODELS["image"].service_name
    model_service_name = SERVED_MODELS["image"].model_service_name
    summary = "Classify"
    doc = (
        "Classify one or more images (multipart files, a raw image/* body, or base64 strings in JSON); "
        "top-k labels each."
    )
    v2_doc = (
        "V2 infer: FP32 `pixels` [N,3,S,S] (pre-processed) or BYTES `image` [N] (image files: base64 strings in "
        "JSON, raw bytes as binary data); JSON or the binary tensor data extension."
    )
    route = SERVED_MODELS["image"].route
    title = "Servable image classifier"
    description = (
        "Top-k image classification (ONNX Runtime with adaptive batching). "
        "Inference endpoints need an API key (x-api-key header or Bearer token)."
    )
    response_model = schemas.ClassifyResponse
    explain_summary = "Classify Explain"
    explain_doc = (
        "Why the model answered, for one image: occlusion sensitivity from the served model (no gradients). "
        "`heatmap[i][j]` is how much the class's probability drops when patch (i, j) of a grid x grid "
        "partition is masked with the image's mean colour: positive = the patch supports the class. "
        "`overlay=true` adds the heatmap over the image as a PNG (base64), at the image's size."
    )
    explain_model = schemas.ImageExplainResponse
    wire_type = np.ndarray
    settings: ImageServeSettings

    def openapi_body(self) -> dict:
        multipart = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "one or more image files (JPEG, PNG, ...)"},
            "top_k": {"type": "integer", "minimum": 1}}}  # fmt: skip
        return schemas.json_body(
            {"type": "object", "properties": {"image": B64, "images": {"type": "array", "items": B64, "minItems": 1},
                                              "top_k": {"type": "integer", "minimum": 1}}},
            ("multipart/form-data", multipart), ("image/jpeg", RAW_IMAGE), ("image/png", RAW_IMAGE),
        )  # fmt: skip

    def v2_input_body(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "items": B64},
                {"name": "pixels", "datatype": "FP32", "items": {"type": "number"}}]  # fmt: skip

    def load(self, art) -> None:
        super().load(art)
        self.prep = art.manifest.image_preprocessing
        self.size = self.prep.size

    def _decode(self, blobs: list[bytes]) -> list[np.ndarray]:
        if not blobs:
            raise ClientError(400, "no_image", "send at least one image")
        if len(blobs) > self.settings.max_items:
            raise ClientError(413, "too_many_items", f"at most {self.settings.max_items} images per request")
        rows = []
        for i, blob in enumerate(blobs):
            try:
                rows.append(preprocess_image(blob, self.prep, max_pixels=self.settings.max_pixels))
            except InvalidImage as exc:
                status = 413 if exc.reason == "too_many_pixels" else 400
                raise ClientError(status, exc.reason, f"image {i}: {exc}") from exc
        return rows

    def _top_k(self, value: Any) -> int:
        try:
            top_k = int(value)
        except (TypeError, ValueError) as exc:
            raise ClientError(422, "invalid_field", "top_k must be an integer") from exc
        if top_k < 1:
            raise ClientError(422, "invalid_field", "top_k must be at least 1")
        return min(top_k, len(self.labels))

    async def _read(self, request: Request, fields: tuple[str, ...]) -> tuple[list[bytes], dict[str, Any]]:
        """The uploaded images and the option `fields` of any of the three body formats (query too)."""
        ctype = content_type(request)
        opts: dict[str, Any] = {k: request.query_params[k] for k in fields if k in request.query_params}
        if ctype.startswith("image/"):  # the cheapest upload: the file is the body
            blobs = [await request.body()]
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=self.settings.max_items + 1, max_fields=8)
            except Exception as exc:
                raise ClientError(400, "invalid_multipart", f"the multipart body could not be parsed: {exc}") from exc
            files = [f for key in ("image", "images") for f in form.getlist(key) if isinstance(f, UploadFile)]
            blobs = [await f.read() for f in files]
            opts.update({k: form[k] for k in fields if k in form})
        else:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise ClientError(422, "invalid_field", "the JSON body must be an object with image or images")
            items = body.get("images", [body["image"]] if "image" in body else [])
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ClientError(422, "invalid_field", "images must be a list of base64 strings")
            if len(items) > self.settings.max_items:
                raise ClientError(413, "too_many_items", f"at most {self.settings.max_items} images per request")
            blobs = [_b64(item, i) for i, item in enumerate(items)]
            opts.update({k: body[k] for k in fields if k in body})
        return blobs, opts

    async def parse(self, request: Request) -> Parsed:
        blobs, opts = await self._read(request, PREDICT_OPTIONS)
        top_k = self._top_k(opts.get("top_k", self.settings.top_k))
        return Parsed(self._decode(blobs), list(blobs), {"top_k": top_k})

    # ------------------------------------------------------------ explanations
    def openapi_explain_body(self) -> dict:
        options = {
            "grid": {"type": "integer", "minimum": 2, "maximum": self.settings.explain_max_grid,
                     "description": f"patches per side (default {self.settings.explain_grid})"},
            "overlay": {"type": "boolean", "description": "also return the heatmap over the image as a PNG"},
            "label": {"type": "string", "description": "explain this class instead of the top prediction"},
            "top_k": {"type": "integer", "minimum": 1},
        }  # fmt: skip
        multipart = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "one image file"}, **options}}  # fmt: skip
        return schemas.json_body(
            {"type": "object", "required": ["image"], "properties": {"image": B64, **options}},
            ("multipart/form-data", multipart),
            ("image/jpeg", RAW_IMAGE),
            ("image/png", RAW_IMAGE),
        )

    def _option_int(self, value: Any, name: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ClientError(422, "invalid_field", f"{name} must be an integer")
        try:
            number = int(value)
        except ValueError as exc:
            raise ClientError(422, "invalid_field", f"{name} must be an integer") from exc
        if not low <= number <= high:
            raise ClientError(422, "invalid_field", f"{name} must be between {low} and {high}")
        return number

    async def parse_explain(self, request: Request) -> Parsed:
        blobs, opts = await self._read(request, EXPLAIN_OPTIONS)
        if len(blobs) != 1:
            raise ClientError(400 if not blobs else 413, "no_image" if not blobs else "too_many_items",
                              "send exactly one image to explain")  # fmt: skip
        try:
            image = decode_image(blobs[0], max_pixels=self.settings.max_pixels)
        except InvalidImage as exc:
            raise ClientError(413 if exc.reason == "too_many_pixels" else 400, exc.reason, f"image 0: {exc}") from exc
        overlay = opts.get("overlay", False)
        if isinstance(overlay, str) and overlay.lower() in ("true", "false", "1", "0"):
            overlay = overlay.lower() in ("true", "1")
        if not isinstance(overlay, bool):
            raise ClientError(422, "invalid_field", "overlay must be true or false")
        options = {
            "top_k": self._top_k(opts.get("top_k", self.settings.top_k)),
            "grid": self._option_int(opts.get("grid", self.settings.explain_grid), "grid", 2,
                                     self.settings.explain_max_grid),
            "overlay": overlay, "target": self.target(opts.get("label")),
            "image": image if overlay else None,  # sent to the explain process only when it is drawn on
        }  # fmt: skip
        return Parsed([preprocess_image(image, self.prep)], [None], options)

    def explain_rows(self, parsed: Parsed) -> list[np.ndarray]:
        return list(explain.occluded_images(parsed.rows[0], parsed.options["grid"]))

    def explanation(self, parsed: Parsed, probs: np.ndarray) -> dict:
        opts = parsed.options
        target = int(probs[0].argmax()) if opts["target"] is None else opts["target"]
        heat = explain.image_heatmap(probs, target, opts["grid"])
        found = {
            "method": "occlusion", "label": self.labels[target], "probability": round(float(probs[0, target]), 6),
            "grid": opts["grid"], "heatmap": np.round(heat.astype(np.float64), 6).tolist(), "rows": len(probs),
        }  # fmt: skip
        if opts["overlay"]:
            png, size = explain.overlay_png(opts["image"], heat, self.settings.explain_overlay_max_pixels)
            found["overlay_png"] = base64.b64encode(png).decode()
            found["overlay_size"] = list(size)
        return {"prediction": self.answer(probs[:1], parsed)[0], "explanation": found}

    def v2_inputs(self) -> list[dict]:
        s = self.size
        return [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, s, s]},
                {"name": "image", "datatype": "BYTES", "shape": [-1]}]  # fmt: skip

    def parse_v2(self, name: str, shape: list[int], data: np.ndarray | list) -> Parsed:
        s = self.size
        if name == "pixels":
            if len(shape) != 4 or shape[1:] != [3, s, s]:
                raise ClientError(422, "wrong_shape", f"pixels must have shape [N, 3, {s}, {s}], got {shape}")
            if not np.isfinite(data).all():
                raise ClientError(422, "non_finite", "pixels must be finite numbers")
            return Parsed(list(data), [None] * len(data))  # pre-processed pixels are not a storable image
        if len(shape) != 1:
            raise ClientError(422, "wrong_shape", f"image must be a [N] BYTES tensor, got shape {shape}")
        # Binary BYTES elements are the image files; JSON ones are base64 strings (JSON cannot carry bytes).
        blobs = [x if isinstance(x, bytes) else _b64(x, i) for i, x in enumerate(data)]
        return Parsed(self._decode(blobs), list(blobs))

    def answer(self, probs: np.ndarray, parsed: Parsed) -> list[dict]:
        labels, top_k = self.labels, parsed.options.get("top_k", self.settings.top_k)
        order = np.argsort(-probs, axis=1)[:, :top_k]
        return [{"label": labels[row[0]], "probability": round(float(p[row[0]]), 6),
                 "top_k": [{"label": labels[j], "probability": round(float(p[j]), 6)} for j in row]}
                for row, p in zip(order, probs, strict=True)]  # fmt: skip

    def to_wire(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

    def feedback_kwargs(self) -> dict:
        return {"max_pixels": self.settings.max_pixels}

    def run(self, session, rows) -> np.ndarray:
        pixels = np.stack(rows).astype(np.float32, copy=False)
        logits = session.run(["logits"], {self.prep.input_name: pixels})[0]
        metrics.BATCH_SIZE.labels(model=self.manifest.name).observe(len(pixels))
        return softmax(logits)

    def warmup_rows(self, n: int) -> list[np.ndarray]:
        return list(np.zeros((n, 3, self.size, self.size), np.float32))
