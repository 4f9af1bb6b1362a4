"""One command for a headless load test: against a URL, or against the served models it starts on 127.0.0.1.

    python -m loadtest.run                         # start the local stack (replicas behind nginx), test, stop
    python -m loadtest.run --start services        # start the services alone (no proxy), test, stop
    python -m loadtest.run --url https://127.0.0.1:8443  # a running compose stack (its nginx; make loadtest-url)
    python -m loadtest.run --image-url URL --text-url URL --shape ramp --users 16 --duration 120
    python -m loadtest.run --model-url tabular=URL ...   # any served model's own URL (KIND=URL)

Every SERVED_MODELS entry is load-tested (loadtest/locustfile.py: a user per model, its request from
the entry's `example`); --extra-model module:ATTR adds a ServedModelEntry defined outside
servable/config.py to the stack this command starts and to Locust (LOADTEST_EXTRA_MODELS).
Writes Locust's CSV and HTML reports and the SLO verdict (`<name>_slo.md/json`) under --results
(runs/loadtest/; `make publish-loadtest` copies a run to docs/results/loadtest/ on purpose),
and exits with the SLO gate's code. Torch-free. Against a URL the key is LOADTEST_API_KEY (else the
first of SERVABLE_AUTH_KEYS); an HTTPS URL with a private CA needs LOADTEST_CA_BUNDLE (compose's
development CA: deploy/tls/local/ca.pem). `make loadtest-url URL=...` sets both for a compose stack.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from loadtest import inputs
from servable.config import SERVED_MODELS, ServedModelEntry

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ROOT = LOCUSTFILE.parents[1]  # the services (serving/, or a model's own package) are imported from here
EXTRA_MODELS_ENV = "LOADTEST_EXTRA_MODELS"  # "module:ATTR[,module:ATTR]": entries Locust adds to SERVED_MODELS


def _imported(spec: str) -> object:
    module, sep, attr = spec.strip().partition(":")
    if not sep:
        raise ValueError(f"{spec!r}: use module:name")
    return getattr(importlib.import_module(module), attr)


def add_extra_models(specs: str) -> list[str]:
    """Put the ServedModelEntry objects named by "module:ATTR,..." into SERVED_MODELS; their kinds."""
    kinds = []
    for spec in filter(str.strip, specs.split(",")):
        entry = _imported(spec)
        if not isinstance(entry, ServedModelEntry):
            raise TypeError(f"{spec} is a {type(entry).__name__}, not a ServedModelEntry")
        SERVED_MODELS[entry.kind] = entry
        kinds.append(entry.kind)
    return kinds


def example_request(entry: ServedModelEntry) -> tuple[dict, int | None]:
    """The entry's example as the keyword arguments of a `requests` POST to its route, and the number
    of predictions its answer must hold (None: any, at least one)."""
    if not entry.example:
        raise ValueError(f"served model {entry.kind!r} has no `example` request (servable/config.py)")
    if entry.example.lstrip().startswith("{"):
        return {"json": json.loads(entry.example)}, None
    kwargs = dict(_imported(entry.example)())
    return kwargs, kwargs.pop("items", None)


def url_env(kind: str) -> str:
    """The variable holding a model's URL for Locust (IMAGE_URL, TEXT_URL, ...); else --host."""
    return f"{kind.upper()}_URL"


def v2_prefix_env(kind: str) -> str:
    return f"{kind.upper()}_V2_PREFIX"


def _pair(text: str) -> tuple[str, str]:
    kind, sep, value = text.partition("=")
    if not sep or not kind or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: use KIND=VALUE")
    return kind, value


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="one URL serving every model (path routing: /classify, /sentiment, /<kind>/...)")
    p.add_argument("--image-url", help="image service URL (the same as --model-url image=URL)")
    p.add_argument("--text-url", help="sentiment service URL (the same as --model-url text=URL)")
    p.add_argument("--model-url", type=_pair, action="append", default=[], metavar="KIND=URL",
                   help="one served model's URL (overrides --url for it); repeat per model")  # fmt: skip
    p.add_argument("--shape", default="steady", choices=["steady", "ramp", "spike"])
    p.add_argument("--users", type=int, default=6, help="peak concurrent users")
    p.add_argument("--duration", type=float, default=30, help="seconds")
    p.add_argument("--results", type=Path, default=Path("runs/loadtest"))
    p.add_argument("--name", default="local", help="report file prefix")
    p.add_argument("--image-tag", default=None, help="model tag when this command starts the services")
    p.add_argument("--text-tag", default=None, help="model tag when this command starts the services")
    p.add_argument("--tag", type=_pair, action="append", default=[], metavar="KIND=TAG",
                   help="any served model's tag when this command starts the services; default: its "
                        "settings' model_tag")  # fmt: skip
    p.add_argument("--extra-model", action="append", default=[], metavar="MODULE:ATTR",
                   help="a ServedModelEntry outside servable/config.py to serve and load-test too")  # fmt: skip
    p.add_argument("--inputs", type=Path, default=inputs.DEFAULT_DIR)
    p.add_argument("--start", choices=["auto", "stack", "services"], default="auto",
                   help="without a URL: the local stack (deploy/local_stack.py: replicas behind nginx), the "
                        "services alone, or auto: the stack when it can start, else the services")  # fmt: skip
    return p.parse_args(argv)


