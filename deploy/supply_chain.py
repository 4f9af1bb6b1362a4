"""Supply chain of the serving image: its locked dependency set, a CycloneDX SBOM of it, a vulnerability audit.

The serving image installs requirements/serve.txt (deploy/Dockerfile): the project's base
dependencies plus the `serve` extra, never torch, pinned with hashes by `make lock`. The SBOM and
the audit read that lock, so they describe what the image installs, not the development
virtualenv (which holds torch, transformers, Locust, test tools on top).

    python -m deploy.supply_chain sbom           # docs/results/sbom/serve.cdx.json (CycloneDX 1.6, cyclonedx-py)
    python -m deploy.supply_chain audit          # pip-audit of the lock; needs PyPI's JSON API or OSV
    python -m deploy.supply_chain audit --lock requirements/dev.txt --out /tmp/audit   # any other lock

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sbom", "audit"])
    ap.add_argument("--lock", type=Path, default=SERVE_LOCK, help="a lock of requirements/ (default: serve.txt)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--service", choices=["pypi", "osv"], default="pypi", help="pip-audit's vulnerability service")
    args = ap.parse_args(argv)
    if args.what == "audit":
        return audit(args.out, args.service, args.lock)
    print(f"wrote {write_sbom(args.out, args.lock)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
