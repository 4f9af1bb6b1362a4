"""Load a registered model for serving: verify, create the session, warm up, or stay un-ready.

A missing, tampered or wrong-task artifact never crashes the replica into a restart loop and
never serves: the replica stays up, `/readyz` answers 503 and the log says why, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from servable import artifact
from servable.config import ServeCommon
from serving import metrics
from serving.onnx_runtime import ArenaShrinking, create_session

if TYPE_CHECKING:
    from serving.adapters.base import Adapter

log = logging.getLogger("servable.loading")


def resolve_variant(settings: ServeCommon, manifest: artifact.ModelManifest) -> str:
    """variant=auto: int8 on CPU when its recorded test accuracy is within `auto_int8_max_drop` of fp32."""
    if settings.variant != "auto":
        return settings.variant
    if settings.on_gpu() or "int8" not in manifest.onnx:
        return "fp32"
    test = manifest.metrics.get("test", {})
    try:
        drop = test["fp32"]["accuracy"] - test["int8"]["accuracy"]
    except (KeyError, TypeError):
        return "fp32"  # no recorded accuracy: never trade it blind
    return "int8" if drop <= settings.auto_int8_max_drop else "fp32"


class ServedModel:
    """The artifact (manifest + files), and for model workers the ONNX Runtime session."""

    def __init__(self, settings: ServeCommon, task: str, *, with_session: bool, serves: bool = True) -> None:
        """`serves` False: a shadow candidate (serving/shadow.py), scored beside the served model but never
        announced as the version this replica serves (servable_model_info)."""
        self.settings, self.task, self.serves = settings, task, serves
        self.art: artifact.Artifact | None = None
        self.session = None
        self.provider = "none"
        self.variant = settings.variant
        self.error: str | None = None
        self.warmup_timings: list[tuple[int, float]] = []  # (cost units, seconds) of each warm-up batch
        try:
            self.art = artifact.load(settings.model_tag)
            if self.art.manifest.task != task:
                raise artifact.ArtifactError(f"{self.art.tag} is a {self.art.manifest.task} model, not {task}")
            self.variant = resolve_variant(settings, self.art.manifest)
            self.art.onnx_path(self.variant)  # the configured variant must exist
            if with_session:
                self.session, self.provider = create_session(self.art.onnx_path(self.variant), settings)
            log.info("model %s (%s) verified and loaded", self.art.tag, self.variant)
        except Exception as exc:  # any load failure keeps the replica un-ready, with the reason
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model %s NOT loaded, replica stays un-ready: %s", settings.model_tag, self.error)

    @property
    def ready(self) -> bool:
        return self.error is None and self.art is not None

    @property
    def manifest(self) -> artifact.ModelManifest:
        assert self.art is not None
        return self.art.manifest

    @property
    def name(self) -> str:
        return self.manifest.name if self.art else self.settings.model_tag.split(":")[0]

    @property
    def version(self) -> str:
        """The served tag's version (`latest` resolved), else the configured tag's."""
        return self.manifest.version if self.art else self.settings.model_tag.partition(":")[2] or "latest"

    @property
    def labels(self) -> dict[str, str]:
        """The labels of every metric about this model: its name and version (a canary's metrics stand apart)."""
        return {"model": self.name, "version": self.version}

    def warm_up(self, batches: list[Any], run: Callable[[Any], np.ndarray], units: Callable[[Any], int]) -> None:
        """Run each batch once (every shape the batcher can form, serving/adapters/base.py) so that no real
        request pays a shape's first-run cost; within `warmup_budget_s`, logged. The timings seed the batcher's
        admission (serving/batcher.py)."""
        if not self.ready:
            return
        start = time.perf_counter()
        try:
            for i, rows in enumerate(batches):
                if i and time.perf_counter() - start > self.settings.warmup_budget_s:
                    log.warning("warm-up stopped at its %g s budget: %d of %d shapes run",
                                self.settings.warmup_budget_s, i, len(batches))  # fmt: skip
                    break
                began = time.perf_counter()
                out = run(rows)
                if not np.isfinite(out).all():
                    raise RuntimeError("warm-up produced non-finite outputs")
                self.warmup_timings.append((sum(units(r) for r in rows), time.perf_counter() - began))
            else:
                log.info("warm-up: %d shapes in %.2f s", len(batches), time.perf_counter() - start)
            if self.serves:
                metrics.MODEL_INFO.labels(**self.labels, tag=self.art.tag, variant=self.variant,
                                          provider=self.provider).set(1)  # fmt: skip
        except Exception as exc:
            self.error = f"warm-up failed: {type(exc).__name__}: {exc}"
            log.error("model %s NOT ready: %s", self.settings.model_tag, self.error)

    def runtime(self) -> dict:
        return {"provider": self.provider,
                "providers": self.session.get_providers() if self.session is not None else []}  # fmt: skip

    def info(self) -> dict:
        if not self.ready:
            return {"ready": False, "model_tag": self.settings.model_tag, "error": self.error}
        m = self.manifest
        return {
            "ready": True, "model_tag": self.art.tag, "name": m.name, "version": m.version, "task": m.task,
            "labels": m.labels, "variant": self.variant, "variant_setting": self.settings.variant,
            "quantized": self.variant == "int8", "variants_available": sorted(m.onnx),
            "batching": {"enabled": self.settings.batching_enabled(), "max_batch_size": self.settings.max_batch_size,
                         "max_latency_ms": self.settings.max_latency_ms},
            "topology": self.settings.resolved_topology(), "workers": self.settings.http_workers(),
            "test_metrics": m.metrics.get("test", {}),  # per variant, as training recorded them
            "test_accuracy": {k: v["accuracy"] for k, v in m.metrics.get("test", {}).items()
                              if isinstance(v, dict) and "accuracy" in v},
        }  # fmt: skip


def load_model(adapter_cls: type[Adapter], settings: ServeCommon, *, with_session: bool,
               warmup_sizes: list[int] | None = None, serves: bool = True):  # fmt: skip
    """(adapter, model, run): the verified artifact read by the adapter; with a session, the timed batch
    function, warmed up before the process reports ready (else run is None): `warmup_sizes` batch sizes, by
    default the settings' (every size the batcher forms, and the adapter's other shapes). `serves`: as
    ServedModel's."""
    adapter = adapter_cls(settings)
    model = ServedModel(settings, adapter_cls.task, with_session=with_session, serves=serves)
    run = None
    if model.ready:
        adapter.load(model.art)
        if with_session:

            def run(rows) -> np.ndarray:
                start = time.perf_counter()
                out = adapter.run(model.session, rows)
                metrics.MODEL_SECONDS.labels(**model.labels).observe(time.perf_counter() - start)
                metrics.BATCH_SIZE.labels(**model.labels).observe(len(rows))
                return out

            sizes = warmup_sizes if warmup_sizes is not None else settings.warmup_sizes()
            session = model.session  # the warm-up's batches are not the traffic's: unmetered
            model.warm_up(adapter.warmup_batches(sizes), lambda rows: adapter.run(session, rows), adapter.cost_units)
            if model.ready:  # the warm-up's largest batches grew the arena: give back what rest does not need
                adapter.run(ArenaShrinking(session), adapter.warmup_batches([1])[0])
    return adapter, model, run
