"""Load shapes as plain functions of time: steady, step ramp (find saturation) and spike.

Locust-free on purpose (importing Locust monkey-patches the whole process with gevent), so the
tests can check them; `locustfile.py` wraps the selected one in a `LoadTestShape`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SHAPES = ("steady", "ramp", "spike")


@dataclass(frozen=True)
class Profile:
    shape: str
    users: int = 8  # peak
    duration: float = 60.0  # seconds
    steps: int = 4  # ramp only
    spawn_rate: float | None = None  # users started per second; default: the peak (a step in ~1 s)

    @classmethod
    def from_env(cls, shape: str) -> Profile:
        if shape not in SHAPES:
            raise ValueError(f"LOAD_SHAPE={shape!r}: choose one of {', '.join(SHAPES)} or none")
        env = os.environ
        return cls(shape, max(1, int(env.get("LOAD_USERS") or 8)), float(env.get("LOAD_DURATION") or 60),
                   max(1, int(env.get("LOAD_STEPS") or 4)),
                   float(env["LOAD_SPAWN_RATE"]) if env.get("LOAD_SPAWN_RATE") else None)  # fmt: skip

    def users_at(self, t: float) -> int | None:
        """Users wanted `t` seconds into the run; None ends it."""
        if t >= self.duration:
            return None
        if self.shape == "ramp":  # equal steps up to the peak: where req/s stops growing is saturation
            step = min(self.steps - 1, int(t / (self.duration / self.steps)))
            return max(1, round(self.users * (step + 1) / self.steps))
        if self.shape == "spike":  # a quarter of the peak, the full peak for the middle sixth, back
            spiking = self.duration * 5 / 12 <= t < self.duration * 7 / 12
            return self.users if spiking else max(1, self.users // 4)
        return self.users  # steady: the SLO run

    @property
    def rate(self) -> float:
        return self.spawn_rate or float(self.users)
