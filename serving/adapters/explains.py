"""The optional fifth verb: why the model answered (occlusion, servable/explain.py), for one item.

The core gives explanations their own admission, queue and (in-process topology) a low-priority
process; an adapter that also subclasses `Explains` gets the `<route>/explain` endpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from servable.explain import Occlusion
from serving.adapters.base import Parsed
from serving.heads import Head
from serving.io_spec import Option


@dataclass(frozen=True)
class ExplainDocs:
    summary: str
    doc: str
    response_model: type


class Explains(ABC):
    explain_docs: ClassVar[ExplainDocs]
    head: Head
    manifest: Any  # the adapter's (servable.artifact.ModelManifest), set by its load

    def explain_options(self) -> list[Option]:
        """The explain route's options: which label to explain, by default the top prediction."""
        labels = tuple(self.head.labels)
        return [Option("label", "string", None, "explain this class instead of the top prediction", choices=labels)]

    @property
    def occlusion(self) -> Occlusion | None:
        """What a masked patch or word is for this model (chosen from its training data, in its manifest); None
        for an artifact without it (servable/explain.py then keeps the older choice)."""
        return self.manifest.occlusion

    def target(self, label: str | None) -> int | None:
        """The class an explanation is for (a label checked by its option), or None for the top prediction."""
        return None if label is None else self.head.labels.index(label)

    @abstractmethod
    def explain_decode(self, name: str, items: list, options: dict[str, Any]) -> Parsed:
        """One item to explain, validated (per request, in the worker). In the in-process topology the Parsed
        is pickled to the worker's explain process: keep in it only what the explanation needs."""

    @abstractmethod
    def openapi_explain_body(self) -> dict:
        """`openapi_extra` of the explain route."""

    @abstractmethod
    def explain_rows(self, parsed: Parsed) -> list[Any]:
        """The perturbed rows to score, the unperturbed item first (in the explain process, or a thread in the
        split topology: never on the event loop)."""

    @abstractmethod
    def explanation(self, parsed: Parsed, values: np.ndarray) -> dict:
        """`prediction` and `explanation` of the answer, from the rows' predictions (where explain_rows runs)."""
