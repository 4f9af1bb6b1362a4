"""Supply chain (deploy/supply_chain.py, requirements/): the locks agree with pyproject.toml and with
each other and hold no torch build, this virtualenv is the locked set, the CycloneDX SBOM of the
serving lock, the vulnerability audit (where a vulnerability service answers), and no secret
material in git or in the image's build context."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.error
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy import supply_chain

ROOT = Path(__file__).resolve().parents[1]
NOT_SERVED = ("torch", "transformers", "kornia", "onnx", "scikit-learn", "locust", "pytest", "matplotlib")


LOCKS = {
    "serve": ("serve",),
    "train": ("train",),
    "loadtest": ("loadtest",),
    "dev": ("train", "serve", "loadtest", "dev"),
}
NOT_LOCKED = ("torch", "triton")  # machine-specific builds: requirements/torch.sh installs torch


def _applies(req) -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": ""})


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_requirement_of_its_install_set(lock):
    """Fails when pyproject.toml changed without `make lock`: each requirement pinned, in range, hashed."""
    path = supply_chain.LOCKS / f"{lock}.txt"
    pins = supply_chain.locked(path)
    for req in supply_chain.top_level(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED or not _applies(req):
            continue
        assert name in pins, f"{req} is not in {path.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{path.name} pins {name}=={pins[name]}, not {req}"
    text = path.read_text()
    assert text.count("--hash=sha256:") >= len(pins) and "\n#    make lock\n" in text
    cuda = [n for n in pins if n in NOT_LOCKED or (n.startswith("nvidia-") and n != "nvidia-ml-py")]
    assert not cuda, f"CUDA builds in {path.name}: {cuda}"  # nvidia-ml-py: NVML bindings, no CUDA library


def test_locks_agree_with_each_other_and_the_cpu_image_swap():
    dev = supply_chain.locked(supply_chain.LOCKS / "dev.txt")
    for lock in ("serve", "train", "loadtest"):
        pins = supply_chain.locked(supply_chain.LOCKS / f"{lock}.txt")
        assert pins.items() <= dev.items(), f"{lock}.txt and dev.txt disagree"
    serve = supply_chain.locked()
    cpu = supply_chain.locked(supply_chain.LOCKS / "onnxruntime.txt")
    assert cpu["onnxruntime"] == serve["onnxruntime-gpu"]
    assert {n: v for n, v in cpu.items() if n != "onnxruntime"}.items() <= serve.items()
    assert not {"torch", "transformers", "locust", "pytest"} & serve.keys()


def test_this_virtualenv_is_the_locked_set():
    """`make setup` installs requirements/dev.txt: every pin is the installed version."""
    wrong = {n: (v, md.version(n)) for n, v in supply_chain.locked(supply_chain.LOCKS / "dev.txt").items()
             if md.version(n) != v}  # fmt: skip
    assert not wrong, f"installed versions differ from requirements/dev.txt (run `make setup`): {wrong}"


def test_sbom_of_the_serving_set_has_onnxruntime_and_bentoml_and_no_torch(tmp_path):
    sbom_path = supply_chain.write_sbom(tmp_path)
    sbom = json.loads(sbom_path.read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    assert sbom["metadata"]["component"]["name"] == "servable"
    components = {canonicalize_name(c["name"]): c for c in sbom["components"]}
    for needed in ("onnxruntime-gpu", "bentoml", "tokenizers", "pillow", "numpy", "fastapi", "prometheus-client"):
        assert needed in components, needed
    pins = supply_chain.locked()
    assert components.keys() == pins.keys()
    for name, c in components.items():  # the lock's version and hashes, with a package URL
        assert c["version"] == pins[name], name
        assert c["purl"] == f"pkg:pypi/{c['name']}@{c['version']}"
        hashes = [h for ref in c["externalReferences"] for h in ref.get("hashes", [])]
        assert hashes and {h["alg"] for h in hashes} == {"SHA-256"}, name
    # torch and the training/test tools are installed in this virtualenv, but not in the serve set
    assert md.version("torch")
    for name in NOT_SERVED:
        assert name not in components, f"{name} in the serving SBOM"
    assert not [n for n in components if n.startswith(("torch", "nvidia-cu"))]


def test_serve_set_comes_from_pyproject_and_matches_the_image():
    top = {canonicalize_name(r.name) for r in supply_chain.top_level()}
    assert {"onnxruntime-gpu", "bentoml", "tokenizers", "pillow", "numpy"} <= top
    assert not top & {canonicalize_name(n) for n in NOT_SERVED}
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps --only-binary=:all: -r requirements/serve.txt" in dockerfile


def test_audit_command_fails_closed():
    """An audit that could not look a package up must fail, not read as "no known vulnerabilities"."""
    cmd = supply_chain.audit_command(Path("reqs.txt"), Path("report.json"))
    for flag in ("--strict", "--no-deps", "--disable-pip", "--requirement", "--require-hashes"):
        assert flag in cmd, flag
    assert Path(cmd[0]).name == "pip-audit" and Path(cmd[0]).exists()


def test_audit_with_the_vulnerability_service_unreachable_fails_and_says_why(tmp_path, monkeypatch, capsys):
    """Fail-closed, exercised: with every lookup failing (all HTTPS through a proxy that refuses
    connections), the audit exits non-zero and names the cause; it never reads as "no vulnerabilities".
    The audit that needs the network is `make audit`, outside the default test run."""
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    rc = supply_chain.audit(tmp_path)
    out = capsys.readouterr().out
    assert rc != 0, out
    verdict = out.strip().splitlines()[-1]
    assert "FAILED" in verdict and "no known vulnerabilities" not in out, verdict
    assert "proxy" in verdict.lower() or "could not be audited" in verdict, verdict
    assert supply_chain.main(["audit", "--out", str(tmp_path)]) != 0  # the command line too (`make audit`)


# Run by pip-audit itself (a sitecustomize on its PYTHONPATH): PyPI answers every package of the lock with
# no vulnerability but one, which it cannot find (as a package of a private index, or one withdrawn).
# Only in pip-audit's own process: the pythons it starts (pip) import this file too.
ONE_PACKAGE_NOT_FOUND = """
import os
import sys

