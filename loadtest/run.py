"""One command for a headless load test: against a URL, or against both services it starts on 127.0.0.1.

    python -m loadtest.run                         # start the local stack (replicas behind nginx), test, stop
    python -m loadtest.run --start services        # start the two services alone (no proxy), test, stop
    python -m loadtest.run --url https://127.0.0.1:8443  # a running compose stack (its nginx; make loadtest-url)
    python -m loadtest.run --image-url URL --text-url URL --shape ramp --users 16 --duration 120

Writes Locust's CSV and HTML reports and the SLO verdict (`<name>_slo.md/json`) under --results
(runs/loadtest/; `make publish-loadtest` copies a run to docs/results/loadtest/ on purpose),
and exits with the SLO gate's code. Torch-free. Against a URL the key is LOADTEST_API_KEY (else the
first of SERVABLE_AUTH_KEYS); an HTTPS URL with a private CA needs LOADTEST_CA_BUNDLE (compose's
development CA: deploy/tls/local/ca.pem). `make loadtest-url URL=...` sets both for a compose stack.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from loadtest import inputs

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="one URL serving both (path routing: /classify, /sentiment, /v2/models/...)")
    p.add_argument("--image-url", help="image service URL (overrides --url for it)")
    p.add_argument("--text-url", help="sentiment service URL (overrides --url for it)")
    p.add_argument("--shape", default="steady", choices=["steady", "ramp", "spike"])
    p.add_argument("--users", type=int, default=6, help="peak concurrent users")
    p.add_argument("--duration", type=float, default=30, help="seconds")
    p.add_argument("--results", type=Path, default=Path("runs/loadtest"))
    p.add_argument("--name", default="local", help="report file prefix")
    p.add_argument("--image-tag", default=None, help="model tag when this command starts the services")
    p.add_argument("--text-tag", default=None, help="model tag when this command starts the services")
    p.add_argument("--inputs", type=Path, default=inputs.DEFAULT_DIR)
    p.add_argument("--start", choices=["auto", "stack", "services"], default="auto",
                   help="without a URL: the local stack (deploy/local_stack.py: replicas behind nginx), the two "
                        "services alone, or auto: the stack when it can start, else the services")  # fmt: skip
    return p.parse_args(argv)


def run_locust(args: argparse.Namespace, image_url: str, text_url: str, key: str,
               extra_env: dict[str, str] | None = None) -> int:  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    prefix = args.results / args.name
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", text_url, "-t", f"{int(args.duration) + 15}s",  # the shape stops first; -t is a bound
           "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html"]  # fmt: skip
    env = {**os.environ, "IMAGE_URL": image_url, "TEXT_URL": text_url, "LOADTEST_API_KEY": key,
           "LOADTEST_INPUTS": str(args.inputs), "LOAD_SHAPE": args.shape, "LOAD_USERS": str(args.users),
           "LOAD_DURATION": str(args.duration), **(extra_env or {})}  # fmt: skip
    print(f"locust: {args.shape} load, {args.users} users, {args.duration:g}s -> {prefix}_*.csv, {prefix}.html",
          flush=True)  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=args.duration + 120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return 124


# The proxy (nginx, compose and local stack) routes /classify and /sentiment, and the rest under /image/, /text/.
PROXY_PREFIXES = {"IMAGE_V2_PREFIX": "/image", "TEXT_V2_PREFIX": "/text"}


def proxy_prefixes(args: argparse.Namespace) -> dict[str, str]:
    """One URL for both services means the proxy: V2 lives under its prefixes (override by env)."""
    if args.url and not (args.image_url or args.text_url):
        return {k: os.environ.get(k, v) for k, v in PROXY_PREFIXES.items()}
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    inputs.load(args.inputs)  # export the real inputs once, before the clock starts
    if args.url or (args.image_url and args.text_url):
        key = os.environ.get("LOADTEST_API_KEY") or _first_key(os.environ.get("SERVABLE_AUTH_KEYS", ""))
        image_url, text_url = args.image_url or args.url, args.text_url or args.url
        return run_locust(args, image_url.rstrip("/"), text_url.rstrip("/"), key, proxy_prefixes(args))

    key = _first_key(os.environ.get("SERVABLE_AUTH_KEYS", "")) or secrets.token_urlsafe(24)
    tags = {"image": args.image_tag or "fashion-cnn:latest", "text": args.text_tag or "sentiment-bert:latest"}
    if args.start in ("auto", "stack"):
        try:
            return _against_stack(args, key, tags)
        except (ImportError, FileNotFoundError) as exc:  # no deploy/ package, or no nginx installed
            if args.start == "stack":
                raise
            print(f"local stack unavailable ({exc}); starting the two services alone", flush=True)
    return _against_services(args, key, tags)


def _against_stack(args: argparse.Namespace, key: str, tags: dict[str, str]) -> int:
    import tempfile

    from deploy.local_stack import LocalStack

    workdir = Path(tempfile.mkdtemp(prefix="servable-loadtest-stack-"))
    print(f"starting the local stack (2 replicas each behind nginx) in {workdir} ...", flush=True)
    with LocalStack(workdir, tags["image"], tags["text"], {"loadtest": key}) as stack:
        # The proxy speaks HTTPS with the stack's own CA: Locust (requests) must trust it.
        tls_env = stack.client_env() if hasattr(stack, "client_env") else {}
        return run_locust(args, stack.proxy_url, stack.proxy_url, key, {**tls_env, **PROXY_PREFIXES})


def _against_services(args: argparse.Namespace, key: str, tags: dict[str, str]) -> int:
    from deploy import launch  # only needed when this command starts the services itself

    env = {"SERVABLE_AUTH_KEYS": f"loadtest:{key}", "SERVABLE_IMAGE_SERVE_MODEL_TAG": tags["image"],
           "SERVABLE_TEXT_SERVE_MODEL_TAG": tags["text"]}  # fmt: skip
    servers = []
    try:
        for kind in ("image", "text"):
            print(f"starting the {kind} service on 127.0.0.1 ...", flush=True)
            servers.append(launch.start_ready(launch.SERVICES[kind], env))
        return run_locust(args, servers[0].url, servers[1].url, key)
    finally:
        for s in servers:
            s.stop()


def _first_key(keys: str) -> str:
    first = keys.split(",")[0]
    return first.split(":", 1)[1].strip() if ":" in first else ""


if __name__ == "__main__":
    sys.exit(main())
