"""One request's deadline and where its time went: the `Server-Timing` and `x-batch-size` answer headers.

The deadline counts from the moment the route starts reading the request: the client's
`x-request-deadline-ms` header when it sends one (at most the request timeout), else the model's
`max_latency_ms`. The batcher admits a request only when it predicts the answer within it
(serving/batcher.py). The parts, in milliseconds: `decode` (reading, validation, pre-processing),
`queue` and `model` (the wait for a batch and the run of the batch it rode in; in the split topology
`model_call`, both and the transport together, as the model process's batching is not visible from
the front worker), `encode` (the answer's JSON) and `total`. Each part's start is kept beside its length:
where tracing is on, the parts become spans (serving/tracing.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.responses import Response

from serving.errors import ClientError

DEADLINE_HEADER = "x-request-deadline-ms"
MILLISECONDS = re.compile(r"\d{1,9}(\.\d{1,3})?")


def deadline_ms(headers: Headers, default_ms: float, max_ms: float) -> float:
    """The request's deadline budget in milliseconds; a malformed or out-of-range header is a 400."""
    given = headers.get(DEADLINE_HEADER)
    if given is None:
        return default_ms
    if not MILLISECONDS.fullmatch(given.strip()) or not 0 < float(given) <= max_ms:
        raise ClientError(400, "bad_deadline",
                          f"{DEADLINE_HEADER} must be a number of milliseconds in (0, {max_ms:g}]")  # fmt: skip
    return float(given)


@dataclass
class RequestTiming:
    start: float  # time.perf_counter() when the route began
    deadline: float  # time.perf_counter() by which the answer is due
    parts: dict[str, float] = field(default_factory=dict)  # seconds
    began: dict[str, float] = field(default_factory=dict)  # each part's time.perf_counter() start
    batch_rows: int | None = None

    @classmethod
    def begin(cls, headers: Headers, default_ms: float, max_ms: float) -> RequestTiming:
        start = time.perf_counter()
        return cls(start, start + deadline_ms(headers, default_ms, max_ms) / 1000)

    def part(self, name: str, start: float, seconds: float) -> None:
        self.parts[name], self.began[name] = seconds, start

    def encoded(self, since: float) -> None:
        """The answer is rendered: its rendering since `since` is the encode part."""
        self.part("encode", since, time.perf_counter() - since)

    def headers(self) -> dict[str, str]:
        total = time.perf_counter() - self.start
        timings = [f"{name};dur={1000 * s:.2f}" for name, s in self.parts.items()]
        out = {"server-timing": ", ".join([*timings, f"total;dur={1000 * total:.2f}"])}
        if self.batch_rows is not None:
            out["x-batch-size"] = str(self.batch_rows)
        return out

    def attach(self, response: Response, since: float) -> Response:
        """`response` (just rendered; its rendering since `since` is the encode part) with the timing headers."""
        self.encoded(since)
        response.headers.update(self.headers())
        return response
