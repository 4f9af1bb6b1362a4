"""The commands the docs give a user work: run where this machine can run them, checked where it cannot.

Every ```bash block in README.md and docs/ says which in its info string:

- ```` ```bash run ````: the page's `run` blocks are run in order, in one bash, as a user following the page
  would, against the session's servers (tests/conftest.py): `make serve` is those servers, the page's
  `http://127.0.0.1:<port>` and demo key are rewritten to theirs (after checking that they are what
  `make serve` uses), and every `curl` must get a 2xx answer with a JSON body.
- ```` ```bash not-run: <why> ````: a Docker engine, a cluster, a registry or minutes of measurement.

Every block, run or not, is checked for what can be checked here: `make` targets exist, `python -m` modules
take the flags given (their own `--help`, also for `make X ARGS="..."`), repository paths exist (or are
written by a command: git-ignored), ports are `make serve`'s or compose's published ones, and variables are
settings. Everywhere in the docs, V2 model names and model tags name served models.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servable.config import SERVED_MODELS
from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\w*)[ \t]*(.*)$")
MAKEFILE = (ROOT / "Makefile").read_text()
# Model names: the part before ':' of each entry's default tag (fashion-cnn, sentiment-bert).
MODEL_NAMES = {e.settings.model_fields["model_tag"].default.split(":")[0] for e in SERVED_MODELS.values()}
# adding-a-model.md's example, the third model of tests/fixtures/tabular/
THIRD_MODEL = re.search(r'model_tag: str = "([\w-]+):', (ROOT / "tests/fixtures/tabular/config.py").read_text()).group(
    1
)
# Written by a command into the repository for you to commit (make k8s-release)
WRITTEN = ("deploy/k8s/releases/",)
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:deploy|docs|requirements|tests|servable|serving|training|loadtest)/[\w./<>*-]*)"
)


def blocks(doc: Path) -> list[tuple[int, str, str, str]]:
    """(line, language, info after the language, text) of each fenced block."""
    found, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = len(m.group(1)), i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        found.append((start + 1, m.group(2), m.group(3).strip(), "\n".join(body)))
        i += 1
    return found


def shell_blocks() -> list[tuple[str, int, str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), line, info, text)
            for doc in DOCS for line, lang, info, text in blocks(doc) if lang in ("bash", "sh", "shell")]  # fmt: skip


def logical_lines(text: str) -> list[tuple[str, list[str]]]:
    """Each logical line (continuations joined) and its words as the shell splits them, comments dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: the line is shown, not meant to be split
            continue
        if words:
            out.append((line, words))
    return out


def commands(text: str) -> list[list[str]]:
    return [words for _, words in logical_lines(text)]


def test_every_shell_block_says_whether_it_runs():
    unmarked = [f"{doc}:{line}" for doc, line, info, _ in shell_blocks()
                if not (info == "run" or re.fullmatch(r"not-run: \S.*", info))]  # fmt: skip
    assert len(shell_blocks()) > 15
    assert not unmarked, f"```bash blocks without `run` or `not-run: <why>`: {unmarked}"


# ---------------------------------------------------------------- checked: names, flags, paths, ports, variables


@functools.cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", MAKEFILE, re.M))


def module_of_make_variable(var: str) -> list[str]:
    """`python -m` and its arguments before `$(VAR)` in the Makefile recipe that passes VAR along."""
    m = re.search(rf"-m ([\w.]+)((?: [\w-]+)*) [^\n]*\$\({var}\)", MAKEFILE)
    assert m, f"no recipe passes $({var}) to a python module"
    return [m.group(1), *m.group(2).split()]


@functools.cache
def help_text(module: str, sub: str | None) -> str:
    argv = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"{' '.join(argv[1:])} failed: {out.stderr[-800:]}"
    return out.stdout


def check_flags(module: str, args: list[str]) -> list[str]:
    """The flags of `args` that `python -m module [sub] --help` does not list."""
    first = args[0] if args and not args[0].startswith("-") else None
    sub = first if first and re.search(rf"[{{,]{re.escape(first)}[,}}]", help_text(module, None)) else None
    helps = help_text(module, sub)
    return [f"{module} {a}" for a in args if a.startswith("--") and a.split("=")[0] not in helps]


