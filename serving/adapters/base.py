"""The contract between the serving core (serving/service_factory.py) and one model's task.

An adapter turns a request into *rows* (one pre-processed item each: validated and decoded per
request, before any batch), runs a batch of rows through the ONNX session, and turns output rows
into the answer. Everything else (batching, topology, V2 protocol, auth, errors, metrics, logs)
is the core's, the same for every model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from starlette.requests import Request

from servable import artifact
from servable.config import ServeCommon
from serving.errors import ClientError


@dataclass
class Parsed:
    rows: list[Any]  # model inputs, one per item
    items: list[Any]  # what the opt-in feedback hook may store (None where nothing storable)
    options: dict[str, Any] = field(default_factory=dict)


class TaskAdapter(ABC):
    kind: ClassVar[str]  # "image": the key of servable.config.SERVED_MODELS
    task: ClassVar[str]  # the artifact's task
    service_name: ClassVar[str]  # BentoML name of the public service
    model_service_name: ClassVar[str]  # BentoML name of the split topology's model service
    route: ClassVar[str]  # the REST predict route
    summary: ClassVar[str]  # of the predict route, in the OpenAPI document
    doc: ClassVar[str]
    v2_doc: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]
    response_model: ClassVar[type]
    wire_type: ClassVar[Any]  # how a batch of rows travels to a split model process
    explain_summary: ClassVar[str]  # of the explain route, in the OpenAPI document
    explain_doc: ClassVar[str]
    explain_model: ClassVar[type]  # the explain route's answer

    def __init__(self, settings: ServeCommon) -> None:
        self.settings = settings
        self.manifest: artifact.ModelManifest | None = None

    def load(self, art: artifact.Artifact) -> None:
        """Read what pre-processing and answers need from the verified artifact."""
        self.manifest = art.manifest

    @property
    def labels(self) -> list[str]:
        assert self.manifest is not None
        return self.manifest.labels

    def target(self, label: object) -> int | None:
        """The class an explanation is for: a label the model has, or None for its top prediction."""
        if label is None:
            return None
        if not isinstance(label, str) or label not in self.labels:
            raise ClientError(422, "unknown_label", f"label must be one of {self.labels}")
        return self.labels.index(label)

    # ------------------------------------------------------------ per request (HTTP worker)
    @abstractmethod
    async def parse(self, request: Request) -> Parsed:
        """Validate and pre-process one REST request; raises ClientError."""

    @abstractmethod
    def parse_v2(self, name: str, shape: list[int], data: np.ndarray | list) -> Parsed:
        """Rows from one V2 input tensor, its name, datatype and element count already checked by the core
        (serving/v2.py): FP32 data is a float32 array of `shape`, BYTES data a flat list of str (sent as JSON)
        or bytes (sent as binary data). Raises ClientError."""

    @abstractmethod
    def openapi_body(self) -> dict:
        """`openapi_extra` of the predict route: the request bodies it takes."""

    @abstractmethod
    def v2_input_body(self) -> list[dict]:
        """The V2 infer request's input tensors, for the OpenAPI document."""

    @abstractmethod
    def v2_inputs(self) -> list[dict]:
        """The V2 input tensors (name, datatype, shape) this model takes; the outputs are the core's."""

    @abstractmethod
    def answer(self, probs: np.ndarray, parsed: Parsed) -> list[dict]:
        """The `predictions` of the REST answer."""

    # ------------------------------------------------------------ explanations (occlusion: servable/explain.py)
    @abstractmethod
    async def parse_explain(self, request: Request) -> Parsed:
        """Validate one explain request (one item, its options); raises ClientError. In the in-process topology
        the Parsed is pickled to the worker's explain process: keep in it only what the explanation needs."""

    @abstractmethod
    def openapi_explain_body(self) -> dict:
        """`openapi_extra` of the explain route."""

    @abstractmethod
    def explain_rows(self, parsed: Parsed) -> list[Any]:
        """The perturbed rows to score, the unperturbed item first (runs in the explain process, or a thread
        in the split topology: never on the event loop)."""

    @abstractmethod
    def explanation(self, parsed: Parsed, probs: np.ndarray) -> dict:
        """`prediction` and `explanation` of the answer, from the rows' probabilities (where explain_rows runs)."""

    def to_wire(self, rows: list[Any]) -> Any:
        """A batch of rows as the split topology's model process takes it."""
        return rows

    def info(self) -> dict:
        return {}

    def feedback_kwargs(self) -> dict:
        return {}

    # ------------------------------------------------------------ per batch (model thread or process)
    @abstractmethod
    def run(self, session, rows: Any) -> np.ndarray:
        """Class probabilities for a batch of rows (N rows in, N rows out)."""

    @abstractmethod
    def warmup_rows(self, n: int) -> Any:
        """n valid rows to run before the replica reports ready."""
