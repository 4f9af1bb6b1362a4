"""The peer a user would otherwise write: FastAPI + the PyTorch model, eager, one request at a time.

Same request and answer formats as the served endpoints (JSON `image`/`text`, a multipart field
`image` or a raw `image/*` body), the same pre-processing (from the artifact's manifest), the model
in eval mode under inference_mode, and a lock so requests run one at a time. Run by the benchmark:

    PEER_MODEL_TAG=fashion-cnn:latest uvicorn loadtest.eager_peer:app --host 127.0.0.1 --port 3100
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from loadtest.peer_upload import image_bytes
from servable import artifact
from servable.preprocessing import preprocess_image

ART = artifact.load(os.environ["PEER_MODEL_TAG"])
MANIFEST = ART.manifest
RUN_DIR = Path(MANIFEST.training_config["runs_dir"]) / MANIFEST.name / MANIFEST.version
LOCK = threading.Lock()  # one request at a time: the plain way, no batching
app = FastAPI(title="PyTorch eager peer")


def _load_image_model() -> torch.nn.Module:
    from training.image_model import ImageClassifier

    saved = torch.load(RUN_DIR / "pytorch_model.pt", map_location="cpu", weights_only=False)
    model = ImageClassifier(saved["num_classes"], saved["dropout"], pretrained=False)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _load_text_model():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = RUN_DIR / "pytorch_model"
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


if MANIFEST.task == "image-classification":
    MODEL = _load_image_model()
else:
    MODEL, TOKENIZER = _load_text_model()


def _answer(probs: np.ndarray) -> dict:
    labels = MANIFEST.labels
    preds = [{"label": labels[int(p.argmax())], "probability": round(float(p.max()), 6)} for p in probs]
    return {"model": ART.tag, "variant": "pytorch-eager", "predictions": preds}


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}


@app.post("/classify")
def classify(blob: Annotated[bytes, Depends(image_bytes)]) -> dict:
    x = preprocess_image(blob, MANIFEST.image_preprocessing)
    with LOCK, torch.inference_mode():
        probs = torch.softmax(MODEL(torch.from_numpy(x[None])), dim=1).numpy()
    return _answer(probs)


@app.post("/sentiment")
def sentiment(body: dict) -> dict:
    enc = TOKENIZER([body["text"]], truncation=True, max_length=MANIFEST.text_preprocessing.max_length,
                    padding=True, return_tensors="pt")  # fmt: skip
    with LOCK, torch.inference_mode():
        probs = torch.softmax(MODEL(**enc).logits, dim=1).numpy()
    return _answer(probs)


@app.exception_handler(Exception)
async def _error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
