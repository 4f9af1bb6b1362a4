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


def test_serving_layout_defaults_follow_the_device_and_the_cpu_quota(tmp_path, monkeypatch):
    import os

    from servable import config

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert config.cpu_cores(cpu_max) == 8
    cpu_max.write_text("150000 100000\n")  # a 1.5-CPU limit: 2 workers, not 8
    assert config.cpu_cores(cpu_max) == 2
    assert config.cpu_cores(tmp_path / "absent") == 8
    cpu = config.TextServeSettings(device="cpu")
    assert (cpu.resolved_topology(), cpu.resolved_intra_op_threads()) == ("inprocess", 1)
    gpu = config.TextServeSettings(device="cuda")
    assert (gpu.resolved_topology(), gpu.resolved_intra_op_threads(), gpu.batching_enabled()) == ("split", 0, True)
    assert config.TextServeSettings(device="cpu", topology="split").resolved_intra_op_threads() == 0
    assert config.ImageServeSettings(workers=3).http_workers() == 3
