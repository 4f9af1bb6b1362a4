"""The one typed configuration place.

Every field is overridable by environment variable (prefix shown per class) and, for the
training commands, by a CLI flag of the same name in kebab-case (pydantic-settings parses both).
`docs/configuration.md` is generated from these classes (`python -m servable.config_docs`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _cfg(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, cli_kebab_case=True, extra="ignore")


class TrainCommon(BaseSettings):
    """Practices shared by both models; each one is a flag and is recorded in the artifact."""

    name: str = Field(description="Model name in the BentoML model store.")
    version: str | None = Field(None, description="Version label; default: UTC timestamp.")
    runs_dir: Path = Field(Path("runs"), description="Where run outputs (metrics, plots, ONNX) go.")
    seed: int = Field(42, description="Seed for python, numpy, torch and the data split.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")
    amp: bool = Field(True, description="Mixed precision (bf16/fp16 autocast) when on CUDA.")
    num_threads: int = Field(0, description="torch CPU threads; 0 = all cores.")
    batch_size: int = Field(64, ge=1, description="Training mini-batch size.")
    epochs_head: int = Field(1, ge=0, description="Stage 1: epochs training the new head, backbone frozen.")
    epochs_finetune: int = Field(2, ge=0, description="Stage 2: epochs with the backbone unfrozen.")
    lr_head: float = Field(3e-3, gt=0, description="Learning rate of stage 1.")
    lr_finetune: float = Field(5e-4, gt=0, description="Learning rate of stage 2 (lower: keep features).")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Linear warm-up share of each stage.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (the L2 answer).")
    l1: float = Field(0.0, ge=0, description="Optional L1 penalty on the head weights.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the classification head.")
    patience: int = Field(2, ge=1, description="Early stopping: epochs without a gain in the monitored metric.")
    min_delta: float = Field(1e-4, ge=0, description="Early stopping: smallest monitored-metric gain that counts.")
    monitor: Literal["val_loss", "val_acc"] = Field(
        "val_loss", description="Early stopping and best-weights restore watch this validation metric."
    )
    clip_norm: float = Field(
        1.0,
        ge=0,
        description="Gradient clipping by global norm; 0 = off. A clean run's measured norms give a threshold that "
        "acts only as a safety net (python -m training clip-threshold; docs/training.md).",
    )
    average_last: int = Field(
        0,
        ge=0,
        description="Average the weights of the last N fine-tuning epochs (SWA-style); the average is "
        "kept only if it beats every single epoch on validation. 0 or 1 = off.",
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of training data held for validation.")
    calibrate: bool = Field(
        True, description="Fit a softmax temperature on the validation split and store it (serving applies it)."
    )
    abstain_coverage: float = Field(
        0.8, gt=0, le=1, description="The abstention threshold keeps this share of validation answers above it."
    )
    limit: int | None = Field(None, ge=10, description="Use at most this many training examples.")
    extra_data: Path | None = Field(
        None, description="Labelled data ADDED to the training split (never to validation or test), e.g. an export "
        "of the feedback queue (python -m serving.feedback export): image, a folder root/<class>/*; text, a "
        "CSV/JSONL with text,label (or a folder holding feedback.csv). Its labels must be the model's; copies of "
        "held-out examples are dropped. Recorded with its checksum in the artifact and model card. The data "
        "option (--data-dir, --data-file) replaces the data instead.",
    )  # fmt: skip
    test_limit: int | None = Field(None, ge=10, description="Evaluate on at most this many test examples.")
    quantize: bool = Field(True, description="Also produce and measure an int8 ONNX model.")
    register_model: bool = Field(True, description="Register the artifact in the BentoML model store.")
    progress: bool = Field(
        True, description="Show progress bars when stderr is a terminal (a log gets one line per epoch)."
    )


class ImageTrainConfig(TrainCommon):
    """Fine-tune EfficientNet-Lite0 (ImageNet) on Fashion-MNIST or an image folder."""

    model_config = _cfg("SERVABLE_IMAGE_")

    name: str = "fashion-cnn"
    data_dir: Path | None = Field(
        None, description="Image folder root/<class>/*.jpg; default: Fashion-MNIST (Debian package)."
    )
    fashion_mnist_dir: Path = Field(FASHION_MNIST_DIR, description="Where the Fashion-MNIST IDX files are.")
    limit: int | None = Field(20000, ge=10, description="Use at most this many training images.")
    image_size: int = Field(64, ge=16, le=512, description="Square input size the network sees.")
    architecture: Literal["efficientnet-lite0", "small-cnn"] = Field(
        "efficientnet-lite0",
        description="efficientnet-lite0, or small-cnn: three conv + pooling blocks and a softmax head "
        "(from scratch only; its native size is 28 px).",
    )
    pretrained: bool = Field(True, description="ImageNet weights; false trains from scratch.")
    augment: bool = Field(True, description="kornia flips, small affine jitter and random erasing.")
    calibration_size: int = Field(256, ge=8, description="Training images used to calibrate int8.")
    parity_tolerance: float = Field(1e-3, gt=0, description="Max |ONNX - PyTorch| logit diff allowed.")

    @model_validator(mode="after")
    def _small_cnn_from_scratch(self) -> ImageTrainConfig:
        if self.architecture == "small-cnn" and self.pretrained:
            raise ValueError("the small CNN has no pretrained weights: pass --pretrained false")
        return self


# The bundled data's domains; by default Amazon product reviews are the held-out out-of-domain set.
TextDomain = Literal["movies", "tweets", "editorials", "amazon"]


class TextTrainConfig(TrainCommon):
    """Fine-tune a BERT-family encoder for sentiment."""

    model_config = _cfg("SERVABLE_TEXT_")

    name: str = "sentiment-bert"
    data_file: Path | None = Field(
        None, description="CSV/JSONL with text,label columns; default: bundled review sentences."
    )
    backbone: str | None = Field(None, description="Hugging Face name or local dir; default: bundled all-MiniLM-L6-v2.")
    datasets_dir: Path = Field(Path(".cache/datasets"), description="Where `make data` put the vaderSentiment sdist.")
    domains: list[TextDomain] = Field(
        ["movies", "tweets", "editorials"],
        min_length=1,
        description="Bundled data: the domains trained and tested on (movie reviews, tweets, NYT editorial "
        "sentences, Amazon product reviews); default: all but --held-out. A --data-file brings its own "
        "domains (its optional `domain` column).",
    )
    held_out: TextDomain = Field(
        "amazon",
        description="Bundled data: the domain never trained on, tested as out-of-domain (leave-one-domain-out "
        "comparisons: docs/training.md).",
    )
    max_length: int = Field(64, ge=8, le=512, description="Tokens per text (truncation length).")
    optimize: bool = Field(True, description="Also produce ONNX Runtime's fused-transformer graph.")
    batch_size: int = 32
    limit: int | None = Field(None, ge=10, description="Use at most this many training sentences.")
    epochs_head: int = 0
    # Defaults chosen by the comparison in docs/training.md ("Text model: what moved accuracy"); 2 epochs
    # since the default trains on three domains (~1.6x the sentences): validation loss was lowest after
    # epoch 2 in every seed of the movie-only recipe, and the main job keeps its time budget.
    epochs_finetune: int = 2
    lr_head: float = 1e-3
    lr_finetune: float = 1e-4
    dropout: float = 0.1
    freeze_embeddings: bool = Field(
        True, description="Keep the token/position embeddings frozen while fine-tuning (less overfitting, faster)."
    )
    freeze_layers: int = Field(0, ge=0, description="Keep the lowest N encoder layers frozen while fine-tuning.")
    parity_tolerance: float = Field(1e-3, gt=0, description="Max |ONNX - PyTorch| logit diff allowed.")
    class_weights: Literal["none", "class", "domain-class"] = Field(
        "none",
        description="Loss weights against label imbalance: class = inverse label frequency; domain-class = "
        "inverse frequency of each (domain, label) pair, so each domain's positives and negatives weigh the "
        "same in total. Opt-in: measured in docs/training.md (leave one domain out).",
    )
    threshold_sample: int = Field(
        200,
        ge=0,
        description="Bundled data: held-out-domain sentences (a seeded draw) on which that domain's decision "
        "threshold is fitted, as a user with a few labels would; the report scores the rest with and without "
        "it. Reported only (serving answers by the top class); 0 = off.",
    )
    report_json: Path | None = Field(
        None, description="Also write the run's figures (by domain, class balance, decision thresholds) here."
    )

    @model_validator(mode="after")
    def _held_out_is_not_trained(self) -> TextTrainConfig:
        if "domains" not in self.model_fields_set:  # --held-out X alone: train on every other domain
            self.domains = [d for d in get_args(TextDomain) if d != self.held_out]
        if self.held_out in self.domains:
            raise ValueError(
                f"--held-out {self.held_out} is also in --domains: the held-out domain is never trained on"
            )
        return self


def jobs_field(why: str) -> Any:
    """A study's `jobs` setting (training/cell_pool.py runs its cells)."""
    return Field(0, ge=0, description="Cells trained at once, each in its own process with an equal share of the "
                 f"cores ({why}); 0 = one per core, at most 4; 1 = one at a time in this process.")  # fmt: skip


