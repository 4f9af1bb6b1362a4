"""Figures quoted in the docs are the committed results' figures, and say where they come from.

Each Figure (tests/doc_figures/, a module per page) is a piece of a page as the page prints it (a phrase, a
table row, or a whole table rendered by the code that wrote the file), built from a results file under
docs/results/ (or a model card the training run generated): the test fails when the page's figure and the
file's differ. The page must also name that results file in the same section (under the same heading), and
where the file records its machine, the section must name that machine and the figure's paragraph no other
one (figures from an AMD EPYC run are not described as a Xeon's).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.doc_figures import (
    benchmark_md,
    deploy_md,
    loadtest_md,
    readme_md,
    releasing_md,
    reliability_md,
    serving_md,
    training_md,
)
from tests.doc_figures.common import MACHINES, ROOT, machine_of, results

PAGES = (benchmark_md, reliability_md, training_md, serving_md, deploy_md, loadtest_md, readme_md, releasing_md)
FIGURES = [figure for page in PAGES for figure in page.FIGURES]


def sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{1,4} )", text)


def cited(section: str, source: str) -> bool:
    """The section names the results file: its path, or a link relative to docs/."""
    return source in section or source.removeprefix("docs/") in section


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f"{Path(f.doc).name}: {f.what}")
def test_quoted_figure_is_the_results_figure(figure):
    data = results(figure.source)
    quote = re.sub(r"\s*\n\s*", " ", figure.quote(data))  # a rendered table's rows, as the page reads flat
    text = (ROOT / figure.doc).read_text()
    flat = re.sub(r"\s*\n\s*", " ", text)
    assert quote in flat, f"{figure.doc} does not quote {figure.source} as it is: expected\n  {quote}"
    section = next(s for s in sections(text) if quote in re.sub(r"\s*\n\s*", " ", s))
    assert cited(section, figure.source), f"{figure.doc}: the section quoting '{quote}' never names {figure.source}"
    machine = machine_of(data)
    if machine:
        assert machine in section, f"{figure.doc}: {figure.source} was measured on {machine}; its section says not"
        # a paragraph, a list item or a table row; a whole table (rendered) is its own block
        pieces = re.split(r"\n\s*\n|\n(?=\s*- |\|)", text) + re.split(r"\n\s*\n", text)
        paragraph = next(p for p in pieces if quote in re.sub(r"\s*\n\s*", " ", p))
        others = [m for m in MACHINES if m != machine and m in paragraph and machine not in paragraph]
        assert not others, f"{figure.doc}: a figure of {machine} ({figure.source}) in a paragraph naming {others}"


def test_every_results_file_the_docs_cite_is_committed():
    """A page that cites docs/results/<file>.json as a source must have it in the repository."""
    missing = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for path in re.findall(r"(?:docs/)?results/[\w./-]+\.json", doc.read_text()):
            full = path if path.startswith("docs/") else f"docs/{path}"
            if not (ROOT / full).exists():
                missing.add(f"{doc.name}: {full}")
    assert not missing, sorted(missing)
