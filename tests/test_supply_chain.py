"""Supply chain (deploy/supply_chain.py, requirements/): the locks agree with pyproject.toml and with
each other and hold no torch build, this virtualenv is the locked set, the CycloneDX SBOM of the
serving lock, the vulnerability audit (where a vulnerability service answers), and no secret
material in git or in the image's build context."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
from pathlib import Path

import pytest
from packaging.markers import default_environment
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