class LimitedDataConfig(ImageTrainConfig):
    """The limited-data study: transfer learning (linear probe, fine-tuned, slower backbone) vs a small CNN from
    scratch, and augmentation, pseudo-labels, FixMatch, rotation pre-training and active learning on the small CNN."""

    model_config = _cfg("SERVABLE_LIMITED_")

    sizes: list[int] = Field([300, 1000, 3000, 10000], description="Labelled training-set sizes.")
    seeds: list[int] = Field([0, 1, 2], description="One run per seed at each size (labelled draw and init).")
    test_limit: int | None = 2000
    image_size: int = Field(64, ge=16, le=512, description="EfficientNet input size (the small CNN uses 28).")
    epochs_head: int = 1
    epochs_finetune: int = 3
    patience: int = 3
    monitor: Literal["val_loss", "val_acc"] = "val_acc"
    quantize: bool = False
    register_model: bool = False
    tune_size: int = Field(1000, ge=20, description="Labelled size at which each arm's lr and epochs are tuned.")
    tune_lrs: list[float] = Field([1e-3, 3e-3, 1e-2], description="From-scratch learning rates tried.")
    tune_lrs_probe: list[float] = Field([1e-3, 3e-3, 1e-2], description="Linear-probe (head) learning rates tried.")
    tune_lrs_pretrained: list[float] = Field([1e-4, 3e-4, 1e-3], description="Fine-tuning learning rates tried.")
    tune_lrs_slow_backbone: list[float] = Field(
        [1e-3, 3e-3, 1e-2], description="Slower-backbone fine-tuning: the head's learning rates tried."
    )
    probe_max_epochs: int = Field(30, ge=1, description="Tuning: most epochs tried, linear probe.")
    pretrained_max_epochs: int = Field(2, ge=1, description="Tuning: most fine-tuning epochs tried, pretrained.")
    small_cnn_max_epochs: int = Field(12, ge=1, description="Tuning: most epochs tried, small CNN.")
    backbone_lr_factor: float = Field(0.1, gt=0, lt=1, description="Slower-backbone arm: backbone lr / head lr.")
    finetune_frozen_bn: bool = Field(
        True, description="Transfer fine-tune arms: the backbone's BatchNorm keeps its ImageNet statistics."
    )
    unlabelled_pool: int = Field(10000, ge=10, description="Unlabelled images (rest of the training set) used.")
    pseudo_threshold: float = Field(0.95, gt=0, le=1, description="Top-1 probability a pseudo-label needs.")
    pseudo_epochs: int = Field(3, ge=1, description="Epochs of the second (self-training) round.")
    fixmatch_steps: int = Field(200, ge=1, description="FixMatch: optimiser steps from the baseline's weights.")
    fixmatch_mu: int = Field(3, ge=1, description="FixMatch: unlabelled images per labelled one in a step.")
    fixmatch_weight: float = Field(1.0, ge=0, description="FixMatch: weight of the unlabelled loss.")
    fixmatch_eval_every: int = Field(50, ge=1, description="FixMatch: steps between validations (early stopping).")
    ssl_epochs: int = Field(4, ge=1, description="Rotation pre-training: epochs over the unlabelled pool.")
    ssl_lr: float = Field(3e-3, gt=0, description="Rotation pre-training: learning rate.")
    active_initial: float = Field(0.5, gt=0, lt=1, description="Share of the label budget drawn at random first.")
    active_rounds: int = Field(1, ge=1, description="Uncertainty rounds that fill the rest of the budget.")
    jobs: int = jobs_field(
        "two cells on a core each finish sooner than one after the other on both; each process "
        "holds the image pools, about 1.2 GB"
    )
    output: Path = Field(Path("docs/results/limited_data"), description="Where the JSON, table and plot go.")


