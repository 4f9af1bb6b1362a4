"""Supply chain of the serving image: its locked dependency set, a CycloneDX SBOM of it, a vulnerability audit.

The serving image installs requirements/serve.txt (deploy/Dockerfile): the project's base
dependencies plus the `serve` extra, never torch, pinned with hashes by `make lock`. The SBOM and
the audit read that lock, so they describe what the image installs, not the development
virtualenv (which holds torch, transformers, Locust, test tools on top).

    python -m deploy.supply_chain sbom           # docs/results/sbom/serve.cdx.json (CycloneDX 1.6, cyclonedx-py)
    python -m deploy.supply_chain audit          # pip-audit of the lock; needs PyPI's JSON API or OSV
    python -m deploy.supply_chain audit --lock requirements/dev.txt --out /tmp/audit   # any other lock
    python -m deploy.supply_chain pin-bases      # re-resolve the base images' digests at their registry

The CPU image swaps onnxruntime-gpu for requirements/onnxruntime.txt (the same version, CPU build):
for the SBOM of one built image, run `cyclonedx-py environment /opt/venv/bin/python` inside it
(docs/deploy.md, "Supply chain").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCKS = ROOT / "requirements"
SERVE_LOCK = LOCKS / "serve.txt"
OUT_DIR = ROOT / "docs" / "results" / "sbom"
BIN = Path(sys.executable).parent
# A pin as pip-compile writes it: `name==version \` at the start of a line (hashes follow).
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def top_level(extras: tuple[str, ...] = ("serve",)) -> list[Requirement]:
    """The project's base dependencies and those of `extras`, from pyproject.toml as it is now."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    name = canonicalize_name(project["name"])
    out = []
    for spec in reqs:
        req = Requirement(spec)
        if canonicalize_name(req.name) == name:  # a self-reference (servable[serve]): its extras
            out += top_level(tuple(req.extras))
        else:
            out.append(req)
    return out


def locked(lock: Path = SERVE_LOCK) -> dict[str, str]:
    """{canonical name: version} of every package pinned in a lock of requirements/."""
    return {canonicalize_name(name): version for name, version in PIN.findall(lock.read_text())}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}: `make setup` installs it (dev extra)")
    return str(path)


