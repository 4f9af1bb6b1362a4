"""How a model card shows a recorded value: shared by training/model_card.py and the card sections each
trainable task writes (training/tasks.py)."""

from __future__ import annotations

import json
from typing import Any


def show(value: Any) -> str:
    """A provenance or config value in a table: paths inside an installed package shortened to the package."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    text = str(value)
    if "site-packages/" in text:
        text = text.split("site-packages/", 1)[1] + " (installed package)"
    return text.replace("|", "\\|")