class DomainStudyConfig(TextTrainConfig):
    """The text domain-transfer study: a base model per held-out domain, then k labelled in-domain examples added."""

    model_config = _cfg("SERVABLE_DOMAIN_STUDY_")

    held_out_domains: list[TextDomain] = Field(
        ["amazon", "movies"], min_length=1,
        description="The domains studied, each in turn held out of its base model (the others train it).",
    )  # fmt: skip
    labels_added: list[int] = Field([0, 50, 200, 1000], description="In-domain labelled examples added (k).")
    seeds: list[int] = Field([0, 1, 2], description="One base model and one draw of each k per seed.")
    base_limit: int | None = Field(3000, ge=10, description="Base model: training sentences (a prefix of the split).")
    base_val_limit: int = Field(200, ge=10, description="Base model: validation sentences of its domains.")
    epochs_finetune: int = 1
    candidate_pool: int = Field(2000, ge=10, description="Unlabelled in-domain sentences both arms choose from.")
    adapt_lr: float = Field(5e-5, gt=0, description="Adaptation: fine-tuning rate (half the base recipe's).")
    adapt_epochs: int = Field(1, ge=1, description="Adaptation: fewest epochs (more when a set is small).")
    adapt_min_steps: int = Field(30, ge=1, description="Adaptation: fewest optimiser steps, whatever k.")
    adapt_batch_size: int = Field(16, ge=1, description="Adaptation: mini-batch size.")
    adapt_val_limit: int = Field(200, ge=10, description="Adaptation: validation sentences of the new domain.")
    replay: float = Field(0.5, ge=0, description="Adaptation: base training sentences replayed per new one.")
    test_limit: int | None = Field(500, ge=10, description="Test sentences of the new domain scored per cell.")
    forgetting_limit: int = Field(200, ge=10, description="Test sentences of the base's domains scored per cell.")
    pause_file: Path | None = Field(None, description="While this file exists, wait before the next cell.")
    jobs: int = jobs_field(
        "for this BERT, level with one after the other on all the cores; each process holds a BERT being "
        "fine-tuned, about 2 GB"
    )
    register_model: bool = False
    quantize: bool = False
    optimize: bool = False
    calibrate: bool = False
    output: Path = Field(Path("docs/results/domain_study"), description="Where the JSON, table and plot go.")

    @model_validator(mode="after")
    def _bundled_domains_only(self) -> DomainStudyConfig:
        if self.data_file is not None or self.extra_data is not None:
            raise ValueError("the domain study holds out the bundled domains in turn: --data-file and --extra-data "
                             "do not apply")  # fmt: skip
        return self


