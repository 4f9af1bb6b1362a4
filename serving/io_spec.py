"""A model's inputs, outputs and request options, declared once.

Everything the core says or checks about a model's interface is derived from these declarations:
the V2 model metadata, the V2 request validation (rank and every fixed dimension compared before
any arithmetic on a client's shape), the OpenAPI request schemas and the REST option parsing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.errors import ClientError

Datatype = Literal["FP32", "BYTES", "BOOL"]  # BOOL: outputs only
BATCH = -1  # the one variable dimension, always the first
# An integer option's value has at most 18 digits (JSON or text): 1e308 or 10**400 is a 422, never clipped,
# never a 10**6-digit int() on the event loop. ASCII digits only: int() refuses "²" though str.isdigit() says yes.
MAX_DIGITS = 18
INTEGER_TEXT = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")


@dataclass(frozen=True)
class Tensor:
    """One named tensor: its datatype and shape, where only the first (batch) dimension is variable."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]  # 0: set by the artifact, not known before it is read (the OpenAPI document)
    items: dict[str, Any] = field(default_factory=dict)  # JSON schema of one element (OpenAPI)
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.shape or self.shape[0] != BATCH or any(d < 0 for d in self.shape[1:]):
            raise ValueError(f"{self.name}: shape {self.shape} must be [-1, fixed dims...]")

    def spec(self) -> dict[str, Any]:
        """As V2 model metadata lists it."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def pattern(self) -> str:
        return "[" + ", ".join("N" if d == BATCH else str(d) for d in self.shape) + "]"

    def check_shape(self, shape: object, max_items: int) -> list[int]:
        """A client's `shape`, checked against this declaration: its rank first (a list of any length is
        refused without a walk over it), then each dimension; the batch at most `max_items`. The error
        names the declared shape, never echoes the client's."""
        want = f"input {self.name} must have shape {self.pattern()}"
        if not isinstance(shape, list) or len(shape) != len(self.shape):
            rank = len(shape) if isinstance(shape, list) else type(shape).__name__
            raise ClientError(422, "wrong_shape", f"{want}; got {rank} dimensions")
        for i, (got, declared) in enumerate(zip(shape, self.shape, strict=True)):
            if not isinstance(got, int) or isinstance(got, bool) or got < 1:
                raise ClientError(422, "wrong_shape", f"{want}; dimension {i} is not a positive integer")
            if declared != BATCH and got != declared:
                raise ClientError(422, "wrong_shape", f"{want}; dimension {i} is {got}")
        if shape[0] > max_items:  # the batch: refused before any data is decoded
            raise ClientError(413, "too_many_items", f"input {self.name}: at most {max_items} items per request, "
                                                     f"got {shape[0]}")  # fmt: skip
        return shape


@dataclass(frozen=True)
class Option:
    """A request option (query string, form field or JSON member): an integer with bounds, a boolean, or
    one of a set of strings (`choices`: anything else is a 422 `unknown_<name>`).

    Values above `high` are refused, or clipped to it where `clip` (top_k beyond the labels). Anything but
    such a value is a 422, never a 500: NaN, Infinity, 1e308, integers of over 18 digits, booleans for
    integers, numbers for booleans, objects, lists, file parts."""

    name: str
    kind: Literal["integer", "boolean", "string"]
    default: Any
    doc: str = ""
    low: int | None = None
    high: int | None = None
    clip: bool = False
    choices: tuple[str, ...] = ()

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "description": self.doc}
        if self.low is not None:
            out["minimum"] = self.low
        if self.high is not None and not self.clip:
            out["maximum"] = self.high
        if self.choices:
            out["enum"] = list(self.choices)
        return out

    def parse(self, value: object) -> Any:
        """The option's value from JSON (typed) or a query/form string; a 422 that names it otherwise."""
        if self.kind == "boolean":
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ClientError(422, "invalid_field", f"{self.name} must be true or false")
            return value
        if self.kind == "string":
            if not isinstance(value, str) or value not in self.choices:
                raise ClientError(422, f"unknown_{self.name}", f"{self.name} must be one of {list(self.choices)}")
            return value
        return self._integer(value)

    def _integer(self, value: object) -> int:
        bounds = f"at least {self.low}" if self.high is None or self.clip else f"between {self.low} and {self.high}"
        bad = ClientError(422, "invalid_field", f"{self.name} must be an integer {bounds}")
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float):  # JSON 3.0 is an integer; Infinity, NaN and 2.5 are not
            if not math.isfinite(value) or not value.is_integer():
                raise bad
            value = int(value)
        if isinstance(value, str):
            text = value.strip()
            if not INTEGER_TEXT.fullmatch(text):
                raise bad
            value = int(text)
        if not isinstance(value, int) or abs(value) >= 10**MAX_DIGITS:
            raise bad
        if self.low is not None and value < self.low:
            raise bad
        if self.high is not None and value > self.high:
            if not self.clip:
                raise bad
            value = self.high
        return value


def parse_options(options: list[Option], given: dict[str, Any]) -> dict[str, Any]:
    """Every declared option's value: the given one parsed, or its default."""
    return {o.name: o.parse(given[o.name]) if o.name in given else o.default for o in options}
