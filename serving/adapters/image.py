"""Image classification: multipart files, a raw image/* body or base64 JSON -> top-k labels."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request

from servable import drift_reference, explain
from servable.config import SERVED_MODELS, ImageServeSettings
from servable.preprocessing import (
    WEB_FORMATS,
    ImageLimits,
    InvalidImage,
    decode_image,
    open_image,
    preprocess_image,
    preprocess_opened,
)
from serving import schemas
from serving.adapters.base import Adapter, Docs, Parsed
from serving.adapters.explains import ExplainDocs, Explains
from serving.errors import ClientError
from serving.feedback.store import png_from_image_bytes
from serving.heads import ClassifierHead
from serving.io_spec import BATCH, Option, Tensor
from serving.request_body import content_type, json_body

FORMATS = ", ".join(WEB_FORMATS)
B64 = {"type": "string", "description": f"base64-encoded image ({FORMATS})"}
# An image this small (declared pixels, all of a request's together) is decoded on the event loop:
# well under a millisecond. Any larger goes to the worker's decode pool.
INLINE_PIXELS = 64 * 64 * 16
INLINE_BYTES = 64 * 1024
# What each refusal of an image is answered with (the reason says which bound).
STATUS = {"too_many_pixels": 413, "unsupported_format": 415, "bad_aspect_ratio": 422, "too_many_scans": 422}
RAW_IMAGE = {"type": "string", "format": "binary", "description": "one image file as the whole body"}


def _b64(item: object, i: int) -> bytes:
    if isinstance(item, bytes):  # a V2 binary element is the file itself
        return item
    if not isinstance(item, str):
        raise ClientError(422, "invalid_field", "images must be a list of base64 strings")
    try:
        return base64.b64decode(item.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(400, "invalid_base64", f"image {i} is not valid base64") from exc


@contextmanager
def refused(i: int) -> Iterator[None]:
    """An image's `InvalidImage` as the client's error, naming the image."""
    try:
        yield
    except InvalidImage as exc:
        raise ClientError(STATUS.get(exc.reason, 400), exc.reason, f"image {i}: {exc}") from exc


class ImageAdapter(Adapter, Explains):
    entry = SERVED_MODELS["image"]
    task = "image-classification"
    docs = Docs(
        title="Servable image classifier",
        description="Top-k image classification (ONNX Runtime with adaptive batching). "
        "Inference endpoints need an API key (x-api-key header or Bearer token).",
        summary="Classify",
        doc="Classify one or more images (multipart files, a raw image/* body, or base64 strings in JSON); "
        "top-k labels each.",
        v2_doc="V2 infer: FP32 `pixels` [N,3,S,S] (pre-processed) or BYTES `image` [N] (image files: base64 strings "
        "in JSON, raw bytes as binary data); JSON or the binary tensor data extension.",
        response_model=schemas.ClassifyResponse,
    )
    explain_docs = ExplainDocs(
        summary="Classify Explain",
        doc="Why the model answered, for one image: occlusion sensitivity from the served model (no gradients). "
        "`heatmap[i][j]` is how much the class's probability drops when patch (i, j) of a grid x grid "
        "partition is masked with the model's background (its training images'; the image's mean colour for "
        "an artifact without one): positive = the patch supports the class. "
        "`overlay=true` adds the heatmap over the image as a PNG (base64), at the image's size.",
        response_model=schemas.ImageExplainResponse,
    )
    wire_type = np.ndarray
    settings: ImageServeSettings
    size = 0  # the artifact's input size, once read
    # (items, their bytes, their opened images) that `inline` checked for the `decode` that follows it
    _checked: tuple[Any, list[bytes], list[Image.Image]] | None = None

    # ------------------------------------------------------------ load
    def load(self, art) -> None:
        super().load(art)
        self.prep = art.manifest.image_preprocessing
        self.size = self.prep.size
        s = self.settings
        self.limits = ImageLimits(max_pixels=s.max_pixels, max_side=s.max_image_side, max_aspect=s.max_aspect_ratio)

    def make_head(self, labels: list[str]) -> ClassifierHead:
        return ClassifierHead(labels, default_top_k=self.settings.top_k)

    def inputs(self) -> list[Tensor]:
        s = self.size
        return [Tensor("pixels", "FP32", (BATCH, 3, s, s), {"type": "number"}),
                Tensor("image", "BYTES", (BATCH,), B64)]  # fmt: skip

    def preprocessing(self) -> dict:
        return self.prep.model_dump()

    def openapi_body(self) -> dict:
        options = {o.name: o.schema() for o in self.options()}
        multipart = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"one or more image files ({FORMATS})"}, **options}}  # fmt: skip
        return schemas.json_body(
            {"type": "object", "properties": {"image": B64, "images": {"type": "array", "items": B64, "minItems": 1},
                                              **options}},
            ("multipart/form-data", multipart), ("image/jpeg", RAW_IMAGE), ("image/png", RAW_IMAGE),
        )  # fmt: skip

    # ------------------------------------------------------------ decode
    async def read(self, request: Request, options: tuple[str, ...]) -> tuple[str, list, dict[str, Any]]:
        """The uploaded images and the `options` of any of the three body formats (query too)."""
        ctype = content_type(request)
        opts: dict[str, Any] = {k: request.query_params[k] for k in options if k in request.query_params}
        if ctype.startswith("image/"):  # the cheapest upload: the file is the body
            blobs: list = [await request.body()]
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=self.settings.max_items + 1, max_fields=8)
            except Exception as exc:
                raise ClientError(400, "invalid_multipart", f"the multipart body could not be parsed: {exc}") from exc
            files = [f for key in ("image", "images") for f in form.getlist(key) if isinstance(f, UploadFile)]
            blobs = [await f.read() for f in files]
            opts.update({k: form[k] for k in options if k in form})
        else:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise ClientError(422, "invalid_field", "the JSON body must be an object with image or images")
            blobs = body.get("images", [body["image"]] if "image" in body else [])
            if not isinstance(blobs, list):
                raise ClientError(422, "invalid_field", "images must be a list of base64 strings")
            opts.update({k: body[k] for k in options if k in body})
        return "image", blobs, opts

    def _images(self, items: list) -> list[bytes]:
        if not items:
            raise ClientError(400, "no_image", "send at least one image")
        if len(items) > self.settings.max_items:  # before any base64 is decoded
            raise ClientError(413, "too_many_items", f"at most {self.settings.max_items} images per request")
        return [_b64(item, i) for i, item in enumerate(items)]

    def _opened(self, blobs: list[bytes]) -> tuple[list[Image.Image], int]:
        """Each image opened on its header alone and checked against the limits, and all of the request's
        declared pixels together (checked too): no pixel is decoded here."""
        images = []
        for i, blob in enumerate(blobs):
            with refused(i):
                images.append(open_image(blob, self.limits))
        total = sum(width * height for width, height in (img.size for img in images))
        if total > self.settings.max_request_pixels:
            raise ClientError(413, "too_many_pixels", f"the request's images have {total} pixels together; "
                              f"the limit is {self.settings.max_request_pixels}")  # fmt: skip
        return images, total

    def inline(self, name: str, items: Any) -> bool:
        if name == "pixels":
            return True
        self._checked = None
        small = [it for it in items if isinstance(it, bytes | str) and len(it) <= INLINE_BYTES]
        if not 0 < len(small) == len(items) <= 2:
            return False
        blobs = self._images(items)
        images, total = self._opened(blobs)
        if total > INLINE_PIXELS:
            return False
        # A thumbnail (the usual upload) costs tens of microseconds: not worth a thread hop. Its headers are
        # opened and checked: `decode`, which the core calls next on this same turn of the event loop (no
        # await in between), takes them from here instead of opening them a second time.
        self._checked = (items, blobs, images)
        return True

    def decode(self, name: str, items: Any) -> tuple[list[Any], list[Any], Any]:
        if name == "pixels":  # pre-processed pixels, shape checked by the core: not a storable image
            if not np.isfinite(items).all():
                raise ClientError(422, "non_finite", "pixels must be finite numbers")
            rows = list(items)
            return rows, [None] * len(rows), self.drift_input(rows, None)
        checked = self._checked
        if checked is not None and checked[0] is items:  # opened and checked by `inline` just now
            self._checked = None
            _, blobs, images = checked
        else:
            blobs = self._images(items)
            images, _ = self._opened(blobs)  # every image's bounds and the request's, before any is decoded
        sizes = [img.size for img in images]  # as declared (a JPEG's draft decoding changes the image's own)
        rows = []
        for i, img in enumerate(images):
            with refused(i):
                rows.append(preprocess_opened(img, self.prep))
        return rows, list(blobs), self.drift_input(rows, sizes)

    def drift_input(self, rows: list[np.ndarray], sizes: list[tuple[int, int]] | None) -> Any:
        """The rows and the uploads' sizes (a pre-processed tensor has none); None without a reference."""
        return (rows, sizes) if self.drift else None

    def drift_statistics(self, inputs: list[Any]) -> dict[str, np.ndarray]:
        return drift_reference.image_chunk_statistics(inputs, self.prep)

    # ------------------------------------------------------------ predict
    def predict(self, session, rows) -> np.ndarray:
        pixels = np.stack(rows).astype(np.float32, copy=False)
        return session.run(["logits"], {self.prep.input_name: pixels})[0]

    def warmup_rows(self, n: int) -> list[np.ndarray]:
        return list(np.zeros((n, 3, self.size, self.size), np.float32))

    def to_wire(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

    def feedback_content(self, item: bytes) -> bytes:
        return png_from_image_bytes(item, self.settings.max_pixels, size=self.size)  # at the model's resolution

    # ------------------------------------------------------------ explanations
    def explain_options(self) -> list[Option]:
        s = self.settings
        top = s.explain_max_grid()  # the row bound, not a grid of its own: 1 + grid² rows <= explain_max_rows
        grid_doc = (f"patches per side (default {s.explain_grid}, at most {top}): one explanation costs 1 + grid² "
                    f"model rows, at most {s.explain_max_rows} (EXPLAIN_MAX_ROWS)")  # fmt: skip
        return [*self.options(), *super().explain_options(),
                Option("grid", "integer", s.explain_grid, grid_doc, 2, top),
                Option("overlay", "boolean", False, "also return the heatmap over the image as a PNG")]  # fmt: skip

    def openapi_explain_body(self) -> dict:
        options = {o.name: o.schema() for o in self.explain_options()}
        multipart = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "one image file"}, **options}}  # fmt: skip
        return schemas.json_body(
            {"type": "object", "required": ["image"], "properties": {"image": B64, **options}},
            ("multipart/form-data", multipart),
            ("image/jpeg", RAW_IMAGE),
            ("image/png", RAW_IMAGE),
        )

    def explain_decode(self, name: str, items: list, options: dict[str, Any]) -> Parsed:
        if len(items) != 1:
            raise ClientError(400 if not items else 413, "no_image" if not items else "too_many_items",
                              "send exactly one image to explain")  # fmt: skip
        with refused(0):
            image = decode_image(_b64(items[0], 0), limits=self.limits)  # full size: the overlay is drawn on it
        options = {**options, "target": self.target(options["label"]),
                   "image": image if options["overlay"] else None}  # drawn on only with an overlay  # fmt: skip
        return Parsed([preprocess_image(image, self.prep)], [None], options)

    def explain_rows(self, parsed: Parsed) -> list[np.ndarray]:
        fill = explain.normalised_fill(self.occlusion, self.prep)  # the model's background
        return list(explain.occluded_images(parsed.rows[0], parsed.options["grid"], fill))

    def explanation(self, parsed: Parsed, values: np.ndarray) -> dict:
        opts = parsed.options
        target = int(values[0].argmax()) if opts["target"] is None else opts["target"]
        heat = explain.image_heatmap(values, target, opts["grid"])
        found = {
            "method": "occlusion", "label": self.labels[target], "probability": round(float(values[0, target]), 6),
            "grid": opts["grid"], "heatmap": np.round(heat.astype(np.float64), 6).tolist(), "rows": len(values),
        }  # fmt: skip
        if opts["overlay"]:
            png, size = explain.overlay_png(opts["image"], heat, self.settings.explain_overlay_max_pixels)
            found["overlay_png"] = base64.b64encode(png).decode()
            found["overlay_size"] = list(size)
        return {"prediction": self.encode(values[:1], parsed)[0], "explanation": found}