# ---------------------------------------------------------------- serving


def gpu_present() -> bool:
    """An NVIDIA device node is there: the cheap check used for defaults (the session reports the truth)."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def cpu_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU set, capped by a cgroup CPU quota (a container's
    `cpus:` / Kubernetes CPU limit), so a 2-CPU pod on a 64-core node starts 2 workers, not 64."""
    cores = len(os.sched_getaffinity(0))
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


class ServeCommon(BaseSettings):
    """Settings of one served model (both services share these fields, each with its own prefix)."""

    model_tag: str = Field(description="BentoML model-store tag, e.g. fashion-cnn:latest or name:version.")
    variant: Literal["auto", "fp32", "int8", "optimized"] = Field(
        "auto",
        description="Which ONNX file of the artifact. auto: int8 on CPU when the artifact's recorded int8 test "
        "accuracy is within auto_int8_max_drop of fp32, else fp32; fp32 on a GPU.",
    )
    auto_int8_max_drop: float = Field(
        0.005, ge=0, le=1, description="variant=auto: largest int8 accuracy loss (absolute) that still serves int8."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA provider when it loads.")
    topology: Literal["auto", "inprocess", "split"] = Field(
        "auto",
        description="inprocess: each HTTP worker owns an ONNX Runtime session and an adaptive batcher (no hop). "
        "split: one batching model process (per GPU) fed by the HTTP workers over BentoML's dependency call. "
        "auto: split where a GPU will run the model, else inprocess.",
    )
    workers: int = Field(0, ge=0, description="HTTP worker processes per replica; 0 = one per CPU core.")
    model_workers: int = Field(1, ge=1, description="split topology: model processes per replica (one per GPU).")
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per session; 0 = auto: 1 for in-process CPU workers (one "
        "worker per core, measured in docs/benchmark.md), ONNX Runtime's default otherwise.",
    )
    intra_op_spinning: bool = Field(
        False, description="Let ONNX Runtime's idle intra-op threads busy-wait (takes CPU from the HTTP workers)."
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level."
    )
    batching: bool | Literal["auto"] = Field(
        "auto",
        description="Adaptive batching of the model call: true, false, or auto = on with a GPU, else the model's "
        "measured CPU default (cpu_batching).",
    )
    cpu_batching: bool = Field(True, description="What batching=auto means on CPU (set per model from the benchmark).")
    max_batch_size: int = Field(32, ge=1, description="Largest batch the model runs (items).")
    max_latency_ms: int = Field(
        2000, ge=10, description="Queue-wait bound of the batcher; a call that waited longer is refused (503)."
    )
    max_items: int = Field(16, ge=1, description="Most items (images or texts) in one request.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body; above: 413.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight per worker; above: 429 at once.")
    decode_threads: int = Field(
        2,
        ge=1,
        description="Threads per HTTP worker decoding inputs too large for its event loop (large images, "
        "long texts); the event loop keeps parsing other requests meanwhile.",
    )
    decode_timeout_s: float = Field(
        10.0, gt=0, description="A request's decoding deadline, its wait for a decode thread included; beyond: 503."
    )
    timeout_s: float = Field(30.0, gt=0, description="Request timeout.")
    model_call_timeout_s: float = Field(
        10.0,
        gt=0,
        description="split topology: deadline of one attempt of the call to the model process; a stuck attempt "
        "is retried (inference is idempotent). Keep it above max_latency_ms plus a batch's run time.",
    )
    runner_max_requests: int = Field(
        1_000_000_000,
        ge=1,
        description="split topology: calls before BentoML recycles its client session to the model process "
        "(its default of 100 drops calls in flight).",
    )
    runner_max_age_s: float = Field(
        1e9, gt=0, description="split topology: seconds before BentoML recycles that client session."
    )
    warmup_batches: list[int] | None = Field(
        None,
        description="Batch sizes run once at start-up before ready; unset: every size the batcher can form (1 to "
        "max_batch_size, 1 with batching off), with the model's other shapes (text: each length up to its maximum).",
    )
    warmup_budget_s: float = Field(
        60.0, gt=0, description="Most seconds the start-up warm-up may take; the shapes left are skipped, logged."
    )
    server_timing: bool = Field(
        True, description="Server-Timing (decode, queue, model, encode, total) and x-batch-size headers on answers."
    )
    explain_max_concurrency: int = Field(
        1,
        ge=1,
        description="Explanations computed at once per worker (each is many model rows: its own limit); in-process "
        "topology: also the worker's explain processes (each holds the model).",
    )
    explain_max_queue: int = Field(
        4, ge=0, description="Explanations waiting for a slot per worker; beyond: 429 at once (explain_busy)."
    )
    explain_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Bound on an explanation's wait for a slot plus its model rows; past it: 503 (explain_timeout).",
    )
    explain_max_rows: int = Field(
        65,
        ge=2,
        description="Most model rows one explanation may cost: the item plus one occluded copy per image patch "
        "(1 + grid²) or per word (1 + words). The largest grid and word count follow from it (65: grid 8, 64 "
        "words); above: 422 on grid, 413 too_many_words. About 4 full image predict requests (16 items each).",
    )
    explain_chunk_rows: int = Field(
        4,
        ge=1,
        description="split topology: rows per call of an explanation to the model process's explain lane (run only "
        "while no prediction is in flight there; a prediction arriving meanwhile shares the model with that chunk).",
    )
    explain_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="How much lower the OS priority of the explain process is than the worker's (nice increment, "
        "and Linux's SCHED_IDLE class when above 0; in-process topology): the predict path gets the CPU first. "
        "0 = same priority.",
    )

    # Shadow scoring (serving/shadow.py): a candidate version scores a share of the live requests' rows off
    # the request path; the answers stay the live model's.
    shadow_tag: str = Field(
        "",
        description="Shadow scoring: the candidate's model-store tag (name:version), loaded and verified beside the "
        "served model; it must declare the same inputs and pre-processing (else the replica never becomes ready). "
        "Empty: off.",
    )
    shadow_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Shadow scoring: share of live requests whose rows the candidate also scores, in a low-priority "
        "thread after the answer's prediction. 0: off (the candidate is not loaded, the request path is unchanged).",
    )
    shadow_queue: int = Field(
        64, ge=1, description="Shadow scoring: sampled requests waiting for the candidate; when full, dropped, counted."
    )
    shadow_tolerance: float = Field(
        0.05,
        ge=0,
        description="Shadow scoring of a regressor: the candidate agrees when its value is within this share of the "
        "live value (classifiers agree on the top label).",
    )

    def shadow_on(self) -> bool:
        return self.shadow_share > 0

    @model_validator(mode="after")
    def _shadow_is_servable(self) -> ServeCommon:
        if self.shadow_on() and not self.shadow_tag:
            raise ValueError("shadow_share > 0 needs shadow_tag: the candidate version to score")
        if self.shadow_on() and self.resolved_topology() == "split":
            raise ValueError("shadow scoring runs in the in-process topology only (the split topology's HTTP "
                             "workers hold no model): set shadow_share 0 or topology inprocess")  # fmt: skip
        return self

    # ---- input drift (serving/drift.py, docs/serving.md#drift)
    drift_window: int = Field(
        500,
        ge=1,
        description="Requests in each HTTP worker's rolling window of input statistics; the population-stability "
        "index (servable_drift_psi) is exported once a window is full, against the artifact's reference.",
    )
    drift_psi_alert: float = Field(
        0.2,
        gt=0,
        description="PSI above which a feature counts as drifted: the ServableInputDrift alert's threshold (the "
        "replica exports it as servable_drift_psi_alert) and the replica's own warning line.",
    )

    def on_gpu(self) -> bool:
        """The model is meant for a GPU: device cuda, or auto with an NVIDIA device present."""
        return self.device == "cuda" or (self.device == "auto" and gpu_present())

    def warmup_sizes(self) -> list[int]:
        if self.warmup_batches is not None:
            return self.warmup_batches
        return list(range(1, (self.max_batch_size if self.batching_enabled() else 1) + 1))

    def batching_enabled(self) -> bool:
        """`batching` resolved: auto means on where a GPU will run the model, else `cpu_batching`."""
        if self.batching != "auto":
            return self.batching
        return self.on_gpu() or self.cpu_batching

    def resolved_topology(self) -> Literal["inprocess", "split"]:
        if self.topology != "auto":
            return self.topology
        return "split" if self.on_gpu() else "inprocess"

    def http_workers(self) -> int:
        return self.workers or cpu_cores()

    def resolved_intra_op_threads(self) -> int:
        """0 leaves ONNX Runtime's default (one thread per core)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return 1 if self.resolved_topology() == "inprocess" and not self.on_gpu() else 0


class ImageServeSettings(ServeCommon):
    model_config = _cfg("SERVABLE_IMAGE_SERVE_")

    model_tag: str = "fashion-cnn:latest"
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Largest image area (pixels), checked on the image's header before decoding "
        "(decompression bombs): a 24-megapixel photo passes; a JPEG is decoded at a scale near the model's input.",
    )
    max_image_side: int = Field(12_000, ge=1, description="Longest side of an image (pixels), checked on its header.")
    max_aspect_ratio: float = Field(20.0, ge=1, description="Longest side / shortest side of an image, at most.")
    max_request_pixels: int = Field(
        50_000_000, ge=1, description="All images of one request together, at most this many pixels (declared)."
    )
    top_k: int = Field(3, ge=1, description="Default number of labels returned.")
    explain_grid: int = Field(
        8, ge=2, description="Default occlusion grid of /classify/explain (grid x grid patches: 1 + grid² model rows)."
    )
    explain_overlay_max_pixels: int = Field(
        4_000_000, ge=1, description="Overlay PNGs of larger inputs are scaled down to this many pixels."
    )

    def explain_max_grid(self) -> int:
        """The largest grid a request may ask for: the finest whose 1 + grid² rows fit `explain_max_rows`."""
        return math.isqrt(self.explain_max_rows - 1)

    @model_validator(mode="after")
    def _grid_fits_the_row_bound(self) -> ImageServeSettings:
        if self.explain_max_grid() < 2 or self.explain_grid > self.explain_max_grid():
            raise ValueError(f"explain_grid {self.explain_grid} costs 1 + grid² = {1 + self.explain_grid**2} model "
                             f"rows; explain_max_rows is {self.explain_max_rows} (at least 5: grid 2)")  # fmt: skip
        return self


class TextServeSettings(ServeCommon):
    model_config = _cfg("SERVABLE_TEXT_SERVE_")

    model_tag: str = "sentiment-bert:latest"
    max_items: int = 64
    max_body_bytes: int = 1024 * 1024
    max_text_chars: int = Field(5000, ge=1, description="Longest text accepted (characters).")
    length_buckets: bool = Field(True, description="Split a batch into groups of similar token length.")
    bucket_waste: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Padding share allowed in a length bucket before it is split (0.1 costs the "
        "text model less CPU per answer than 0.3: docs/benchmark.md).",
    )

    def explain_max_words(self) -> int:
        """Most words /sentiment/explain takes: one model row per word, plus the text itself."""
        return self.explain_max_rows - 1


MIN_KEY_CHARS = 8


def parse_api_keys(text: str) -> dict[str, str]:
    """key -> name from `name:key` entries separated by newlines or commas; `#` starts a comment."""
    keys: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        if not sep or not name.strip() or len(key.strip()) < MIN_KEY_CHARS:
            raise ValueError(f"API key entries must be `name:key` with a key of at least {MIN_KEY_CHARS} characters")
        keys[key.strip()] = name.strip()
    return keys


class AuthSettings(BaseSettings):
    """API keys for the inference endpoints; health and metrics stay open unless metrics_require_key."""

    # The error of a malformed key must not print the keys (pydantic shows the input by default).
    model_config = _cfg("SERVABLE_AUTH_") | SettingsConfigDict(hide_input_in_errors=True)

    required: bool = Field(True, description="Refuse inference calls without a valid key (401).")
    keys_file: Path | None = Field(
        None, description="File of `name:key` lines (a mounted secret); re-read when it changes."
    )
    keys: str = Field("", description="Inline `name:key,name2:key2` (for development; prefer keys_file).")
    header: str = Field("x-api-key", description="Header carrying the key (or Authorization: Bearer).")
    failed_limit: int = Field(
        10,
        ge=1,
        description="Failed authentications a client address may make per failed_window_s (per worker); "
        "beyond, its requests get 429 until the window refills.",
    )
    failed_window_s: float = Field(60.0, gt=0, description="Window of failed_limit, in seconds.")
    metrics_require_key: bool = Field(False, description="Also require a key on /metrics.")

    @model_validator(mode="after")
    def _keys_well_formed(self) -> AuthSettings:
        """Malformed keys stop the service at start with a clear error, never each request with a 500."""
        parse_api_keys(self.keys)
        if self.keys_file is not None and self.keys_file.is_file():  # a file mounted later is read when it comes
            try:
                parse_api_keys(self.keys_file.read_text())
            except OSError as exc:  # e.g. a secret whose group the container does not have
                raise ValueError(f"{self.keys_file}: cannot be read ({exc.strerror})") from None
            except ValueError as exc:
                raise ValueError(f"{self.keys_file}: {exc}") from None
        return self


# ---------------------------------------------------------------- privacy: audit log, feedback loop


class AuditSettings(BaseSettings):
    """Audit trail: who (API-key name, never the key) called what, when, with which outcome. No content."""

    model_config = _cfg("SERVABLE_AUDIT_")

    file: Path | None = Field(
        None, description="JSON-lines audit file; default: none, audit lines go to stderr (logger servable.audit)."
    )
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Rotate the audit file at this size (bytes).")
    backup_count: int = Field(10, ge=1, description="Rotated audit files kept; older ones are deleted (retention).")


class FeedbackSettings(BaseSettings):
    """Opt-in feedback loop: low-confidence, flagged, sampled or shadow-disagreeing predictions queued for
    labelling, only with consent."""

    model_config = _cfg("SERVABLE_FEEDBACK_")

    enabled: bool = Field(False, description="Queue items for labelling at all (off: nothing is ever stored).")
    dir: Path = Field(Path("runs/feedback"), description="Queue root; one sub-folder per model.")
    confidence_threshold: float = Field(
        0.6, ge=0, le=1, description="Top-1 probability below which a prediction is low-confidence."
    )
    sample_share: float = Field(
        0.0, ge=0, le=1, description="Share of opted-in predictions queued whatever their confidence (reason "
        "`sampled`: an unbiased sample beside the uncertain ones); chosen by a hash of the input, so the same input "
        "is always in or out.",
    )  # fmt: skip
    retention_days: float = Field(30.0, gt=0, description="Queued items older than this are deleted.")
    max_items: int = Field(10_000, ge=1, description="Most queued items per model; when full, new ones are dropped.")
    max_bytes: int = Field(
        256 * 2**20, ge=1, description="Most bytes the whole queue folder holds (all models); when full, new items "
        "are dropped (bound it below the volume's size).",
    )  # fmt: skip
    max_item_bytes: int = Field(
        2**20, ge=1, description="Largest stored item (scrubbed text or PNG); a larger one is dropped."
    )
    flag_keys: str = Field(
        "", description="Comma-separated API-key names whose x-servable-feedback header is honoured (opt-in and "
        "flag); other callers' inputs are never stored. `*`: every caller, also anonymous ones when auth is off.",
    )  # fmt: skip

    def key_may_store(self, key_name: str | None) -> bool:
        """Whether the caller's opt-in is honoured: its key is listed (or `*` lists every caller)."""
        names = {n.strip() for n in self.flag_keys.split(",")} - {""}
        return "*" in names or (key_name is not None and key_name in names)