@functools.cache
def compose_ports() -> set[int]:
    """The host ports compose publishes, at their defaults (the CPU override publishes none of its own)."""
    ports = set()
    for service in yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"].values():
        for port in service.get("ports") or []:
            published = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(port)).split(":")[-2]
            ports.add(int(published))
    return ports


@functools.cache
def ignored(path: str) -> bool:
    """Written by a command (a key file, a certificate, an exported model), so git ignores it."""
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0


def problems(text: str) -> list[str]:
    found = []
    for words in commands(text):
        assigned = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if re.match(r"^[A-Z_][A-Z0-9_]*=", w)}
        rest = [w for w in words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        if rest[:1] == ["make"]:
            found += [f"make {t}: no such target" for t in rest[1:] if not t.startswith("-") and "=" not in t
                      and t not in make_targets()]  # fmt: skip
            for var, value in (w.split("=", 1) for w in rest[1:] if re.match(r"^[A-Z_]+_ARGS=", w)):
                module, *fixed = module_of_make_variable(var)
                found += check_flags(module, [*fixed, *shlex.split(value)])
        if "-m" in rest and rest[0].endswith("python"):
            i = rest.index("-m")
            found += check_flags(rest[i + 1], rest[i + 2 :])
        found += [f"{v}: a pattern, not a variable" for v in assigned if "*" in v]
    for var in set(re.findall(r"\b(SERVABLE_[A-Z0-9_*]+)=", text)):
        found += [f"{var}: a pattern, not a variable"] if "*" in var else []
    # kubectl names resources as deploy/NAME: only its -k and -f arguments are paths
    paths_text = "\n".join(
        " ".join(w for i, w in enumerate(words) if words[0] != "kubectl" or words[i - 1] in ("-k", "-f"))
        for words in commands(text)
    )
    for path in set(REPO_PATH.findall(paths_text)):
        path = path.rstrip(".")
        if "<" in path or "*" in path or "…" in path:
            path = re.split(r"[<*…]", path)[0].rsplit("/", 1)[0]  # the folder above a placeholder
        if not (ROOT / path).exists() and not ignored(path) and not path.startswith(WRITTEN):
            found.append(f"{path}: not in the repository")
    allowed_ports = {e.port for e in SERVED_MODELS.values()} | compose_ports()
    found += [f"127.0.0.1:{p}: neither make serve's nor a compose port" for p in re.findall(r"127\.0\.0\.1:(\d+)", text)
              if int(p) not in allowed_ports]  # fmt: skip
    return found


@pytest.mark.parametrize(("doc", "line", "info", "text"), shell_blocks(), ids=lambda v: str(v)[:40])
def test_shell_block_names_what_exists(doc, line, info, text):
    assert not problems(text), f"{doc}:{line}: {problems(text)}"


def test_setting_variables_in_the_docs_exist():
    """Every SERVABLE_* name in the docs is a setting or a name the code or deploy files use; a
    `SERVABLE_*_X` pattern stands for a setting X of every served model."""
    config_doc = (ROOT / "docs" / "configuration.md").read_text()
    code = subprocess.run(["git", "grep", "-h", "-o", "-E", r"SERVABLE_[A-Z0-9_]+", "--", ":!docs", ":!README.md"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    known = set(code) | set(re.findall(r"`(SERVABLE_[A-Z0-9_]+)`", config_doc))
    missing = set()
    for doc in DOCS:
        for name in set(re.findall(r"SERVABLE_[A-Z0-9_*]*[A-Z0-9]", doc.read_text())):
            names = {name.replace("*", kind.upper()) for kind in SERVED_MODELS} if "*" in name else {name}
            missing |= {f"{doc.name}: {n}" for n in names if n not in known and not any(k.startswith(n) for k in known)}
    assert not missing, sorted(missing)
    commands_with_a_pattern = [f"{doc.name}: {m}" for doc in DOCS for m in re.findall(
        r"SERVABLE_\w*\*\w*=\S+(?: \w+=\S+)* (?:make|python|\.venv|docker|bentoml)\b", doc.read_text())]  # fmt: skip
    assert not commands_with_a_pattern, f"a command sets a pattern, not a variable: {commands_with_a_pattern}"


def test_v2_model_names_and_model_tags_in_the_docs_are_served_models():
    """`/v2/models/<name>` and `<name>:latest` / `<name>:v<version>` everywhere in the docs (blocks, tables,
    prose) name a served model: `/image/v2/models/image` answers 404."""
    wrong = []
    for doc in DOCS:
        text = doc.read_text()
        for name in re.findall(r"/v2/models/([\w.-]+)", text):
            if name not in MODEL_NAMES and not name.startswith("{"):
                wrong.append(f"{doc.name}: /v2/models/{name}")
        for name in re.findall(r"(?<![\w/.-])([a-z][a-z0-9]*-[a-z0-9-]+):(?:latest|v\d{8}-\d{4,6})\b", text):
            if name not in MODEL_NAMES and name != THIRD_MODEL:
                wrong.append(f"{doc.name}: {name}:...")
    assert not wrong, wrong


def test_the_k8s_scrape_config_gives_the_adapter_rule_its_labels():
    """deploy.md's Kubernetes scrape config keeps the replicas, names the job per model (the alert rules) and
    adds every label the GPU HPA's Prometheus-adapter rule selects and maps to resources."""
    deploy_md = ROOT / "docs" / "deploy.md"
    configs = [
        yaml.safe_load(text) for _, lang, _, text in blocks(deploy_md) if lang == "yaml" and "scrape_configs" in text
    ]
    assert len(configs) == 1
    relabels = configs[0]["scrape_configs"][0]["relabel_configs"]
    targets = {r["target_label"] for r in relabels if "target_label" in r}
    rules = yaml.safe_load((ROOT / "deploy/k8s/overlays/gpu/prometheus-adapter-rules.yaml").read_text())
    for rule in rules["rules"]["custom"]:
        needed = set(rule["resources"]["overrides"]) | set(re.findall(r'(\w+)!=""', rule["seriesQuery"]))
        assert needed <= targets, f"the adapter rule needs {needed - targets}, which the scrape config never sets"
    assert "job" in targets


def test_the_apt_list_is_the_makefiles_everywhere_it_is_given():
    packages = re.search(r"^APT_PACKAGES := (.+)$", MAKEFILE, re.M).group(1).split()
    install = (ROOT / "docs" / "install.md").read_text()
    assert f"| apt | `{' '.join(packages)}` |" in install, "docs/install.md's apt row differs from APT_PACKAGES"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**apt packages**") :].split("\n- **", 1)[0]
    assert not [p for p in packages if f"`{p}`" not in section], "README's apt list lacks packages of APT_PACKAGES"


# ---------------------------------------------------------------- run: the page's blocks against the servers


def run_blocks(doc: str) -> str:
    return "\n".join(text for d, _, info, text in shell_blocks() if d == doc and info == "run")


RUN_DOCS = sorted({doc for doc, _, info, _ in shell_blocks() if info == "run"})


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_run_blocks_answer(doc, image_server, text_server, tmp_path):
    from deploy import launch

    script = run_blocks(doc)
    demo_key = re.search(r"^export SERVABLE_AUTH_KEYS \?= \w+:(\S+)$", MAKEFILE, re.M).group(1)
    servers = {"image": image_server, "text": text_server}
    for kind, entry in SERVED_MODELS.items():  # make serve's address of each model is the session server's here
        script = script.replace(f"http://127.0.0.1:{entry.port}", servers[kind].url)
    script = script.replace(demo_key, API_KEY)
    lines = []
    for line, words in logical_lines(script):
        if words[:2] == ["make", "serve"]:
            continue  # the session servers stand for it
        assert words[0] not in ("make", "docker", "kubectl"), f"{doc}: `{line}` cannot run here: mark its block not-run"
        lines.append(line)
    launch.demo_image(tmp_path / "runs" / "demo" / "ankle-boot.png")
    out = tmp_path / "answers"
    out.mkdir()
    harness = f"""set -euo pipefail
n=0
curl() {{ n=$((n + 1)); command curl --fail-with-body --max-time 120 -o "{out}/$n.json" "$@"; }}
"""
    result = subprocess.run(["bash", "-c", harness + "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    answers = sorted(out.iterdir(), key=lambda p: int(p.stem))
    last = answers[-1].read_text()[:500] if answers else ""
    assert result.returncode == 0, f"{doc}: exit {result.returncode}; {result.stderr[-800:]}; last answer: {last}"
    calls = sum(words[0] == "curl" for words in commands(script))
    assert len(answers) == calls > 0
    for answer in answers:
        body = json.loads(answer.read_text())
        assert body and "error" not in body, f"{doc}: call {answer.stem} answered {body}"
