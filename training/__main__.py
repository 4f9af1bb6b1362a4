"""`python -m training image|text|limited-data|gallery|card|document [--flags]`; every flag is also an env variable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from servable.config import ImageTrainConfig, LimitedDataConfig, TextTrainConfig
from training.data_images import DataError
from training.gates import GateFailed


class ImageCommand(ImageTrainConfig):
    """Fine-tune the image classifier, export it to ONNX (fp32 + int8) and register it."""

    def cli_cmd(self) -> None:
        from training.image_pipeline import train_image

        train_image(self)


class TextCommand(TextTrainConfig):
    """Fine-tune the sentiment BERT, export to ONNX (fp32, ORT-optimised, int8) and register it."""

    def cli_cmd(self) -> None:
        from training.text_pipeline import train_text

        train_text(self)


class LimitedDataCommand(LimitedDataConfig):
    """Pretrained vs from-scratch at several training-set sizes; writes a table and a plot."""

    def cli_cmd(self) -> None:
        from training.limited_data import run_experiment

        run_experiment(self)


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


class Train(BaseSettings):
    model_config = SettingsConfigDict(cli_kebab_case=True, cli_prog_name="python -m training")

    image: CliSubCommand[ImageCommand]
    text: CliSubCommand[TextCommand]
    limited_data: CliSubCommand[LimitedDataCommand]
    gallery: CliSubCommand[GalleryCommand]
    card: CliSubCommand[CardCommand]
    document: CliSubCommand[DocumentCommand]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> int:
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