# ---------------------------------------------------------------- the served models: one list


@dataclass(frozen=True)
class ServedModelEntry:
    """One served model. The launcher, the API reference, the local stack's environment, the
    dashboard's route filter and Prometheus' scrape jobs (deploy/render.py) are derived from
    SERVED_MODELS; a test checks that the compose, Kubernetes and nginx files cover every entry."""

    kind: str  # short name: CLI choices, replica names, nginx path prefix (/<kind>/)
    service: str  # `bentoml serve` target
    settings: type[ServeCommon]
    route: str  # the REST predict route
    port: int  # `make serve` port
    docs_name: str  # docs/api/<docs_name>.openapi.json
    service_name: str  # BentoML name of the public service: metrics' service_name, audit and alert selectors
    model_service_name: str  # BentoML name of the split topology's model process
    # The options a client may put in the query string (the only ones the proxy lets through:
    # deploy/nginx/servable-query.conf is generated from these).
    query_options: tuple[str, ...] = ()
    # One request the load test (loadtest/locustfile.py) sends to `route`, whose answer must hold a
    # non-empty "predictions" list: a JSON body ("{...}"), or "module:function" returning the keyword
    # arguments of a `requests` POST (json=, or files=/data=), with "items" = the predictions expected.
    example: str = ""

    @property
    def env_prefix(self) -> str:
        return self.settings.model_config["env_prefix"]


SERVED_MODELS: dict[str, ServedModelEntry] = {
    e.kind: e
    for e in (
        ServedModelEntry(
            "image",
            "serving.image_service:ImageClassifier",
            ImageServeSettings,
            "/classify",
            3000,
            "image",
            "image_classifier",
            "image_model",
            query_options=("top_k", "grid", "overlay", "label"),
            # a 16x16 checkerboard PNG
            example='{"images": ["iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAAAAAA6mKC9AAAAEElEQVR42mNgOEEAMowo'
            'FQAkK2QBPD0KnQAAAABJRU5ErkJggg=="]}',
        ),
        ServedModelEntry(
            "text",
            "serving.text_service:SentimentClassifier",
            TextServeSettings,
            "/sentiment",
            3001,
            "sentiment",
            "sentiment_classifier",
            "sentiment_model",
            example='{"texts": ["A fine, moving film.", "Dull and far too long."]}',
        ),
    )
}