if os.path.basename(sys.argv[0]) == "pip-audit":
    import pip_audit._service.pypi as pypi
    from pip_audit._service.interface import SkippedDependency

    def query(self, spec):
        if spec.canonical_name == "pillow":
            why = f"Dependency not found on PyPI and could not be audited: pillow ({spec.version})"
            return SkippedDependency(name=spec.name, skip_reason=why), []
        return spec, []

    pypi.PyPIService.query = query
"""


def test_audit_fails_when_one_package_could_not_be_looked_up(tmp_path, monkeypatch, capsys):
    """Fail-closed on a partial outage, not only a total one: every package answered but one, which the
    service could not look up; the audit fails and names it (without `--strict`, pip-audit would skip it
    and report the lock clean)."""
    fake = tmp_path / "fake_service"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(ONE_PACKAGE_NOT_FOUND)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    rc = supply_chain.audit(tmp_path / "out")
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc != 0 and "FAILED" in verdict, verdict
    assert "pillow" in verdict and "could not be audited" in verdict, verdict


def test_audit_failure_reason_names_the_vulnerable_packages(tmp_path):
    report = tmp_path / "audit.json"
    report.write_text(json.dumps({"dependencies": [
        {"name": "pillow", "version": "1.0", "vulns": [{"id": "GHSA-xxxx"}, {"id": "PYSEC-1"}]},
        {"name": "numpy", "version": "2.0", "vulns": []}]}))  # fmt: skip
    assert supply_chain.failure_reason("", report) == "2 known vulnerabilities: pillow (GHSA-xxxx PYSEC-1)"
    missing = tmp_path / "none.json"
    assert supply_chain.failure_reason("x\nERROR:pip_audit._cli:a2wsgi: could not be audited\n", missing) == (
        "ERROR:pip_audit._cli:a2wsgi: could not be audited"
    )


def test_no_secret_material_in_git_or_in_the_image_context():
    for path in ("deploy/secrets/api/api_keys", "deploy/secrets/grafana_admin_password", "deploy/tls/local/server.key",
                 "deploy/tls/local/ca.pem", "deploy/tls/server.crt"):  # fmt: skip
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    tracked = subprocess.run(["git", "ls-files", "deploy/secrets", "deploy/tls"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert not [p for p in tracked if p.endswith((".key", ".pem", ".crt")) or p.endswith("api_keys")]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # the image's build context is deny-by-default ...
    assert not [line for line in ignore if line.startswith("!") and ("secrets" in line or "tls" in line)]


# ---------------------------------------------------------------- what the image build fetches
def _dockerfile_runs() -> list[str]:
    """deploy/Dockerfile's RUN instructions, continuation lines joined."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def _from_images() -> list[str]:
    """The image of each FROM of deploy/Dockerfile, its global ARG defaults substituted."""
    args, images, stages = {}, [], set()
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if m := re.match(r"ARG (\w+)=(\S+)$", line):
            args.setdefault(m[1], m[2])
        elif m := re.match(r"FROM (\S+)(?: AS (\S+))?", line, re.I):
            image = re.sub(r"\$\{(\w+)\}", lambda a: args[a[1]], m[1])
            if image not in stages:
                images.append(image)
            stages.add(m[2])
    return images


