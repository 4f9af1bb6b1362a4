"""Generate docs/configuration.md from the typed settings: `python -m servable.config_docs`.

The reference is derived from the classes, never hand-copied; a test fails when it is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from servable import config

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
SECTIONS: list[tuple[str, type[BaseSettings], str]] = [
    ("Image training", config.ImageTrainConfig, "`python -m training image --help`"),
    ("Text training", config.TextTrainConfig, "`python -m training text --help`"),
    ("Limited-data experiment", config.LimitedDataConfig, "`python -m training limited-data --help`"),
    ("Image service", config.ImageServeSettings, "environment only (containers)"),
    ("Sentiment service", config.TextServeSettings, "environment only (containers)"),
    ("API-key authentication", config.AuthSettings, "environment only (containers)"),
    ("Audit log", config.AuditSettings, "environment only (containers)"),
    ("Feedback loop (opt-in)", config.FeedbackSettings, "environment only (containers)"),
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
        "(prefix + upper-case name); training fields are also CLI flags (`--kebab-case`).",
        "",
    ]
    for title, cls, how in SECTIONS:
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
