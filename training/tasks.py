"""The models `python -m training` trains: one entry per trainable task in `TASKS`.

What differs between the trainable models is said here, once: the settings class (its fields are the
CLI flags and the recipe recorded in the artifact), the config field that names the user's own data, the
model card's model-specific wording, the key of the documented figures the release gate holds a default
run to, and the pipeline's entry points. The CLI (training/__main__.py), the model card
(training/model_card.py), the gate (training/gates.py), the gallery of a registered model
(training/review.py) and the end-of-job summary (training/summary.py) loop over or look up `TASKS` and
never ask which model they handle. A new trainable model is one entry here and its pipeline module.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servable.artifact import ModelManifest
from servable.config import ImageTrainConfig, TextTrainConfig, TrainCommon
from training.card_format import show

if TYPE_CHECKING:
    import numpy as np

    from servable.artifact import Artifact


class UnknownTask(LookupError):
    """An artifact whose task no entry of TASKS trains."""


@dataclass
class LabelledLogits:
    """A set of examples scored by the model: its logits, true labels (None: no label is right, e.g. digits
    shown to a clothing classifier) and whether it is like the training data."""

    logits: np.ndarray
    y: np.ndarray | None
    in_domain: bool


@dataclass(frozen=True)
class TrainableTask(ABC):
    kind: str  # the CLI subcommand, and the key of its figures in docs/results/training/documented.json
    task: str  # the manifest's task, `<input>-<task>`
    config: type[TrainCommon]  # its settings: flags, environment variables, the recipe in the artifact
    data_key: str  # the config field naming the user's own data; unset: the bundled data set
    help: str  # what `python -m training <kind>` does, as its --help says
    # "module:function" entry points of the pipeline, imported when called: the pipelines import torch, and
    # they reach this module themselves (through run_dir's model card and gate).
    train_entry: str  # f(cfg) -> the run: train, export, gate and register
    review_entry: str  # f(cfg, art, session, out, n) -> (true labels, probabilities, gallery entries)
    calibration_entry: str  # f(cfg, art, session) -> {set name: LabelledLogits}, "validation" first
    faithfulness_entry: str  # f(cfg, art, session, n) -> (inputs, score(inputs) -> probs, {absence: Parts maker})
    domain_study = False  # `make domain-study` measures its bundled data's domains (its card quotes the headline)

    @property
    def default_name(self) -> str:
        """The model-store name a run on the defaults registers."""
        return self.config.model_fields["name"].default

    def bundled(self, m: ModelManifest) -> bool:
        """Trained on the bundled data set (the config records no user folder or file)."""
        return self.data_key in m.training_config and m.training_config[self.data_key] is None

    def train(self, cfg: TrainCommon) -> Any:
        return _entry(self.train_entry)(cfg)

    def review(
        self, cfg: TrainCommon, art: Artifact, session: Any, out: Path, n: int
    ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """The rebuilt test split scored by `session` (the artifact's fp32 model), with the gallery of its
        `n` most confident mistakes written to `out`."""
        return _entry(self.review_entry)(cfg, art, session, out, n)

    def calibration_sets(self, cfg: TrainCommon, art: Artifact, session: Any) -> dict[str, LabelledLogits]:
        """The validation split, the test split and the out-of-domain sets the task has, rebuilt from `cfg`
        and scored by `session` (training/calibration.py)."""
        return _entry(self.calibration_entry)(cfg, art, session)

    def faithfulness_sample(self, cfg: TrainCommon, art: Artifact, session: Any, n: int) -> tuple:
        """`n` held-out inputs, the served probabilities of a list of inputs, and the notions of absence to
        compare, each a maker of the input's `Parts` (training/faithfulness.py)."""
        return _entry(self.faithfulness_entry)(cfg, art, session, n)

    # The model card's model-specific wording (training/model_card.py writes the rest).

    @abstractmethod
    def intended_use(self, m: ModelManifest) -> tuple[str, list[str]]:
        """What the model is for, and the out-of-scope uses, one per item."""

    @abstractmethod
    def backbone(self, m: ModelManifest) -> str:
        """The network it starts from and what was added to it."""

    @abstractmethod
    def mistake(self, entry: dict, what: str) -> str:
        """One of the most confident test mistakes (an entry of the run's gallery.json); `what` says
        "<true> called <predicted> at <confidence>"."""


def _entry(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class ImageTask(TrainableTask):
    def intended_use(self, m: ModelManifest) -> tuple[str, list[str]]:
        labels = ", ".join(m.labels)
        size = m.image_preprocessing.size if m.image_preprocessing else m.training_config.get("image_size")
        if self.bundled(m):
            use = (f"Classifies a picture of one garment or shoe into one of the {len(m.labels)} Fashion-MNIST "
                   f"classes ({labels}). It learned from Fashion-MNIST's 28x28 grey-level product photos: one "
                   f"centred item on a plain background, seen at {size} px. It is the reference image model of "
                   "the Servable deployment: fit for product pictures like those, and for trying the serving "
                   "stack.")  # fmt: skip
        else:
            use = (f"Classifies images into the classes of its training folder ({labels}), for images like "
                   f"those it was trained on (seen at {size} px).")  # fmt: skip
        out = [
            "images unlike the training data: photos of people wearing clothes, several items in one picture, "
            "cluttered backgrounds"
            if self.bundled(m)
            else "images unlike the training folder's",
            "anything outside its classes: it has no 'other' answer and always names one of its classes",
            "decisions about people, or any decision without a human check of its answers",
        ]
        if self.bundled(m):
            out.insert(1, "colour: it sees grey levels only (colour images are converted)")
        return use, out

    def backbone(self, m: ModelManifest) -> str:
        c = m.training_config
        arch = c.get("architecture", "efficientnet-lite0")
        start = "ImageNet weights" if c.get("pretrained", True) else "random initialisation (from scratch)"
        return f"{arch}, from {start}, with a new dropout + linear head"

    def mistake(self, entry: dict, what: str) -> str:
        return f"test image {entry['test_index']}: {what}"


class TextTask(TrainableTask):
    domain_study = True

    def intended_use(self, m: ModelManifest) -> tuple[str, list[str]]:
        labels = ", ".join(m.labels)
        max_len = m.text_preprocessing.max_length if m.text_preprocessing else m.training_config.get("max_length")
        if self.bundled(m):
            use = (f"Tells the sentiment ({labels}) of short English texts like those it was trained on: "
                   f"{m.provenance.get('source')}. It is the reference text model of the Servable "
                   "deployment.")  # fmt: skip
        else:
            data = m.training_config.get(self.data_key)
            use = (f"Sorts short texts into the labels of its training data ({labels}), for texts like "
                   f"those in {Path(str(data)).name if data else 'its training data'}.")  # fmt: skip
        out = [
            "languages other than its training data's",
            f"long documents: only the first {max_len} tokens are read" if max_len else "long documents: they are cut",
            "neutral, mixed or off-topic texts: it has no 'neutral' answer and always names one of its labels",
            "texts of other kinds than its training data: the out-of-domain figures below show what that costs",
            "decisions about individuals (moderation, screening) without human review",
        ]
        return use, out

    def backbone(self, m: ModelManifest) -> str:
        return (f"{show(m.provenance.get('backbone', m.training_config.get('backbone')))}, a pretrained "
                "BERT-family encoder with a new classification head")  # fmt: skip

    def mistake(self, entry: dict, what: str) -> str:
        top = max(entry.get("words", []), key=lambda w: w["score"], default=None)
        said = entry["text"].replace("|", "\\|")
        pushed = f' (the word that pushed most: "{top["word"]}")' if top else ""
        return f'{what}: "{said}"{pushed}'


TASKS: dict[str, TrainableTask] = {
    t.kind: t
    for t in (
        ImageTask(
            kind="image",
            task="image-classification",
            config=ImageTrainConfig,
            data_key="data_dir",
            help="Fine-tune the image classifier, export it to ONNX (fp32 + int8) and register it.",
            train_entry="training.image_pipeline:train_image",
            review_entry="training.image_pipeline:review_test_split",
            calibration_entry="training.image_pipeline:registered_calibration_sets",
            faithfulness_entry="training.image_pipeline:faithfulness_sample",
        ),
        TextTask(
            kind="text",
            task="text-classification",
            config=TextTrainConfig,
            data_key="data_file",
            help="Fine-tune the sentiment BERT, export to ONNX (fp32, ORT-optimised, int8) and register it.",
            train_entry="training.text_pipeline:train_text",
            review_entry="training.text_pipeline:review_test_split",
            calibration_entry="training.text_pipeline:registered_calibration_sets",
            faithfulness_entry="training.text_pipeline:faithfulness_sample",
        ),
    )
}


def for_task(task: str) -> TrainableTask:
    """The entry that trains artifacts of `task` (a manifest's task)."""
    for entry in TASKS.values():
        if entry.task == task:
            return entry
    known = ", ".join(t.task for t in TASKS.values())
    raise UnknownTask(f"no trainable task makes {task!r} artifacts (training/tasks.py knows {known})")
