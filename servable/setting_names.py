"""Environment variables under a settings prefix that name no setting.

pydantic-settings reads only the names it knows, so a misspelt variable (`SERVABLE_IMAGE_MODEL_TAG` for
`SERVABLE_IMAGE_SERVE_MODEL_TAG`) is ignored without a word and the process runs on the default. The
serving and training entry points warn about each one, with the nearest real name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from difflib import get_close_matches

from pydantic_settings import BaseSettings

from servable import config


def settings_classes() -> list[type[BaseSettings]]:
    """The configuration classes with a SERVABLE_ prefix: config.py's and each served model's."""
    found = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, BaseSettings)]
    found += [entry.settings for entry in config.SERVED_MODELS.values()]
    return [c for c in dict.fromkeys(found) if str(c.model_config.get("env_prefix", "")).startswith("SERVABLE_")]


def known_names() -> tuple[set[str], tuple[str, ...]]:
    """Every variable a setting reads, and the prefixes the settings own."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for cls in settings_classes():
        prefix = str(cls.model_config["env_prefix"]).upper()
        prefixes.add(prefix)
        names.update(prefix + field.upper() for field in cls.model_fields)
    return names, tuple(sorted(prefixes))


def unknown_settings(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Each variable under a settings prefix that is no setting, with the nearest setting's name (or None)."""
    names, prefixes = known_names()
    env = os.environ if environ is None else environ
    unknown: dict[str, str | None] = {}
    for var in sorted(env):
        if var.upper().startswith(prefixes) and var.upper() not in names:
            unknown[var] = next(iter(get_close_matches(var.upper(), names, n=1, cutoff=0.6)), None)
    return unknown


def warn_unknown(log: logging.Logger) -> None:
    for var, near in unknown_settings().items():
        hint = f"; did you mean {near}?" if near else ""
        log.warning("%s is set but names no setting, so it is ignored%s", var, hint)
