"""One typed configuration: environment variables and CLI flags both override defaults."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest
from pydantic_settings import CliApp

from servable.config import AuthSettings, ImageTrainConfig, TextTrainConfig

ROOT = Path(__file__).resolve().parents[1]


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


def test_malformed_api_keys_stop_the_service_at_start_not_each_request(tmp_path, monkeypatch):
    """A key under 8 characters (inline or in the key file) fails the settings, which the service builds at
    start, with a message that says what is wrong; nothing is left to fail each request with a 500."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least 8 characters") as err:
        AuthSettings(keys="ops:short,ci:a-long-enough-key")
    assert "short" not in str(err.value) and "a-long-enough-key" not in str(err.value)  # keys never printed
    bad = tmp_path / "api_keys"
    bad.write_text("ops:a-long-enough-key\nci:short\n")
    with pytest.raises(ValidationError, match=f"{bad}.*at least 8 characters"):
        AuthSettings(keys_file=bad)
    assert AuthSettings(keys="ops:a-long-enough-key").keys
    # a key file the service may not read (a secret in a group it lacks) is named at start, not a traceback
    bad.write_text("ops:a-long-enough-key\n")

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(ValidationError, match=f"{bad}: cannot be read \\(Permission denied\\)"):
        AuthSettings(keys_file=bad)


def test_a_malformed_key_file_rotation_keeps_the_keys_in_force(tmp_path, caplog):
    """Rotating the mounted key file to a malformed one is logged and ignored: the keys in force stay,
    and a later good rotation is picked up."""
    import os

    from serving.auth import KeyStore

    keys = tmp_path / "api_keys"
    keys.write_text("ops:first-key-123\n")
    now = [0.0]
    store = KeyStore(AuthSettings(keys_file=keys), clock=lambda: now[0])
    assert store.identify("first-key-123") == "ops"
    keys.write_text("ops:tiny\n")
    os.utime(keys, (1, 1))  # a new mtime, whatever the clock's resolution
    now[0] += KeyStore.RELOAD_INTERVAL_S
    assert store.identify("first-key-123") == "ops" and store.identify("tiny") is None
    assert "not loaded, the previous keys stay in force" in caplog.text and "tiny" not in caplog.text
    keys.write_text("ops:second-key-456\n")
    os.utime(keys, (2, 2))
    now[0] += KeyStore.RELOAD_INTERVAL_S
    assert store.identify("second-key-456") == "ops" and store.identify("first-key-123") is None


def test_key_file_replaced_by_mv_is_seen_within_the_reload_interval(tmp_path, caplog):
    """`mv new api_keys` keeps the new file's own mtime (here: the old file's, to the nanosecond) and
    size: only its inode tells the change. The file is stat-ed at most once per RELOAD_INTERVAL_S; each
    load logs the key names and their count, never a key."""
    import logging
    import os

    from serving.auth import KeyStore

    caplog.set_level(logging.INFO, logger="servable.auth")
    keys, new = tmp_path / "api_keys", tmp_path / ".api_keys.new"
    keys.write_text("ops:old-key-0001\nci:ci-key-00001\n")
    now = [100.0]
    store = KeyStore(AuthSettings(keys_file=keys), clock=lambda: now[0])
    assert "loaded 2 API key(s)" in caplog.text and "ci, ops" in caplog.text
    new.write_text("ops:new-key-0002\nci:ci-key-00001\n")
    old = os.stat(keys)
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (os.stat(new).st_mtime_ns, os.stat(new).st_size) == (old.st_mtime_ns, old.st_size)
    os.rename(new, keys)  # what `mv` does on one file system: atomic, a new inode at the path
    now[0] += KeyStore.RELOAD_INTERVAL_S / 2  # within the interval the file is not looked at again
    assert store.identify("old-key-0001") == "ops"
    now[0] += KeyStore.RELOAD_INTERVAL_S / 2
    assert store.identify("old-key-0001") is None and store.identify("new-key-0002") == "ops"
    assert caplog.text.count("loaded 2 API key(s)") == 2
    for secret in ("old-key-0001", "new-key-0002", "ci-key-00001"):
        assert secret not in caplog.text
    os.remove(keys)  # a deleted file revokes its keys at the next look
    now[0] += KeyStore.RELOAD_INTERVAL_S
    assert store.identify("ci-key-00001") is None and "disappeared" in caplog.text


def test_a_misspelt_setting_variable_is_named_with_the_nearest_real_one(monkeypatch, caplog):
    from servable.setting_names import unknown_settings, warn_unknown

    env = {"SERVABLE_IMAGE_MODEL_TAG": "x", "SERVABLE_TEXT_SERVE_WORKRS": "2", "SERVABLE_AUTH_KEY": "k",
           "SERVABLE_TEXT_SERVE_WORKERS": "2", "SERVABLE_BIND": "0.0.0.0", "PATH": "/bin"}  # fmt: skip
    assert unknown_settings(env) == {"SERVABLE_IMAGE_MODEL_TAG": "SERVABLE_IMAGE_SERVE_MODEL_TAG",
                                     "SERVABLE_TEXT_SERVE_WORKRS": "SERVABLE_TEXT_SERVE_WORKERS",
                                     "SERVABLE_AUTH_KEY": "SERVABLE_AUTH_KEYS"}  # fmt: skip
    monkeypatch.setenv("SERVABLE_IMAGE_SERVE_MAX_CONCURRENCYY", "9")
    with caplog.at_level("WARNING"):
        warn_unknown(logging.getLogger("test"))
    assert "SERVABLE_IMAGE_SERVE_MAX_CONCURRENCYY is set but names no setting" in caplog.text
    assert "did you mean SERVABLE_IMAGE_SERVE_MAX_CONCURRENCY?" in caplog.text


def test_every_setting_variable_the_repository_names_is_a_setting():
    """Compose, Kubernetes, the Makefile, the docs and the tests name no SERVABLE_* variable under a settings
    prefix that no setting reads (the bare prefixes, written as prefixes, excepted)."""
    from servable.setting_names import known_names, unknown_settings

    # (this file's misspellings are deliberate)
    files = subprocess.run(["git", "ls-files", "--", ".", ":!docs/results", ":!tests/test_config.py"], cwd=ROOT,
                           capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    named = {m for f in files if (ROOT / f).is_file()
             for m in re.findall(r"SERVABLE_[A-Z0-9_]*[A-Z0-9]", (ROOT / f).read_text(errors="replace"))}  # fmt: skip
    _, prefixes = known_names()
    retired = {"SERVABLE_IMAGE_MODEL_TAG", "SERVABLE_TEXT_MODEL_TAG"}  # test_deploy_static checks they are gone
    unknown = {v: near for v, near in unknown_settings(dict.fromkeys(named, "")).items()
               if v + "_" not in prefixes and v not in retired}  # fmt: skip
    assert not unknown, unknown
