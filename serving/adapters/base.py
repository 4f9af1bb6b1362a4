"""The contract between the serving core and one model: an adapter over a task head.

A model is four verbs over a head (serving/heads.py):
- `load(art)`: read what pre-processing needs from the verified artifact; declare the inputs.
- `read(request, options)` + `decode(name, items)`: one request's items of a declared input (REST:
  the model's body formats; V2: the tensor, already checked against the declaration by the core),
  validated and pre-processed into rows, per request, before any batch. One decode for every protocol.
  (With a drift reference in the artifact, decode also returns the items' drift input, which
  `drift_statistics` turns into statistics many requests at a time, off the single request's cost.)
- `predict(session, rows)`: the model's raw outputs for a batch of rows (no softmax, no metrics:
  the head and the core do those once).
- `encode(values, parsed)`: the REST answer's predictions (default: the head's).
and, optionally, `Explains` (serving/adapters/explains.py). The model's identity, route and service
names are data on its `SERVED_MODELS` entry. Everything else (batching, topology, V2, OpenAPI, auth,
errors, metrics, logs, feedback) is the core's, the same for every model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from starlette.requests import Request

from servable import artifact
from servable.config import ServeCommon, ServedModelEntry
from serving.heads import Head
from serving.io_spec import Option, Tensor


@dataclass
class Parsed:
    rows: list[Any]  # model inputs, one per item
    items: list[Any]  # what the opt-in feedback hook may store (None where nothing storable)
    options: dict[str, Any] = field(default_factory=dict)
    drift: Any = None  # the items' drift input (serving/drift.py), where the artifact has a reference


@dataclass(frozen=True)
class Docs:
    """What the API reference says of a model (its OpenAPI title, routes' summaries and descriptions)."""

    title: str
    description: str
    summary: str  # of the predict route
    doc: str
    v2_doc: str
    response_model: type  # the predict route's answer (pydantic, for the OpenAPI document only)


class Adapter(ABC):
    entry: ClassVar[ServedModelEntry]  # the model's SERVED_MODELS entry: kind, route, service names
    task: ClassVar[str]  # the artifact's task, e.g. "image-classification"
    docs: ClassVar[Docs]
    wire_type: ClassVar[Any] = list  # how a batch of rows travels to a split model process
    head: Head

    def __init__(self, settings: ServeCommon) -> None:
        self.settings = settings
        self.manifest: artifact.ModelManifest | None = None
        self.head = self.make_head([])  # before `load`: what the OpenAPI document needs

    # ------------------------------------------------------------ load
    def load(self, art: artifact.Artifact) -> None:
        """Read what pre-processing and answers need from the verified artifact; make the head."""
        self.manifest = art.manifest
        self.head = self.make_head(art.manifest.labels)
        self.head.calibrate(art.manifest.calibration)

    @abstractmethod
    def make_head(self, labels: list[str]) -> Head:
        """The task head over this model's outputs."""

    @abstractmethod
    def inputs(self) -> list[Tensor]:
        """The input tensors (after `load`): V2 metadata and validation, OpenAPI, all derive from these."""

    def options(self) -> list[Option]:
        """The predict route's request options (the head's by default)."""
        return self.head.options()

    @property
    def labels(self) -> list[str]:
        assert self.manifest is not None
        return self.manifest.labels

    # ------------------------------------------------------------ decode (per request, in the HTTP worker)
    @abstractmethod
    async def read(self, request: Request, options: tuple[str, ...]) -> tuple[str, list, dict[str, Any]]:
        """(input name, its items, the given values of `options`) of one REST request; raises ClientError."""

    def inline(self, name: str, items: Any) -> bool:
        """Whether decoding these items is cheap enough for the worker's event loop (well under a millisecond,
        whatever the client sent); otherwise `decode` runs in the worker's decode pool (serving/decoding.py).
        The default is the safe one: the pool."""
        return False

    @abstractmethod
    def decode(self, name: str, items: Any) -> tuple[list[Any], list[Any]] | tuple[list[Any], list[Any], Any]:
        """(rows, storable items) from a declared input's items: a REST request's, or a V2 tensor's (FP32: a
        float32 array of the checked shape; BYTES: a list of str from JSON or bytes from binary data). A model
        whose artifact has a drift reference adds a third element: the items' drift input, from what decoding
        made (see `drift_statistics`)."""

    def drift_statistics(self, inputs: list[Any]) -> dict[str, np.ndarray]:
        """The statistics (servable/drift_reference.py) of many requests' drift inputs at once, each feature's
        values concatenated over their items; a feature a request lacks is left out for it. The worker's drift
        monitor calls this once per chunk of requests (serving/drift.py): vectorised over a chunk, the numpy
        calls cost a request a fraction of what they cost one by one. Default: each input is already a
        statistics dict."""
        names = dict.fromkeys(name for stats in inputs for name in stats)
        return {name: np.concatenate([stats[name] for stats in inputs if name in stats]) for name in names}

    @property
    def drift(self) -> bool:
        """Whether the served artifact has a drift reference (then decode returns the items' drift input)."""
        return self.manifest is not None and self.manifest.drift_reference is not None

    @abstractmethod
    def openapi_body(self) -> dict:
        """`openapi_extra` of the predict route: the request bodies it takes."""

    # ------------------------------------------------------------ predict (per batch: worker, model or explain process)
    @abstractmethod
    def predict(self, session, rows: Any) -> np.ndarray:
        """The model's raw output rows for a batch of rows (N rows in, N rows out)."""

    def run(self, session, rows: Any) -> np.ndarray:
        """The head's prediction of a batch (softmax, for a classifier): what the worker, the split model
        process and the explain process all run."""
        return self.head.finish(self.predict(session, rows))

    @abstractmethod
    def warmup_rows(self, n: int) -> Any:
        """n valid rows to run before the replica reports ready."""

    def cost_units(self, row: Any) -> int:
        """A row's share of a batch's run time, in the units the batcher's admission times batches by
        (serving/batcher.py::BatchCost): 1 where every row costs the same."""
        return 1

    def warmup_batches(self, sizes: list[int]) -> list[Any]:
        """The batches run before ready: one per batch size (an adapter whose rows vary in shape adds its own)."""
        return [self.warmup_rows(n) for n in sizes]

    def to_wire(self, rows: list[Any]) -> Any:
        """A batch of rows as the split topology's model process takes it."""
        return rows

    # ------------------------------------------------------------ encode
    def encode(self, values: np.ndarray, parsed: Parsed) -> list[dict]:
        """The REST answer's predictions from the head's prediction."""
        return self.head.encode(values, parsed.options)

    def preprocessing(self) -> dict:
        """The artifact's pre-processing parameters (what a client sending pre-processed tensors must do)."""
        return {}

    def info(self) -> dict:
        return {}

    def feedback_content(self, item: Any) -> Any:
        """What the opt-in feedback queue stores for one storable item (text, or PNG bytes)."""
        return item

    def close(self) -> None:
        """Release what `load` holds (called when the worker stops); nothing by default."""
        return None