def test_every_base_image_is_named_by_digest_the_same_everywhere():
    """A FROM (with its default base) or a BASE_IMAGE given anywhere without @sha256: fails, as does one
    tag with two digests; `make pin-base-images` is the one command that changes them."""
    digest = re.compile(r"@sha256:[0-9a-f]{64}$")
    images = _from_images()
    assert images and all(digest.search(i) for i in images), f"FROM without a digest: {images}"
    seen: dict[str, set[str]] = {}
    for f in supply_chain.BASE_IMAGE_FILES:
        text = (ROOT / f).read_text()
        given = re.findall(r"BASE_IMAGE(?:=(?:\"\s*\")?|: \$\{SERVABLE_BASE_IMAGE:-)([^\s}\"']+)", text)
        assert given, f"{f} names no base image"
        assert all(digest.search(g) for g in given), f"{f}: base image without a digest: {given}"
        for name, tag, d in supply_chain.pinned_refs(text):
            seen.setdefault(f"{name}:{tag}", set()).add(d)
    assert {"python:3.11-slim-bookworm"} <= seen.keys() and any(r.startswith("nvidia/cuda:") for r in seen)
    assert all(len(d) == 1 for d in seen.values()), f"one tag, several digests: {seen}"


class _Registry(BaseHTTPRequestHandler):
    """A registry on 127.0.0.1 the way Docker Hub answers: 401 with a Bearer challenge, a token, the digest."""

    digests: ClassVar[dict[str, str]] = {}

    def do_GET(self):  # the token endpoint
        body = json.dumps({"token": "t0k"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        repo, _, tag = self.path.removeprefix("/v2/").partition("/manifests/")
        if self.headers.get("Authorization") != "Bearer t0k":
            realm = f"http://127.0.0.1:{self.server.server_port}/token"
            self.send_response(401)
            self.send_header(
                "WWW-Authenticate", f'Bearer realm="{realm}",service="fake",scope="repository:{repo}:pull"'
            )
        elif f"{repo}:{tag}" in self.digests and "image.index" in self.headers.get("Accept", ""):
            self.send_response(200)
            self.send_header("Docker-Content-Digest", "sha256:" + self.digests[f"{repo}:{tag}"])
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_pin_bases_resolves_each_tag_at_its_registry_and_rewrites_every_reference(tmp_path):
    for f in supply_chain.BASE_IMAGE_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    before = {f: (tmp_path / f).read_text() for f in supply_chain.BASE_IMAGE_FILES}
    refs = {(n, t) for text in before.values() for n, t, _ in supply_chain.pinned_refs(text)}
    new = {f"{n}:{t}": hashlib.sha256(f"{n}:{t}:new".encode()).hexdigest() for n, t in refs}
    server = HTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registry = f"http://127.0.0.1:{server.server_port}"
    try:
        _Registry.digests = {}  # a tag the registry does not know: nothing is rewritten
        with pytest.raises(urllib.error.HTTPError):
            supply_chain.pin_base_images(lambda n, t: supply_chain.resolve_digest(n, t, registry, 5), tmp_path)
        assert {f: (tmp_path / f).read_text() for f in before} == before
        _Registry.digests = {k: v for k, v in new.items()}
        got = supply_chain.pin_base_images(lambda n, t: supply_chain.resolve_digest(n, t, registry, 5), tmp_path)
    finally:
        server.shutdown()
    assert got == new
    for f in supply_chain.BASE_IMAGE_FILES:
        after = supply_chain.pinned_refs((tmp_path / f).read_text())
        assert after and all(d == new[f"{n}:{t}"] for n, t, d in after), f
        assert len(after) == len(supply_chain.pinned_refs(before[f]))


def test_the_image_installs_only_hashed_locks_and_builds_the_project_offline(tmp_path):
    """Every pip install of deploy/Dockerfile is a hashed lock or offline, and its project build, run
    here with every network path cut and no configured source, succeeds with the locked setuptools
    alone (with build isolation pip would have to fetch setuptools from an index)."""
    installs = [c.strip() for run in _dockerfile_runs() for c in run.split("&&") if "pip install" in c]
    project = [c for c in installs if c.endswith(" .")]
    assert len(project) == 1, installs
    for cmd in installs:
        if cmd in project:
            assert "--no-index" in cmd.split() and "--no-build-isolation" in cmd.split(), cmd
            continue
        assert "--require-hashes" in cmd.split() and "--no-deps" in cmd.split(), cmd
        lock = re.search(r"-r \"?requirements/([\w$.-]+\.txt)", cmd)[1].replace("$ORT_PACKAGE", "onnxruntime")
        text = (supply_chain.LOCKS / lock).read_text()
        assert len(supply_chain.locked(supply_chain.LOCKS / lock)) == len(re.findall(r"==\S+ \\\n\s+--hash", text))
    # the build lock is the backend pyproject.toml asks for, at the version this virtualenv holds
    build = supply_chain.locked(supply_chain.LOCKS / "build.txt")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert {canonicalize_name(Requirement(r).name) for r in pyproject["requires"]} == build.keys()
    assert all(Requirement(r).specifier.contains(build[canonicalize_name(Requirement(r).name)])
               for r in pyproject["requires"])  # fmt: skip
    assert build["setuptools"] == md.version("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "servable", "serving"):  # what the image copies
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    argv = project[0].replace("/opt/venv/bin/pip", f"{Path(sys.executable).parent / 'pip'}").split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "3"}
    env |= {v: "http://127.0.0.1:9" for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
    done = subprocess.run([*argv[:-1], "--prefix", str(tmp_path / "prefix"), "."], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "prefix").rglob("servable-0.1.0.dist-info"))


# ---------------------------------------------------------------- torch: a hashed lock per build
def _torch_sh(pip_dir: Path, *args: str, gpu: bool) -> subprocess.CompletedProcess:
    fake = pip_dir / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 (UUID: GPU-0)"\n' if gpu else "#!/bin/sh\nexit 1\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(pip_dir / "torch.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_torch_installs_from_its_hashed_lock_and_refuses_a_lock_of_another_version(tmp_path):
    version = re.search(r"^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    lock = supply_chain.LOCKS / "torch-cuda.txt"
    pins = supply_chain.locked(lock)
    text = lock.read_text()
    assert pins["torch"] == version and "\n#    make lock-torch\n" in text
    assert len(pins) == len(re.findall(r"==\S+ \\\n\s+--hash=sha256:", text))  # every pin hashed
    assert {"triton", "nvidia-cudnn-cu13", "nvidia-cublas"} <= pins.keys()  # the CUDA build's own wheels
    dev = supply_chain.locked(supply_chain.LOCKS / "dev.txt")
    assert {n: v for n, v in pins.items() if n in dev}.items() <= dev.items()  # one version everywhere
    for f in ("torch.sh", "torch-cuda.txt"):
        shutil.copy(supply_chain.LOCKS / f, tmp_path / f)
    pip = str(Path(sys.executable).parent / "pip")
    done = _torch_sh(tmp_path, pip, version, gpu=True)
    assert done.returncode == 0 and done.stdout.split() == ["--require-hashes", "--no-deps", "-r",
                                                            str(tmp_path / "torch-cuda.txt")], done  # fmt: skip
    other = _torch_sh(tmp_path, pip, "2.0.0", gpu=True)  # the Makefile's version and the lock's disagree
    assert other.returncode != 0 and not other.stdout.strip() and "make lock-torch" in other.stderr
    # the CPU build: unhashed only while it has no lock, and it says so; hashed once torch-cpu.txt exists
    assert "WARNING no hashed lock" in _torch_sh(tmp_path, pip, version, "cpu", gpu=False).stderr
    (tmp_path / "torch-cpu.txt").write_text(f"torch=={version}+cpu \\\n    --hash=sha256:{'0' * 64}\n")
    cpu = _torch_sh(tmp_path, pip, version, "cpu", gpu=False)
    assert cpu.returncode == 0 and cpu.stdout.split()[:4] == ["--require-hashes", "--no-deps", "-r",
                                                               str(tmp_path / "torch-cpu.txt")], cpu  # fmt: skip
