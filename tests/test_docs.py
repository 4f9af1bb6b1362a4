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


# ---------------------------------------------------------------- the map checks itself: proofs touch their code

ANSWERS = ROOT / "docs" / "deployment-answers.md"
# Code that runs inside a served replica is reached over HTTP: a proof that calls one of these endpoints
# (or starts a server) exercises it. Deployment files are reached through what loads them.
SERVED = ("/classify", "/sentiment", "/v2/", "/info", "/metrics", "/readyz", "image_server", "text_server", "_serve",
          "launch.start", "SERVICES", "setting_servers")  # fmt: skip
TRAINED = ("train_image", "train_text", "image_run", "text_run")
LOADED_BY = {
    "deploy/nginx/": ("proxy_url", "start_extra_proxy", "nginx"),
    "deploy/prometheus/": ("promtool", "prometheus_url", "ALERTS"),
    "deploy/compose.yaml": ("compose",),
    "deploy/Dockerfile": ("Dockerfile", "dockerfile"),
    "deploy/k8s/": ("k8s", "kustomize"),
    "deploy/tls/": ("proxy_url", "https"),
    "loadtest/slo.toml": ("slo.", "SLO"),
    "loadtest/locustfile.py": ("locust",),
}


def answer_rows() -> list[tuple[str, list[tuple[str, str | None]], list[tuple[str, str]]]]:
    """(claim, implementing references, proving tests) of each row of the proven tables."""
    rows, proven_table = [], False
    for line in ANSWERS.read_text().splitlines():
        if line.startswith("## "):
            proven_table = "not proven" not in line.lower()
        if not (proven_table and line.startswith("| ") and line.count(" | ") >= 2) or line.startswith("| claim"):
            continue
        claim, implemented, proven = (c.strip() for c in line.strip("|").rsplit(" | ", 2))
        impl = [(p, s or None) for p, s in REF.findall(implemented)]
        impl += [(p, None) for p in re.findall(r"`(deploy/Dockerfile)`", implemented)]  # no suffix for REF
        tests = [(p, s) for p, s in REF.findall(proven) if p.startswith("tests/") and s]
        rows.append((claim, impl, tests))
    return rows


def _function_source(path: str, name: str) -> str:
    """The test function's source, with the module-level helpers and fixtures it names (one level)."""
    import ast

    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    funcs = {n.name: ast.get_source_segment(source, n) or "" for n in tree.body if isinstance(n, ast.FunctionDef)}
    base = re.sub(r"\[.*\]$", "", name)
    body = funcs[base]
    helpers = [src for helper, src in funcs.items() if helper != base and re.search(rf"\b{helper}\b", body)]
    body = "\n".join([body, *helpers])
    imports = [ast.get_source_segment(source, n) or "" for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
               and any(re.search(rf"\b{(a.asname or a.name).split('.')[0]}\b", body) for a in n.names)]  # fmt: skip
    return "\n".join([body, *imports])


def handles(path: str, symbol: str | None) -> set[str]:
    """Strings whose presence in a proof shows it reaches `path::symbol`."""
    found = {Path(path).name}
    if path.endswith(".py"):
        module = path.removesuffix(".py").replace("/", ".")
        found |= {module, module.rsplit(".", 1)[-1]}
        if path.startswith("serving/"):
            found |= set(SERVED)
        if path.startswith("training/"):  # the training pipelines (and the fixtures that run them) reach these
            found |= set(TRAINED)
    if symbol:
        found |= {symbol, symbol.split(".")[-1]}
    for prefix, strings in LOADED_BY.items():
        if path.startswith(prefix):
            found |= set(strings)
    return found


def test_answer_rows_are_parsed():
    rows = answer_rows()
    assert len(rows) > 30 and all(impl for _, impl, _ in rows)
    assert sum(bool(tests) for *_, tests in rows) > 25


@pytest.mark.parametrize(("claim", "impl", "tests"), answer_rows(), ids=lambda v: v[:50] if isinstance(v, str) else "")
def test_each_proof_references_the_code_it_proves(claim, impl, tests):
    """A "proven by" test must at least reach the code it is mapped to: by importing it, naming it, or
    calling the endpoint (or starting the server, the proxy, the tool) through which it runs."""
    wanted = set().union(*(handles(p, s) for p, s in impl))
    for path, name in tests:
        source = _function_source(path, name)
        assert any(h in source for h in wanted), f"{path}::{name} never reaches {[p for p, _ in impl]} ({claim})"


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


# The written pages; docs/results/ holds the reports runs write beside their figures (not checked here).
PAGES = [d for d in DOCS if not d.is_relative_to(ROOT / "docs" / "results")]


@pytest.mark.parametrize("doc", PAGES, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_embedded_image_exists(doc):
    """An image a page embeds (`![...](path)`, relative to the page) is in the repository."""
    missing = [src for src in IMAGE.findall(doc.read_text())
               if "://" not in src and not (doc.parent / src.split("#")[0]).is_file()]  # fmt: skip
    assert not missing, f"{doc.relative_to(ROOT)} embeds images that do not exist: {missing}"
