"""One typed configuration: environment variables and CLI flags both override defaults."""

from __future__ import annotations

from pydantic_settings import CliApp

from servable.config import ImageTrainConfig, TextTrainConfig


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("SERVABLE_IMAGE_EPOCHS_FINETUNE", "7")
    monkeypatch.setenv("SERVABLE_TEXT_MAX_LENGTH", "96")
    assert ImageTrainConfig().epochs_finetune == 7
    assert TextTrainConfig().max_length == 96


def test_cli_flags_override_env(monkeypatch):
    monkeypatch.setenv("SERVABLE_IMAGE_DROPOUT", "0.3")
    cfg = CliApp.run(ImageTrainConfig, cli_args=["--dropout", "0.5", "--augment", "false", "--l1", "1e-5"])
    assert cfg.dropout == 0.5 and cfg.augment is False and cfg.l1 == 1e-5


def test_configuration_reference_is_generated_and_current():
    from servable import config_docs

    assert config_docs.OUTPUT.read_text() == config_docs.render(), "run: python -m servable.config_docs"
    for var in ("SERVABLE_IMAGE_EPOCHS_HEAD", "SERVABLE_TEXT_SERVE_MAX_TEXT_CHARS", "SERVABLE_AUTH_KEYS_FILE"):
        assert f"`{var}`" in config_docs.render()
