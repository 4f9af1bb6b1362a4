"""Sentiment: one text or several (JSON) -> label, probability and scores per text.

The batch runs in length buckets, so a batch of short and long texts does not pay for padding
everything to its longest member.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np
from starlette.requests import Request

from servable import drift_reference, explain
from servable.config import SERVED_MODELS, TextServeSettings
from servable.preprocessing import load_tokenizer, pad_encodings
from serving import metrics, schemas
from serving.adapters.base import Adapter, Docs, Parsed
from serving.adapters.explains import ExplainDocs, Explains
from serving.errors import ClientError
from serving.heads import ClassifierHead
from serving.io_spec import BATCH, Tensor
from serving.request_body import json_body

# Characters of one request tokenised on the event loop; more go to the worker's decode pool.
INLINE_CHARS = 4096


def text_schema(max_chars: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": r"\S"}


def _utf8(i: int, blob: bytes) -> str:
    """A binary BYTES element as text."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(422, "invalid_unicode", f"text {i} is not UTF-8 (bad byte at offset {exc.start})") from exc


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


class TextAdapter(Adapter, Explains):
    entry = SERVED_MODELS["text"]
    task = "text-classification"
    docs = Docs(
        title="Servable sentiment classifier",
        description="Sentiment of English texts (MiniLM BERT, ONNX Runtime with adaptive batching). "
        "Inference endpoints need an API key (x-api-key header or Bearer token).",
        summary="Sentiment",
        doc="Sentiment of one text (`text`) or several (`texts`): label, probability and scores each.",
        v2_doc="V2 infer: BYTES `text` tensor of shape [N] (UTF-8 strings); JSON or the binary tensor data extension.",
        response_model=schemas.SentimentResponse,
    )
    explain_docs = ExplainDocs(
        summary="Sentiment Explain",
        doc="Why the model answered, for one text: word occlusion from the served model (no gradients). Each "
        "word's `score` is how much the class's probability drops when that word is masked (replaced by the "
        "model's mask token): positive = the word pushes toward the class, negative = away from it.",
        response_model=schemas.TextExplainResponse,
    )
    wire_type = list[list[int]]
    settings: TextServeSettings

    # ------------------------------------------------------------ load
    def load(self, art) -> None:
        super().load(art)
        self.prep = art.manifest.text_preprocessing
        self.tokenizer = load_tokenizer(art.file(self.prep.tokenizer_file), self.prep)
        self.unk_id = drift_reference.unk_id(self.tokenizer)

    def make_head(self, labels: list[str]) -> ClassifierHead:
        return ClassifierHead(labels, scores=True)

    def inputs(self) -> list[Tensor]:
        return [Tensor("text", "BYTES", (BATCH,), text_schema(self.settings.max_text_chars))]

    def preprocessing(self) -> dict:
        return self.prep.model_dump()

    def info(self) -> dict:
        return {"max_text_chars": self.settings.max_text_chars, "length_buckets": self.settings.length_buckets}

    def openapi_body(self) -> dict:
        text = text_schema(self.settings.max_text_chars)
        return schemas.json_body({"oneOf": [
            {"type": "object", "required": ["text"], "properties": {"text": text}, "additionalProperties": False},
            {"type": "object", "required": ["texts"], "additionalProperties": False, "properties": {
                "texts": {"type": "array", "minItems": 1, "maxItems": self.settings.max_items, "items": text}}},
        ]})  # fmt: skip

    # ------------------------------------------------------------ decode
    def check_text(self, i: int, text: object) -> str:
        if isinstance(text, bytes):  # a V2 binary element
            text = _utf8(i, text)
        if not isinstance(text, str):
            raise ClientError(422, "invalid_field", f"text {i} must be a string")
        if not text.strip():
            raise ClientError(422, "empty_text", f"text {i} is empty")
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise ClientError(413, "text_too_long", f"text {i} has {len(text)} characters; limit {limit}")
        if not text.isascii():
            try:
                text.encode("utf-8")  # JSON can carry lone surrogates ("\ud800") that no tokenizer accepts
            except UnicodeEncodeError as exc:
                raise ClientError(422, "invalid_unicode", f"text {i} is not valid Unicode (lone surrogate)") from exc
        if not text.isprintable() and any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
            raise ClientError(422, "control_characters", f"text {i} contains control characters")
        return text

    async def read(self, request: Request, options: tuple[str, ...]) -> tuple[str, list, dict[str, Any]]:
        body = await json_body(request)
        if not isinstance(body, dict) or ("text" in body) == ("texts" in body):
            raise ClientError(422, "invalid_field", "send an object with either text or texts")
        texts = [body["text"]] if "text" in body else body["texts"]
        if not isinstance(texts, list):
            raise ClientError(422, "invalid_field", "texts must be a list of strings")
        return "text", texts, {k: body[k] for k in options if k in body}

    def inline(self, name: str, items: Any) -> bool:
        # a review or two tokenise in well under a millisecond; a request of long texts goes to the pool
        return sum(len(t) for t in items if isinstance(t, str | bytes)) <= INLINE_CHARS

    def decode(self, name: str, items: Any) -> tuple[list[Any], list[Any], Any]:
        if not items:
            raise ClientError(422, "no_text", "send text or a non-empty texts list")
        if len(items) > self.settings.max_items:
            raise ClientError(413, "too_many_items", f"at most {self.settings.max_items} texts per request")
        checked = [self.check_text(i, t) for i, t in enumerate(items)]
        ids = [e.ids for e in self.tokenizer.encode_batch(checked)]
        # drift input: the texts and the ids just made (their lengths and unknown-token shares, per chunk)
        return ids, checked, (checked, ids) if self.drift else None

    def drift_statistics(self, inputs: list[Any]) -> dict[str, np.ndarray]:
        return drift_reference.text_chunk_statistics(inputs, self.unk_id)

    # ------------------------------------------------------------ predict
    def _run_padded(self, session, ids: list[list[int]]) -> np.ndarray:
        feeds = pad_encodings(ids, [[0] * len(x) for x in ids], self.prep)
        padded = metrics.PADDING_RATIO.labels(model=self.manifest.name, version=self.manifest.version)
        padded.observe(float(1 - feeds["attention_mask"].mean()))
        return session.run(["logits"], feeds)[0]

    def predict(self, session, rows) -> np.ndarray:
        ids = [list(x) for x in rows]
        if not self.settings.length_buckets:
            return self._run_padded(session, ids)
        out = np.empty((len(ids), len(self.labels)), np.float32)
        for bucket in length_buckets([len(x) for x in ids], self.settings.bucket_waste):
            out[bucket] = self._run_padded(session, [ids[i] for i in bucket])
        return out

    def cost_units(self, row: list[int]) -> int:
        return len(row)  # tokens: a batch's run time grows with its texts' lengths

    def warmup_rows(self, n: int, length: int = 16) -> list[list[int]]:
        return [[1] * length] * n  # any in-vocabulary ids

    def warmup_batches(self, sizes: list[int]) -> list[list[list[int]]]:
        """Every batch size at a short length, then the largest batch at each doubling length up to the maximum."""
        lengths, top = [], self.prep.max_length
        while (length := 32 * 2 ** len(lengths)) < top:
            lengths.append(length)
        longer = [self.warmup_rows(max(sizes), n) for n in [*lengths, top]] if sizes else []  # WARMUP_BATCHES=[]: none
        return [*super().warmup_batches(sizes), *longer]

    # ------------------------------------------------------------ explanations
    def openapi_explain_body(self) -> dict:
        return schemas.json_body({
            "type": "object", "required": ["text"], "additionalProperties": False, "properties": {
                "text": {**text_schema(self.settings.max_text_chars), "description": self._explain_bound()},
                **{o.name: o.schema() for o in self.explain_options()}},
        })  # fmt: skip

    def _explain_bound(self) -> str:
        s = self.settings
        return (f"explain takes at most {s.explain_max_words()} words: one explanation costs 1 + words model rows, "
                f"at most {s.explain_max_rows} (EXPLAIN_MAX_ROWS)")  # fmt: skip

    def explain_decode(self, name: str, items: list, options: dict[str, Any]) -> Parsed:
        if len(items) != 1:
            raise ClientError(422, "invalid_field", "send an object with one text (and optionally a label)")
        text = self.check_text(0, items[0])
        found = explain.words(text)
        if len(found) > self.settings.explain_max_words():
            raise ClientError(413, "too_many_words", f"the text has {len(found)} words; {self._explain_bound()}")
        return Parsed([], [text], {"words": found, "target": self.target(options["label"])})

    def explain_rows(self, parsed: Parsed) -> list[list[int]]:
        token = self.occlusion.token if self.occlusion else None
        texts = explain.texts_without_each_word(parsed.items[0], parsed.options["words"], token)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def explanation(self, parsed: Parsed, values: np.ndarray) -> dict:
        target = int(values[0].argmax()) if parsed.options["target"] is None else parsed.options["target"]
        scores = explain.word_scores(values, target)
        found = {
            "method": "word_occlusion", "label": self.labels[target],
            "probability": round(float(values[0, target]), 6), "rows": len(values),
            "words": [{"word": w.text, "start": w.start, "end": w.end, "score": round(float(v), 6)}
                      for w, v in zip(parsed.options["words"], scores, strict=True)],
        }  # fmt: skip
        return {"prediction": self.encode(values[:1], parsed)[0], "explanation": found}
