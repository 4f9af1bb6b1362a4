"""Generate docs/configuration.md from the typed settings: `python -m servable.config_docs`.

The reference is derived from the classes, never hand-copied; a test fails when it is stale. The
models' sections come from the settings classes themselves: one per training config (each class
derived from `TrainCommon`, named `<Kind>TrainConfig` and trained by `python -m training <kind>`) and
one per entry of `SERVED_MODELS`, so a new model needs no edit here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from servable import config

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ENV_ONLY = "environment only (containers)"


def train_configs() -> dict[str, type[config.TrainCommon]]:
    """kind -> settings of each trainable model: the classes servable/config.py derives from TrainCommon
    (tests/test_training_tasks.py checks that training/tasks.py trains exactly these, under these kinds)."""
    found = [cls for cls in config.TrainCommon.__subclasses__() if cls.__module__ == config.__name__]
    return {cls.__name__.removesuffix("TrainConfig").lower(): cls for cls in found}


def sections() -> list[tuple[str, type[BaseSettings], str]]:
    """(title, settings class, how it is set) of each section, in the reference's order."""
    train = [(f"{kind.capitalize()} training", cls, f"`python -m training {kind} --help`")
             for kind, cls in train_configs().items()]  # fmt: skip
    serve = [(f"{e.docs_name.capitalize()} service", e.settings, ENV_ONLY) for e in config.SERVED_MODELS.values()]
    return [
        *train,
        ("Limited-data experiment", config.LimitedDataConfig, "`python -m training limited-data --help`"),
        ("Text domain-transfer study", config.DomainStudyConfig, "`python -m training domain-study --help`"),
        *serve,
        ("API-key authentication", config.AuthSettings, ENV_ONLY),
        ("Audit log", config.AuditSettings, ENV_ONLY),
        ("Feedback loop (opt-in)", config.FeedbackSettings, ENV_ONLY),
    ]


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    return f"`{json.dumps(value, default=str)}`"


def _description(cls: type[BaseSettings], name: str) -> str:
    """A subclass that only changes a default loses the description: take it from the parent."""
    for klass in cls.__mro__:
        field = getattr(klass, "model_fields", {}).get(name)
        if field is not None and field.description:
            return field.description
    return ""


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `servable/config.py` by `python -m servable.config_docs`; do not edit by hand",
        "(`tests/test_config.py` fails when this file is stale). Every field is an environment variable",
        "(prefix + upper-case name); training fields are also CLI flags (`--kebab-case`). A variable under",
        "one of these prefixes that names no field is ignored, and the replica or the training command logs a",
        "warning with the nearest field's name (`servable/setting_names.py`).",
        "",
    ]
    for title, cls, how in sections():
        prefix = cls.model_config.get("env_prefix", "")
        lines += [f"## {title}", "", f"{(cls.__doc__ or '').strip()} Set by: {how}.", ""]
        lines += ["| variable | flag | default | description |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            env = f"{prefix}{name}".upper()
            flag = f"`--{name.replace('_', '-')}`" if "training" in title.lower() or "experiment" in title else "—"
            desc = _description(cls, name).replace("|", "\\|")
            lines.append(f"| `{env}` | {flag} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