def write_sbom(out_dir: Path = OUT_DIR, lock: Path = SERVE_LOCK) -> Path:
    """CycloneDX 1.6 JSON of a lock (cyclonedx-py: versions and the lock's hashes; offline)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{lock.stem}.cdx.json"
    cmd = [_tool("cyclonedx-py"), "requirements", str(lock), "--pyproject", str(PYPROJECT), "--of", "JSON",
           "--output-reproducible", "--mc-type", "application", "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, text=True)
    return out


def audit_command(lock: Path, report: Path, service: str = "pypi") -> list[str]:
    """pip-audit of a lock (complete and hashed, so --no-deps). `--strict`: a package it could not
    look up fails the audit (without it, an unreachable vulnerability service reads as "no known
    vulnerabilities")."""
    return [_tool("pip-audit"), "--requirement", str(lock), "--require-hashes", "--no-deps", "--disable-pip",
            "--strict", "--vulnerability-service", service, "--progress-spinner", "off", "--format", "json",
            "--output", str(report)]  # fmt: skip


def failure_reason(output: str, report: Path) -> str:
    """Why pip-audit failed, in one line: the vulnerabilities it found, else its last error."""
    if report.exists():
        try:
            found = {d["name"]: [v["id"] for v in d["vulns"]] for d in json.loads(report.read_text())["dependencies"]
                     if d.get("vulns")}  # fmt: skip
        except (ValueError, KeyError, TypeError):
            found = {}
        if found:
            return f"{sum(map(len, found.values()))} known vulnerabilities: " + ", ".join(
                f"{name} ({' '.join(ids)})" for name, ids in sorted(found.items())
            )
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR") or "Error:" in line or "Error(" in line]
    return (errors or lines or ["no output"])[-1][:500]


def audit(out_dir: Path = OUT_DIR, service: str = "pypi", lock: Path = SERVE_LOCK) -> int:
    """Run the audit; 0 only when every package was looked up and none has a known vulnerability."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"audit-{service}.json"
    report.unlink(missing_ok=True)  # a report left by an earlier run must not speak for this one
    done = subprocess.run(audit_command(lock, report, service), timeout=900, check=False, capture_output=True,
                          text=True)  # fmt: skip
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode == 0:
        print(f"pip-audit ({service}) of {lock}: every package looked up, no known vulnerabilities; report {report}")
    else:
        why = failure_reason(done.stdout + "\n" + done.stderr, report)
        print(f"pip-audit ({service}) of {lock} FAILED (exit {done.returncode}): {why}")
    return done.returncode


# Every file that names a base image of deploy/Dockerfile (its default, compose's, the release
# command's, the docs' build commands): `pin-bases` rewrites them all, the tests check them all.
BASE_IMAGE_FILES = ("deploy/Dockerfile", "deploy/compose.yaml", "deploy/compose.gpu.yaml", "deploy/k8s_release.py",
                    "docs/deploy.md")  # fmt: skip
# `name:tag@sha256:digest`, the name as Docker writes it (optionally with a registry host).
PINNED_REF = re.compile(r"\b((?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9._/-]+):([\w.-]+)@sha256:([0-9a-f]{64})\b")
DOCKER_HUB = "https://registry-1.docker.io"
# What a registry may answer for a tag: a multi-platform index first (one digest for every platform).
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def pinned_refs(text: str) -> list[tuple[str, str, str]]:
    """(name, tag, digest) of each `name:tag@sha256:digest` in a text."""
    return PINNED_REF.findall(text)


def _bearer_token(challenge: str, timeout: float) -> str:
    """A registry's anonymous pull token, from its `WWW-Authenticate: Bearer realm=...,service=...,scope=...`."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm")
    with urllib.request.urlopen(f"{realm}?{urllib.parse.urlencode(params)}", timeout=timeout) as resp:
        body = json.load(resp)
    return body.get("token") or body["access_token"]


def resolve_digest(name: str, tag: str, registry: str = DOCKER_HUB, timeout: float = 30) -> str:
    """The digest a registry serves for name:tag now (Docker-Content-Digest of a HEAD on its manifest)."""
    repo = name.split("/", 1)[1] if "." in name.split("/")[0] or ":" in name.split("/")[0] else name
    if "/" not in repo and registry == DOCKER_HUB:
        repo = f"library/{repo}"  # Docker Hub's official images
    url = f"{registry.rstrip('/')}/v2/{repo}/manifests/{tag}"
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    for _ in range(2):
        try:
            req = urllib.request.Request(url, headers=headers, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                digest = r.headers.get("Docker-Content-Digest", "")
                break
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "")
            if e.code != 401 or not challenge.startswith("Bearer ") or "Authorization" in headers:
                raise
            headers["Authorization"] = f"Bearer {_bearer_token(challenge[len('Bearer ') :], timeout)}"
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"{url} answered no sha256 digest ({digest!r})")
    return digest.removeprefix("sha256:")


def pin_base_images(resolve: Callable[[str, str], str], root: Path = ROOT, files=BASE_IMAGE_FILES) -> dict[str, str]:
    """Re-resolve every `name:tag@sha256:...` of the base-image files and rewrite them in place.
    Returns {name:tag: digest}. Nothing is written unless every tag resolved."""
    texts = {f: (root / f).read_text() for f in files}
    tags = sorted({(n, t) for text in texts.values() for n, t, _ in pinned_refs(text)})
    digests = {f"{n}:{t}": resolve(n, t) for n, t in tags}
    for f, text in texts.items():
        new = PINNED_REF.sub(lambda m: f"{m[1]}:{m[2]}@sha256:{digests[f'{m[1]}:{m[2]}']}", text)
        if new != text:
            (root / f).write_text(new)
    return digests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sbom", "audit", "pin-bases"])
    ap.add_argument("--lock", type=Path, default=SERVE_LOCK, help="a lock of requirements/ (default: serve.txt)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--service", choices=["pypi", "osv"], default="pypi", help="pip-audit's vulnerability service")
    ap.add_argument("--registry", default=DOCKER_HUB, help="pin-bases: the registry's base URL")
    args = ap.parse_args(argv)
    if args.what == "pin-bases":
        try:
            digests = pin_base_images(lambda name, tag: resolve_digest(name, tag, args.registry))
        except (OSError, ValueError, KeyError) as e:  # nothing was rewritten
            print(f"pin-bases FAILED, no file changed: {e}")
            return 1
        for ref, digest in digests.items():
            print(f"{ref}@sha256:{digest}")
        return 0
    if args.what == "audit":
        return audit(args.out, args.service, args.lock)
    print(f"wrote {write_sbom(args.out, args.lock)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
