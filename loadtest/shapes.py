"""Load shapes: steady, step ramp (find saturation) and spike; picked by LOAD_SHAPE in the locustfile.

Sizes come from LOAD_USERS (peak users) and LOAD_DURATION (seconds); defaults stay short.
The classes here are abstract so Locust does not pick them up by import; the locustfile
subclasses the one selected.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class _Shape(LoadTestShape):
    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.users = max(1, int(_env("LOAD_USERS", 8)))
        self.duration = _env("LOAD_DURATION", 60)
        self.rate = _env("LOAD_SPAWN_RATE", self.users)

    def users_at(self, t: float) -> int:
        raise NotImplementedError

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t >= self.duration:
            return None  # stops the run
        return self.users_at(t), self.rate


class Steady(_Shape):
    """LOAD_USERS users for the whole run: the SLO run."""

    abstract = True

    def users_at(self, t: float) -> int:
        return self.users


class StepRamp(_Shape):
    """LOAD_STEPS equal steps up to LOAD_USERS: where throughput stops growing is saturation."""

    abstract = True

    def users_at(self, t: float) -> int:
        steps = max(1, int(_env("LOAD_STEPS", 4)))
        step = min(steps - 1, int(t / (self.duration / steps)))
        return max(1, round(self.users * (step + 1) / steps))


class Spike(_Shape):
    """A quarter of the users, then all of them for the middle sixth of the run, then back."""

    abstract = True

    def users_at(self, t: float) -> int:
        base = max(1, self.users // 4)
        return self.users if self.duration * 5 / 12 <= t < self.duration * 7 / 12 else base


SHAPES: dict[str, type[_Shape]] = {"steady": Steady, "ramp": StepRamp, "spike": Spike}