def run_locust(args: argparse.Namespace, urls: dict[str, str], key: str,
               extra_env: dict[str, str] | None = None) -> int:  # fmt: skip
    """Locust against each served model's URL (kind -> URL)."""
    args.results.mkdir(parents=True, exist_ok=True)
    prefix = args.results / args.name
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", next(iter(urls.values())), "-t", f"{int(args.duration) + 15}s",  # the shape stops first
           "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html"]  # fmt: skip
    env = {**os.environ, **{url_env(kind): url for kind, url in urls.items()}, "LOADTEST_API_KEY": key,
           "LOADTEST_INPUTS": str(args.inputs), "LOAD_SHAPE": args.shape, "LOAD_USERS": str(args.users),
           "LOAD_DURATION": str(args.duration), **(extra_env or {})}  # fmt: skip
    if args.extra_model:
        env[EXTRA_MODELS_ENV] = ",".join(filter(None, [os.environ.get(EXTRA_MODELS_ENV, ""), *args.extra_model]))
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


def proxy_prefix_env() -> dict[str, str]:
    """The proxy (nginx: compose and the local stack) routes each model's REST route at the root and
    the rest, V2 included, under /<kind>/ (override per model by env)."""
    return {v2_prefix_env(kind): os.environ.get(v2_prefix_env(kind), f"/{kind}") for kind in SERVED_MODELS}


def model_urls(args: argparse.Namespace) -> dict[str, str]:
    """kind -> URL from --url, --image-url/--text-url and --model-url; {} when a model has none."""
    given = {k: u for k, u in (("image", args.image_url), ("text", args.text_url)) if u} | dict(args.model_url)
    unknown = set(given) - set(SERVED_MODELS)
    if unknown:
        raise SystemExit(f"--model-url for {sorted(unknown)}: not in SERVED_MODELS ({', '.join(SERVED_MODELS)})")
    urls = {kind: (given.get(kind) or args.url or "").rstrip("/") for kind in SERVED_MODELS}
    return urls if all(urls.values()) else {}


def model_tags(args: argparse.Namespace) -> dict[str, str]:
    given = {k: t for k, t in (("image", args.image_tag), ("text", args.text_tag)) if t} | dict(args.tag)
    return {kind: given.get(kind) or entry.settings.model_fields["model_tag"].default
            for kind, entry in SERVED_MODELS.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    add_extra_models(",".join([os.environ.get(EXTRA_MODELS_ENV, ""), *args.extra_model]))
    inputs.load(args.inputs)  # export the real inputs once, before the clock starts
    if urls := model_urls(args):
        key = os.environ.get("LOADTEST_API_KEY") or _first_key(os.environ.get("SERVABLE_AUTH_KEYS", ""))
        # one URL for every model means the proxy: V2 lives under its prefixes
        behind_proxy = args.url and len(set(urls.values())) == 1
        return run_locust(args, urls, key, proxy_prefix_env() if behind_proxy else {})

    key = _first_key(os.environ.get("SERVABLE_AUTH_KEYS", "")) or secrets.token_urlsafe(24)
    tags = model_tags(args)
    if args.start in ("auto", "stack"):
        try:
            return _against_stack(args, key, tags)
        except (ImportError, FileNotFoundError) as exc:  # no deploy/ package, or no nginx installed
            if args.start == "stack":
                raise
            print(f"local stack unavailable ({exc}); starting the services alone", flush=True)
    return _against_services(args, key, tags)


def _against_stack(args: argparse.Namespace, key: str, tags: dict[str, str]) -> int:
    import tempfile

    from deploy.local_stack import LocalStack

    workdir = Path(tempfile.mkdtemp(prefix="servable-loadtest-stack-"))
    print(f"starting the local stack (2 replicas of each of {', '.join(tags)} behind nginx) in {workdir} ...",
          flush=True)  # fmt: skip
    with LocalStack(workdir, api_keys={"loadtest": key}, tags=tags) as stack:
        # The proxy speaks HTTPS with the stack's own CA: Locust (requests) must trust it.
        urls = {kind: stack.proxy_url for kind in tags}
        return run_locust(args, urls, key, {**stack.client_env(), **proxy_prefix_env()})


def _against_services(args: argparse.Namespace, key: str, tags: dict[str, str]) -> int:
    from deploy import launch  # only needed when this command starts the services itself

    env = {"SERVABLE_AUTH_KEYS": f"loadtest:{key}"}
    env |= {f"{SERVED_MODELS[kind].env_prefix}MODEL_TAG": tag for kind, tag in tags.items()}
    servers: dict[str, launch.Server] = {}
    try:
        for kind in tags:
            print(f"starting the {kind} service on 127.0.0.1 ...", flush=True)
            servers[kind] = launch.start_ready(SERVED_MODELS[kind].service, env, cwd=ROOT)
        return run_locust(args, {kind: s.url for kind, s in servers.items()}, key)
    finally:
        for s in servers.values():
            s.stop()


def _first_key(keys: str) -> str:
    first = keys.split(",")[0]
    return first.split(":", 1)[1].strip() if ":" in first else ""


if __name__ == "__main__":
    sys.exit(main())
