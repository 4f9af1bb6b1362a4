"""The compose topology on 127.0.0.1 without Docker: replicas, nginx in front, Prometheus.

Two replicas of each served model (every SERVED_MODELS entry, read when the stack is made: an
entry a test adds counts; `bentoml serve <entry.service>`, each in its own process group), nginx
(Debian) running the same `deploy/nginx/nginx.conf`, `servable.conf.template` and per-model
templates as compose (HTTPS with a self-signed certificate from deploy/tls/make_self_signed.sh,
per-API-key rate limits, per-address connection limits, client timeouts), and Prometheus (Debian)
with the same scrape config and rules (rendered from SERVED_MODELS by deploy/render.py), its
file_sd targets pointing at the replicas' 127.0.0.1 ports. Everything listens on 127.0.0.1 only,
every wait is bounded, and `stop()` ends each process it started by its own process group, also
when a test failed.

    python -m deploy.local_stack --tag image=fashion-cnn:latest --tag text=sentiment-bert:latest
    (or `make stack`): runs in the foreground until Ctrl-C. A model without --tag serves its
    settings' model_tag (<env prefix>MODEL_TAG from the environment, else the default).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy import launch, render
from servable.config import SERVED_MODELS

ROOT = Path(__file__).resolve().parents[1]  # replicas import their service from here (serving/, tests/...)
MAKE_CERT = Path(__file__).resolve().parent / "tls" / "make_self_signed.sh"


def _which(name: str) -> str:
    for d in (None, "/usr/sbin", "/usr/bin"):
        found = shutil.which(name, path=d)
        if found:
            return found
    raise FileNotFoundError(f"{name} not found: `make setup` installs it (apt package {name})")


@dataclass
class Proc:
    """A helper process (nginx, Prometheus) in its own process group."""

    name: str
    proc: subprocess.Popen = field(repr=False)
    log_path: Path
    stop_signal: int = signal.SIGTERM

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, self.stop_signal)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def _spawn(name: str, cmd: list[str], log_path: Path, stop_signal: int = signal.SIGTERM) -> Proc:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    return Proc(name, proc, log_path, stop_signal)


def stop_replica(server: launch.Server, crash: bool = False) -> None:
    """Stop one replica and every worker it started; `crash=True` kills it all at once (SIGKILL)."""
    server.stop(crash=crash)


def _children(pid: int) -> set[int]:
    """The process ids whose parent is `pid` (nginx's workers)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def make_self_signed(out: Path) -> Path:
    """A local CA and a server certificate for 127.0.0.1 in `out` (deploy/tls/make_self_signed.sh)."""
    done = subprocess.run(["bash", str(MAKE_CERT), str(out)], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{MAKE_CERT.name} failed (is `openssl` installed?):\n{done.stderr}")
    return out


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if launch.get(url, timeout=2)[0] == 200:
            return True
        time.sleep(0.3)
    return False


def _wait_https(url: str, ca_file: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    context = ssl.create_default_context(cafile=ca_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


# The local stack's own lines around the shared deploy/nginx/nginx.conf: main-context directives on
# the command line (-g), http-context ones in conf.d/ (the shared file includes conf.d/servable*.conf).
NGINX_LOCAL_HTTP = """# Local stack: temp files under its own directory (compose: the image's defaults).
client_body_temp_path {dir}/tmp/body;
proxy_temp_path {dir}/tmp/proxy;
fastcgi_temp_path {dir}/tmp/fastcgi;
uwsgi_temp_path {dir}/tmp/uwsgi;
scgi_temp_path {dir}/tmp/scgi;
"""


def write_nginx_config(prefix: Path, conf_files: Mapping[str, str], nginx: str) -> list[str]:
    """The shared main config (deploy/nginx/nginx.conf), the rendered proxy files
    (render.nginx_conf_files: conf.d/ name -> text) and the local temp paths under `prefix`; the
    command line that runs them in the foreground, pid and logs there."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf_d = prefix / "conf.d"
    conf_d.mkdir(parents=True, exist_ok=True)
    shutil.copy(render.NGINX_MAIN, prefix / "nginx.conf")
    for name, text in conf_files.items():
        (conf_d / name).write_text(text)
    (conf_d / "servable-local.conf").write_text(NGINX_LOCAL_HTTP.format(dir=prefix))
    error_log = prefix / "nginx-error.log"
    main = f"daemon off; pid {prefix}/nginx.pid; error_log {error_log} warn;"
    if os.geteuid() == 0:  # workers write the temp dirs this (root) process created
        main += " user root root;"
    return [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(error_log), "-g", main]


def model_tag(kind: str, env: Mapping[str, str]) -> str:
    """The tag a model's replicas serve when none is given: <prefix>MODEL_TAG in `env`, else its default."""
    entry = SERVED_MODELS[kind]
    return env.get(f"{entry.env_prefix}MODEL_TAG") or entry.settings.model_fields["model_tag"].default


class LocalStack:
    """`proxy_url` is HTTPS (clients verify with `ca_file`); `http_url` is nginx's plain listener,
    which only redirects to it. `rate_limit`/`rate_burst`: nginx's per-API-key limit; `conn_limit`: its
    per-address limit of requests in progress (a load generator is one address: lift it there).

    Every SERVED_MODELS entry at construction gets `replicas` replicas (`replicas_per_kind`
    overrides it per kind; 0 starts none, and nginx answers 502 on its routes). `tags` maps
    kind -> model-store tag (`image_tag`/`text_tag` are the same for those two kinds); a kind
    without one serves <prefix>MODEL_TAG of `extra_env`, else of this process' environment, else
    its settings' default. `upstreams` maps kind -> servers started elsewhere (launch.Server, e.g. another
    server compared behind the same proxy): nginx and Prometheus use them as that kind's replicas, and the
    stack stops them with its own."""

    def __init__(self, workdir: Path, image_tag: str | None = None, text_tag: str | None = None,
                 api_keys: dict[str, str] | None = None, replicas: int = 2, extra_env: dict[str, str] | None = None,
                 rate_limit: str = render.RATE_LIMIT, rate_burst: int = render.RATE_BURST,
                 tls_dir: Path | None = None, conn_limit: int = render.CONN_LIMIT, *,
                 tags: Mapping[str, str] | None = None,
                 replicas_per_kind: Mapping[str, int] | None = None,
                 explain_rate_limit: str = render.EXPLAIN_RATE_LIMIT,
                 explain_rate_burst: int = render.EXPLAIN_RATE_BURST,
                 upstreams: Mapping[str, list[launch.Server]] | None = None) -> None:  # fmt: skip
        self.dir = Path(workdir)
        self.extra_env = extra_env or {}
        given = {k: t for k, t in (("image", image_tag), ("text", text_tag)) if t and k in SERVED_MODELS}
        given |= dict(tags or {})
        unknown = (set(given) | set(replicas_per_kind or {}) | set(upstreams or {})) - set(SERVED_MODELS)
        if unknown:
            raise KeyError(f"{sorted(unknown)}: not in SERVED_MODELS")
        env = {**os.environ, **self.extra_env}
        self.tags = {kind: given.get(kind) or model_tag(kind, env) for kind in SERVED_MODELS}
        self.api_keys = api_keys or {}
        self.n = replicas
        self.counts = {kind: (replicas_per_kind or {}).get(kind, replicas) for kind in SERVED_MODELS}
        self.counts |= dict.fromkeys(upstreams or {}, 0)
        self.replicas: dict[str, list[launch.Server]] = {kind: list((upstreams or {}).get(kind, []))
                                                         for kind in SERVED_MODELS}  # fmt: skip
        # A canary per kind (deploy/release.py): its replicas, tag and share of the pool's requests (percent);
        # `previous`: the tag a promotion replaced (what a roll back returns to).
        self.canary: dict[str, list[launch.Server]] = {kind: [] for kind in SERVED_MODELS}
        self.canary_tags: dict[str, str] = {}
        self.canary_weight: dict[str, int] = dict.fromkeys(SERVED_MODELS, 0)
        self.previous: dict[str, str] = {}
        self.keys_file = self.dir / "api_keys"
        self.rate_limit, self.rate_burst, self.conn_limit = rate_limit, rate_burst, conn_limit
        self.explain_limits = {"explain_rate_limit": explain_rate_limit, "explain_rate_burst": explain_rate_burst}
        self.tls_dir = Path(tls_dir) if tls_dir else self.dir / "tls"  # a mounted real certificate, or generated
        self.nginx: Proc | None = None
        self.extra_proxies: list[Proc] = []
        self.prometheus: Proc | None = None
        self.proxy_port = launch.free_port()
        self.http_port = launch.free_port()
        self.prometheus_port = launch.free_port()

    @property
    def proxy_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ca_file(self) -> str:
        """The CA that signed the proxy's certificate: `requests.get(..., verify=stack.ca_file)`."""
        return str(self.tls_dir / "ca.pem")

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (requests, Locust, curl) to trust the proxy's certificate."""
        return {"REQUESTS_CA_BUNDLE": self.ca_file, "SSL_CERT_FILE": self.ca_file, "CURL_CA_BUNDLE": self.ca_file}

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- start

    def start(self, timeout_s: float = 300.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keys_file.write_text("".join(f"{n}:{k}\n" for n, k in self.api_keys.items()))
        self.keys_file.chmod(0o600)
        # All replicas start at once (on 2 cores they take most of the start-up time) ...
        for kind, count in self.counts.items():
            self.replicas[kind] += self._start_replicas(kind, self.tags[kind], count, wait_s=None)
        # ... and the proxy starts only once all of them are ready (compose: service_healthy).
        self._wait_ready(self.all_replicas(), timeout_s)
        self._start_nginx()
        self._start_prometheus()
        self.write_state()

    def _start_replicas(self, kind: str, tag: str, count: int, wait_s: float | None = 300.0,
                        env: Mapping[str, str] | None = None, name: str = "") -> list[launch.Server]:  # fmt: skip
        """`count` replicas of `kind` serving `tag` (with `env` on top), ready within wait_s (None: no wait)."""
        entry = SERVED_MODELS[kind]
        p = entry.env_prefix
        # One HTTP worker per replica: the stack's 2+2 replicas already share this machine's cores.
        env = {f"{p}INTRA_OP_THREADS": "1", f"{p}WORKERS": "1", "SERVABLE_AUTH_KEYS": "",
               "SERVABLE_AUTH_KEYS_FILE": str(self.keys_file), **self.extra_env, **(env or {}),
               f"{p}MODEL_TAG": tag}  # fmt: skip
        servers = []
        try:
            for i in range(count):
                log_name = f"{name or kind}-{i + 1}"
                while (self.dir / f"{log_name}.log").exists():  # a replaced replica's log stays
                    log_name += "+"
                # launch.start gives each replica its own BENTOML_HOME (metrics), sharing the model store.
                servers.append(launch.start(entry.service, env, log_path=self.dir / f"{log_name}.log", cwd=ROOT))
            if wait_s is not None:
                self._wait_ready(servers, wait_s)
        except BaseException:
            for server in servers:
                stop_replica(server)
            raise
        return servers

    @staticmethod
    def _wait_ready(servers: list[launch.Server], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for server in servers:
            if not launch.wait_until(server, timeout_s=max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"replica {server.url} not ready in {timeout_s:.0f}s:\n{server.log()[-3000:]}")

    def all_replicas(self) -> list[launch.Server]:
        return [server for servers in (*self.replicas.values(), *self.canary.values()) for server in servers]

    def addresses(self, kind: str, running_only: bool = False) -> list[str]:
        servers = self.replicas.get(kind, [])
        return [f"127.0.0.1:{s.port}" for s in servers if not running_only or s.proc.poll() is None]

    def _start_nginx(self) -> None:
        if not (self.tls_dir / "server.crt").exists():
            make_self_signed(self.tls_dir)
        self.nginx = self._nginx("nginx", self.dir, self.proxy_port, self.http_port, self.rate_limit, self.rate_burst)

    def _nginx(self, name: str, prefix: Path, https_port: int, http_port: int, rate_limit: str,
               rate_burst: int, dead: tuple[str, ...] = (), explain_limits: dict | None = None,
               reload: Proc | None = None) -> Proc:  # fmt: skip
        """One nginx from the shared configuration, its rendered config, pid, temp files and logs under
        `prefix`; `dead`: addresses nothing listens on, listed first in each pool, then the running
        replicas only (one retry then always reaches a live one). `reload`: that running nginx reads the
        configuration again instead (graceful: its old workers finish their requests)."""
        pools = {kind: [*dead, *self.addresses(kind, running_only=bool(dead))] for kind in self.replicas}
        canary = {kind: ([f"127.0.0.1:{s.port}" for s in self.canary[kind]], self.canary_weight[kind])
                  for kind in self.canary}  # fmt: skip
        values = render.nginx_values(pools, "127.0.0.1", https_port,
                                     str(prefix / "nginx-access.log"), tls_cert=str(self.tls_dir / "server.crt"),
                                     tls_key=str(self.tls_dir / "server.key"), http_port=http_port,
                                     rate_limit=rate_limit, rate_burst=rate_burst,
                                     conn_limit=self.conn_limit,
                                     **(explain_limits or self.explain_limits), canary=canary)  # fmt: skip
        cmd = write_nginx_config(prefix, render.nginx_conf_files(values), _which("nginx"))
        if reload is not None:
            return self._reload(reload, cmd)
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        proc = _spawn(name, cmd, prefix / "nginx.out", signal.SIGQUIT)
        # ready: the plain listener answers, and the TLS listener completes a verified handshake
        if not (_wait_http(f"http://127.0.0.1:{http_port}/healthz", proc.proc, 30)
                and _wait_https(f"https://127.0.0.1:{https_port}/healthz", self.ca_file, proc.proc, 30)):  # fmt: skip
            errors = (prefix / "nginx-error.log").read_text(errors="replace")
            proc.stop()
            raise RuntimeError(f"nginx did not start:\n{proc.log()}\n{errors}")
        return proc

    def start_extra_proxy(
        self,
        name: str,
        rate_limit: str,
        rate_burst: int,
        dead_replica: bool = False,
        explain_rate_limit: str | None = None,
        explain_rate_burst: int | None = None,
    ) -> str:
        """One more nginx from the same template and certificate in front of the same replicas, with
        other rate limits (a test of the limit without throttling the main proxy); its HTTPS URL.
        `dead_replica`: each pool lists first an address nothing listens on (a crashed replica), so
        nginx's upstream-error path runs. `explain_rate_*`: the explain budget (default: the stack's).
        Stopped with the stack."""
        https_port, http_port = launch.free_port(), launch.free_port()
        prefix = self.dir / name
        prefix.mkdir(parents=True, exist_ok=True)
        dead = (f"127.0.0.1:{launch.free_port()}",) if dead_replica else ()
        explain = {
            "explain_rate_limit": explain_rate_limit or self.explain_limits["explain_rate_limit"],
            "explain_rate_burst": explain_rate_burst or self.explain_limits["explain_rate_burst"],
        }
        self.extra_proxies.append(self._nginx(name, prefix, https_port, http_port, rate_limit, rate_burst, dead,
                                              explain))  # fmt: skip
        return f"https://127.0.0.1:{https_port}"

    def _reload(self, nginx: Proc, cmd: list[str]) -> Proc:
        """nginx -t, then SIGHUP: the master starts workers with the new pools and the old ones stop taking
        requests and finish those they hold; returns once the old workers have exited (bounded), so that a
        replica the new pools left out may then be stopped without failing a request."""
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed, the running proxy is unchanged:\n{check.stderr}")
        old = _children(nginx.proc.pid)
        os.kill(nginx.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while _children(nginx.proc.pid) & old:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx's old workers {sorted(old)} still running 60 s after the reload")
            time.sleep(0.2)
        return nginx

    def reload_nginx(self) -> None:
        """The stack's nginx with the current pools (stable and canary replicas, the canary's weight)."""
        assert self.nginx is not None
        self._nginx("nginx", self.dir, self.proxy_port, self.http_port, self.rate_limit, self.rate_burst,
                    reload=self.nginx)  # fmt: skip
        self.write_targets(self.dir / "prometheus")

    # ---------------------------------------------------------------- canary, promote, roll back

    def set_canary(self, kind: str, tag: str, weight: int) -> None:
        """`weight` percent of `kind`'s requests to replicas serving `tag` (as many as the stable ones),
        started and ready first when none serve it yet; a canary of another tag is replaced."""
        render.split_servers([], [], weight)  # the weight's bounds, before anything starts
        if self.canary[kind] and self.canary_tags[kind] != tag:
            self.set_canary(kind, self.canary_tags[kind], 0)
            self._retire(kind)
        if not self.canary[kind]:
            self.canary[kind] = self._start_replicas(kind, tag, max(1, len(self.replicas[kind])), name=f"{kind}-canary")
            self.canary_tags[kind] = tag
        self.canary_weight[kind] = weight
        self.reload_nginx()

    def _retire(self, kind: str) -> None:
        """Stop the canary replicas (after a reload that left them out of the pool)."""
        old, self.canary[kind] = self.canary[kind], []
        self.canary_tags.pop(kind, None)
        self.canary_weight[kind] = 0
        self.reload_nginx()
        for server in old:
            stop_replica(server)

    def promote(self, kind: str) -> None:
        """Every request to the canary's replicas, which then become the stable ones; the old ones stop."""
        if not self.canary[kind]:
            raise RuntimeError(f"{kind}: no canary to promote")
        self.canary_weight[kind] = 100
        self.reload_nginx()
        old, self.replicas[kind], self.canary[kind] = self.replicas[kind], self.canary[kind], []
        self.previous[kind], self.tags[kind] = self.tags[kind], self.canary_tags.pop(kind)
        self.canary_weight[kind] = 0
        self.reload_nginx()
        for server in old:
            stop_replica(server)

    def rollback(self, kind: str) -> None:
        """Back to the previous version: a canary stops taking requests and stops; after a promotion,
        replicas of the tag it replaced start, take every request, and the promoted ones stop."""
        if self.canary[kind]:
            self.canary_weight[kind] = 0
            self._retire(kind)
        elif kind in self.previous:
            self.set_canary(kind, self.previous[kind], 100)
            self.promote(kind)
        else:
            raise RuntimeError(f"{kind}: no canary and no promotion to roll back")

    def set_env(self, kind: str, env: Mapping[str, str]) -> None:
        """Restart `kind`'s stable replicas with `env` on top (e.g. a shadow candidate): new ones start,
        take the pool, then the old ones stop."""
        new = self._start_replicas(kind, self.tags[kind], len(self.replicas[kind]), env=env)
        old, self.replicas[kind] = self.replicas[kind], new
        self.reload_nginx()
        for server in old:
            stop_replica(server)

    # ---------------------------------------------------------------- the release command's requests

    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    @property
    def request_file(self) -> Path:
        return self.dir / "release-request.json"

    def write_state(self, **extra) -> None:
        """stack.json: what `python -m deploy.release --target local --stack <dir>` reads (and waits on)."""
        models = {kind: {"tag": self.tags[kind], "replicas": self.addresses(kind), "previous": self.previous.get(kind),
                         "canary": {"tag": self.canary_tags.get(kind), "weight": self.canary_weight[kind],
                                    "replicas": [f"127.0.0.1:{s.port}" for s in self.canary[kind]]}}
                  for kind in self.replicas}  # fmt: skip
        state = {"pid": os.getpid(), "proxy_url": self.proxy_url, "prometheus_url": self.prometheus_url,
                 "models": models, **extra}  # fmt: skip
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def apply(self, step: str, kind: str, tag: str | None = None, weight: int = 0,
              env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """One release step (deploy/release.py says what each does)."""
        if step == "canary":
            self.set_canary(kind, str(tag), weight)
        elif step == "promote":
            self.promote(kind)
        elif step == "rollback":
            self.rollback(kind)
        elif step == "shadow":
            self.set_env(kind, env or {})
        else:
            raise ValueError(f"unknown release step {step!r}")

    def handle_request(self) -> bool:
        """Apply release-request.json when it holds a request not yet applied; stack.json then names it
        (`applied`) or says why it failed (`error`). The foreground stack calls this every second."""
        try:
            request = json.loads(self.request_file.read_text())
        except (OSError, ValueError):
            return False
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if request.get("id") in (state.get("applied"), state.get("failed")):
            return False
        try:
            self.apply(request["step"], request["kind"], request.get("tag"), int(request.get("weight", 0)),
                       request.get("env"))  # fmt: skip
        except Exception as exc:  # the stack keeps serving what it served; the command reports why
            self.write_state(failed=request.get("id"), error=f"{type(exc).__name__}: {exc}")
            return True
        self.write_state(applied=request.get("id"))
        return True

    def write_targets(self, prom_dir: Path) -> None:
        targets = prom_dir / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        for kind in self.replicas:
            addresses = [*self.addresses(kind), *(f"127.0.0.1:{s.port}" for s in self.canary[kind])]
            sd = [{"targets": addresses, "labels": {"service": kind}}]
            (targets / f"{kind}.json").write_text(json.dumps(sd))
        sd = [{"targets": [f"127.0.0.1:{self.prometheus_port}"], "labels": {"service": "prometheus"}}]
        (targets / "prometheus.json").write_text(json.dumps(sd))

    def _start_prometheus(self) -> None:
        prom_dir = self.dir / "prometheus"
        prom_dir.mkdir(parents=True, exist_ok=True)
        # rendered here, not copied: a model added in-process is scraped and selected too
        (prom_dir / "prometheus.yml").write_text(render.prometheus_text())
        shutil.copytree(render.RULES_DIR, prom_dir / "rules", dirs_exist_ok=True)
        (prom_dir / "rules" / render.RULES_YML.name).write_text(render.templated_text(render.RULES_TEMPLATE))
        self.write_targets(prom_dir)
        cmd = [_which("prometheus"), f"--config.file={prom_dir / 'prometheus.yml'}",
               f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
               "--storage.tsdb.retention.time=1d", "--log.level=warn"]  # fmt: skip
        self.prometheus = _spawn("prometheus", cmd, self.dir / "prometheus.log")
        if not _wait_http(self.prometheus_url + "/-/ready", self.prometheus.proc, 60):
            raise RuntimeError(f"prometheus did not start:\n{self.prometheus.log()[-3000:]}")

    # ---------------------------------------------------------------- stop

    def stop(self) -> None:
        """Stop everything this stack started, each by its own process group (idempotent)."""
        for p in (self.prometheus, self.nginx, *self.extra_proxies):
            if p is not None:
                p.stop()
        servers = self.all_replicas()
        if servers:
            with cf.ThreadPoolExecutor(len(servers)) as ex:
                list(ex.map(stop_replica, servers))

    def logs(self) -> str:
        parts = [f"--- {s.log_path.name}\n{s.log()[-1500:]}" for s in self.all_replicas()]
        parts += [f"--- {p.name}\n{p.log()[-1500:]}" for p in (self.nginx, self.prometheus) if p]
        return "\n".join(parts)

    def written_files(self) -> list[Path]:
        """Every file this stack wrote: logs (replicas, nginx access/error, Prometheus), rendered
        configs, BentoML homes; Prometheus' TSDB and the TLS material excluded."""
        skip = (self.dir / "prometheus" / "data", self.tls_dir)
        return sorted(p for p in self.dir.rglob("*")
                      if p.is_file() and not any(p.is_relative_to(d) for d in skip))  # fmt: skip


def _tag(text: str) -> tuple[str, str]:
    kind, sep, tag = text.partition("=")
    if not sep or kind not in SERVED_MODELS or not tag:
        raise argparse.ArgumentTypeError(f"{text!r}: use KIND=TAG with KIND one of {', '.join(SERVED_MODELS)}")
    return kind, tag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", type=_tag, action="append", default=[], metavar="KIND=TAG",
                    help="model-store tag of one served model (repeat per model); default: its settings' "
                         "model_tag (<env prefix>MODEL_TAG or the default)")  # fmt: skip
    ap.add_argument("--image-tag", default=None, help="the same as --tag image=TAG")
    ap.add_argument("--text-tag", default=None, help="the same as --tag text=TAG")
    ap.add_argument("--replicas", type=int, default=2, help="replicas per served model")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--rate-limit", default=render.RATE_LIMIT, help="per API key, nginx syntax (e.g. 50r/s)")
    ap.add_argument("--rate-burst", type=int, default=render.RATE_BURST, help="requests above the rate at once")
    ap.add_argument("--explain-rate-limit", default=render.EXPLAIN_RATE_LIMIT, help="per API key, explain routes")
    ap.add_argument("--explain-rate-burst", type=int, default=render.EXPLAIN_RATE_BURST,
                    help="explanations above the explain rate at once")  # fmt: skip
    ap.add_argument("--tls-dir", type=Path, default=None,
                    help="server.crt, server.key, ca.pem (default: a self-signed set made in the workdir)")  # fmt: skip
    args = ap.parse_args(argv)
    from servable.config import parse_api_keys

    # parse_api_keys maps key -> name; the stack takes name -> key.
    keys = {name: key for key, name in parse_api_keys(os.environ.get("SERVABLE_AUTH_KEYS", "")).items()}
    keys = keys or {"local": secrets.token_urlsafe(18)}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="servable-stack-"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    models = " + ".join(f"{args.replicas}x {kind}" for kind in SERVED_MODELS)
    print(f"starting {models} replicas, nginx, Prometheus in {workdir} ...", flush=True)
    try:
        with LocalStack(workdir, args.image_tag, args.text_tag, keys, args.replicas, rate_limit=args.rate_limit,
                        rate_burst=args.rate_burst, tls_dir=args.tls_dir, tags=dict(args.tag),
                        explain_rate_limit=args.explain_rate_limit,
                        explain_rate_burst=args.explain_rate_burst) as stack:  # fmt: skip
            key = next(iter(keys.values()))
            routes = ", ".join(f"{stack.proxy_url}{e.route}" for e in SERVED_MODELS.values())
            print(f"proxy:      {stack.proxy_url}   (API key: {key}; CA: {stack.ca_file})\n"
                  f"            {stack.http_url} redirects to it\n"
                  f"models:     {', '.join(f'{k}={t}' for k, t in stack.tags.items())}\n"
                  f"routes:     {routes}\n"
                  f"prometheus: {stack.prometheus_url}\n"
                  f"try:        curl -s --cacert {stack.ca_file} -H 'x-api-key: {key}' <route> ...\n"
                  f"release:    python -m deploy.release canary|promote|rollback ... --target local --stack {workdir}\n"
                  "Ctrl-C stops everything.", flush=True)  # fmt: skip
            while all(s.proc.poll() is None for s in stack.all_replicas()):
                stack.handle_request()  # python -m deploy.release --target local --stack <workdir>
                time.sleep(1)
            print("a replica exited; stopping the stack", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
