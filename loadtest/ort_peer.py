"""The server a user would write instead: FastAPI + ONNX Runtime, plainly, no batching.

One `InferenceSession` on CPU with default options, the artifact's ONNX file and the project's
shared pre-processing; plain `def` routes, so FastAPI runs each request (pre-processing and
model call) in its threadpool. Same request and answer formats as the served endpoints:
`POST /classify` with JSON `{"image": base64}`, a multipart field `image` or a raw `image/*`
body; `POST /sentiment` with JSON `{"text": ...}`. Run by the benchmark:

    PEER_MODEL_TAG=fashion-cnn:latest uvicorn loadtest.ort_peer:app --loop uvloop --http httptools --port 3100

`PEER_VARIANT` picks the ONNX file (fp32, int8, optimized; default fp32).
"""

from __future__ import annotations

import os
from typing import Annotated

import numpy as np
import onnxruntime as ort
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from loadtest.peer_upload import image_bytes
from servable import artifact
from servable.preprocessing import InvalidImage, encode_texts, load_tokenizer, preprocess_image

ART = artifact.load(os.environ["PEER_MODEL_TAG"])
LABELS = ART.manifest.labels
IMAGE_PREP, TEXT_PREP = ART.manifest.image_preprocessing, ART.manifest.text_preprocessing
ONNX_PATH = ART.onnx_path(os.environ.get("PEER_VARIANT", "fp32"))
SESSION = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])  # default session options
TOKENIZER = load_tokenizer(ART.file(TEXT_PREP.tokenizer_file), TEXT_PREP) if TEXT_PREP else None
app = FastAPI(title="FastAPI + ONNX Runtime peer")


class TextIn(BaseModel):
    text: str


def _answer(logits: np.ndarray) -> dict:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    preds = [{"label": LABELS[int(p.argmax())], "probability": round(float(p.max()), 6)} for p in probs]
    return {"model": ART.tag, "variant": "fastapi-ort", "predictions": preds}


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}


@app.post("/classify")
def classify(blob: Annotated[bytes, Depends(image_bytes)]) -> dict:
    try:
        x = preprocess_image(blob, IMAGE_PREP)
    except InvalidImage as exc:
        raise HTTPException(400, str(exc)) from exc
    return _answer(SESSION.run(None, {IMAGE_PREP.input_name: x[None]})[0])


@app.post("/sentiment")
def sentiment(body: TextIn) -> dict:
    return _answer(SESSION.run(None, encode_texts(TOKENIZER, [body.text], TEXT_PREP))[0])


@app.exception_handler(Exception)
async def _error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
