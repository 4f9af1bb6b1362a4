"""ONNX Runtime sessions: CUDA provider when it really loads, CPU otherwise; never pretend."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from servable.config import ServeCommon

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("servable.runtime")

# onnxruntime is imported where a session is made, not with this module: BentoML's arbiter imports the
# service module (and so this one) but never runs a model, and the import costs it about 20 MiB.
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}  # fmt: skip


def requested_providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise RuntimeError(f"device=cuda but this onnxruntime build has no CUDA provider ({available})")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def create_session(path, settings: ServeCommon) -> tuple[ort.InferenceSession, str]:
    """Build the session and report the provider actually in use (CUDA can fall back silently)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[settings.graph_optimization])
    if threads := settings.resolved_intra_op_threads():
        opts.intra_op_num_threads = threads
    # Idle intra-op threads spin by default; on a box where HTTP workers share the cores, that is
    # CPU taken from them after every run (docs/benchmark.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
    opts.log_severity_level = 3  # the CUDA fallback error is reported below, once, in plain words
    session = ort.InferenceSession(str(path), opts, providers=requested_providers(settings.device))
    in_use = session.get_providers()[0]
    if settings.device == "cuda" and in_use != "CUDAExecutionProvider":
        raise RuntimeError("device=cuda but the CUDA provider did not load (CUDA/cuDNN libraries missing?)")
    wanted = requested_providers(settings.device)[0]
    if wanted != in_use:
        log.warning("requested %s but ONNX Runtime fell back to %s", wanted, in_use)
    log.info("ONNX Runtime providers in use for %s: %s", path.name, session.get_providers())
    return session, in_use


class ArenaShrinking:
    """A session whose runs hand the CPU arena's free memory back to the system afterwards. ONNX Runtime keeps
    what its largest run needed; the warm-up runs every batch shape up to the largest, so without one such run
    after it a worker at rest held the largest batch's buffers (about 20 MiB a worker for the image model and 40
    for the text model, measured with loadtest.memory). Load grows the arena again to what load needs."""

    def __init__(self, session: ort.InferenceSession) -> None:
        import onnxruntime as ort

        self.session = session
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, input_feed, run_options=None):
        return self.session.run(output_names, input_feed, self.options)

    def __getattr__(self, name: str):
        return getattr(self.session, name)
