"""The docs cannot rot: every code or test reference in docs/ and the README must exist, and
nothing in the repository points outside it.

A reference is a backticked `path` or `path::symbol` (`serving/auth.py::KeyStore`,
`tests/test_serving.py::test_metrics_after_traffic`); for Python the symbol must be defined
there (function, class, method or module-level name), for other files it must appear in them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
SUFFIXES = "py|yaml|yml|toml|conf|template|sh|json|md|txt|cfg|ini|j2"
REF = re.compile(rf"`((?:[\w.-]+/)*[\w.-]+\.(?:{SUFFIXES}))(?:::([\w.\[\]-]+))?`")
# Paths that name files a run writes, or files of installed packages and the system.
NOT_IN_REPO = ("runs/", "onnxruntime/", ".cache/", "/usr/", "/tmp/", "results/", "tokenizer/", "pytorch_model")
# The repository stands alone: no files beside it, no absolute paths of the authors' checkout, and
# no wording that only makes sense to them. (Flame graphs record the profiled command line.)
OUT_OF_REPO = re.compile(r"\.\./shared|OFFLINE_ASSETS|/work/|/root/|these machines|this session", re.I)
OUT_OF_REPO_SKIP = (".svg", ".png", ".bentomodel")


def references() -> list[tuple[str, str, str | None]]:
    found = []
    for doc in DOCS:
        for path, symbol in REF.findall(doc.read_text()):
            if "/" in path and not path.startswith(NOT_IN_REPO):
                found.append((doc.relative_to(ROOT).as_posix(), path, symbol or None))
    return found


def defined(source: str, symbol: str) -> bool:
    name = re.sub(r"\[.*\]$", "", symbol).split(".")[-1]  # parametrised ids and Class.method
    pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]"
    return re.search(pattern, source, re.M) is not None


def test_docs_have_references():
    assert len(references()) > 40


@pytest.mark.parametrize(("doc", "path", "symbol"), references())
def test_reference_exists(doc, path, symbol):
    target = ROOT / path
    assert target.exists(), f"{doc} points at {path}, which does not exist"
    if symbol:
        text = target.read_text()
        ok = defined(text, symbol) if target.suffix == ".py" else symbol in text
        assert ok, f"{doc} points at {path}::{symbol}, which is not defined there"


def test_nothing_refers_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    hits = []
    for rel in files.stdout.split("\0"):
        path = ROOT / rel
        if not rel or rel.endswith(OUT_OF_REPO_SKIP) or path == Path(__file__) or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUT_OF_REPO.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_api_reference_is_generated_from_the_served_openapi_and_current():
    from serving import openapi_docs

    for path, text in openapi_docs.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python -m serving.openapi_docs"
    sentiment = json.loads((ROOT / "docs/api/sentiment.openapi.json").read_text())
    assert {"/sentiment", "/v2/models/{name}/infer"} <= set(sentiment["paths"])
