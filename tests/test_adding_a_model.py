"""docs/adding-a-model.md is the tested walkthrough: its list of the files a new model needs is the
files the third model of the test suite (tests/fixtures/tabular/) really has, at most five, and
nothing in the product names that model (the core never asks which model it serves)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-model.md"
FIXTURE = ROOT / "tests" / "fixtures" / "tabular"


def _guide_rows() -> list[tuple[str, str, str]]:
    """(role, in your fork, in the fixture) of the table under 'The files you write'."""
    section = GUIDE.read_text().split("## The files you write", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return [tuple(r) for r in rows[2:]]  # header and rule first


def test_the_guides_file_list_is_what_the_fixture_model_needed():
    """The table of docs/adding-a-model.md lists every file the fixture model has, and only those."""
    rows = _guide_rows()
    assert 0 < len(rows) <= 5, rows
    listed = {re.search(r"`([^`]+)`", fixture).group(1) for _, _, fixture in rows}
    written = {p.relative_to(ROOT).as_posix() for p in FIXTURE.glob("*.py") if p.name != "__init__.py"}
    written.add("tests/test_third_model.py")
    assert listed == written, (listed, written)
    for path in listed:
        assert (ROOT / path).is_file(), path


def test_nothing_in_the_product_names_the_fixture_model():
    """The fixture is served, monitored and called without a line about it in servable/, serving/ or
    deploy/: an `if kind == "tabular"` anywhere would be a model the core knows by name."""
    tracked = subprocess.run(["git", "ls-files", "servable", "serving", "deploy"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    for rel in tracked:
        path = ROOT / rel
        if not path.is_file() or path.suffix in (".png", ".svg", ".gz"):
            continue
        text = path.read_text(errors="replace")
        for name in (
            "tabular_regressor",
            "house-price",
            "house_price",
            "/regress",
            "TabularRegressor",
            "'tabular'",
            '"tabular"',
            "servable-tabular",
            "SERVABLE_TABULAR",
        ):
            assert name not in text, f"{rel} names the fixture model ({name}; docs/adding-a-model.md)"
