"""The compose topology on 127.0.0.1 without Docker: replicas, nginx in front, Prometheus.

Two replicas of each service (`bentoml serve`, each in its own process group), nginx (Debian)
rendering the same `deploy/nginx/servable.conf.template` as compose, and Prometheus (Debian)
with the same `deploy/prometheus/prometheus.yml` and rules, its file_sd targets pointing at the
replicas' 127.0.0.1 ports. Everything listens on 127.0.0.1 only, every wait is bounded, and
`stop()` ends each process it started by its own process group, also when a test failed.

    python -m deploy.local_stack --image-tag fashion-cnn:latest --text-tag sentiment-bert:latest
    (or `make stack`): runs in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import render
from serving import launch

PREFIX = {"image": "SERVABLE_IMAGE_SERVE_", "text": "SERVABLE_TEXT_SERVE_"}


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


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc). BentoML's workers call setsid: they are in their own
    process groups, so killing a replica's group alone would leave them serving as orphans."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_replica(server: launch.Server, crash: bool = False) -> None:
    """Stop one replica and every worker it started; `crash=True` kills it all at once (SIGKILL)."""
    tree = descendants(server.proc.pid)
    if crash:
        _kill_all([server.proc.pid, *tree])
        server.proc.wait(timeout=30)
    else:
        server.stop()
    _kill_all([pid for pid in tree if Path(f"/proc/{pid}").exists()])  # workers left behind


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if launch.get(url, timeout=2)[0] == 200:
            return True
        time.sleep(0.3)
    return False


NGINX_MAIN = """# Local-stack wrapper around the shared servable.conf (compose: the nginx image's own nginx.conf).
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/servable.conf;
}}
"""


class LocalStack:
    def __init__(self, workdir: Path, image_tag: str, text_tag: str, api_keys: dict[str, str],
                 replicas: int = 2, extra_env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.dir = Path(workdir)
        self.tags = {"image": image_tag, "text": text_tag}
        self.api_keys = api_keys
        self.n = replicas
        self.extra_env = extra_env or {}
        self.replicas: dict[str, list[launch.Server]] = {"image": [], "text": []}
        self.nginx: Proc | None = None
        self.prometheus: Proc | None = None
        self.proxy_port = launch.free_port()
        self.prometheus_port = launch.free_port()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

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
        keys_file = self.dir / "api_keys"
        keys_file.write_text("".join(f"{n}:{k}\n" for n, k in self.api_keys.items()))
        keys_file.chmod(0o600)
        # All replicas start at once (on 2 cores they take most of the start-up time) ...
        for kind in ("image", "text"):
            p = PREFIX[kind]
            env = {f"{p}MODEL_TAG": self.tags[kind], f"{p}INTRA_OP_THREADS": "1", "SERVABLE_AUTH_KEYS": "",
                   "SERVABLE_AUTH_KEYS_FILE": str(keys_file), **self.extra_env}  # fmt: skip
            for i in range(self.n):
                name = f"{kind}-{i + 1}"
                home = self._replica_home(name)
                self.replicas[kind].append(launch.start(launch.SERVICES[kind], {**env, "BENTOML_HOME": str(home)},
                                                        log_path=self.dir / f"{name}.log"))  # fmt: skip
        # ... and the proxy starts only once all of them are ready (compose: service_healthy).
        deadline = time.monotonic() + timeout_s
        for server in self.all_replicas():
            if not launch.wait_until(server, timeout_s=max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"replica {server.url} not ready in {timeout_s:.0f}s:\n{server.log()[-3000:]}")
        self._start_nginx()
        self._start_prometheus()

    def _replica_home(self, name: str) -> Path:
        """Each replica its own BENTOML_HOME, as in a container: `bentoml serve` wipes and fills
        BENTOML_HOME/prometheus_multiproc_dir, so replicas sharing one would mix (and erase) each
        other's metrics. The model store itself is shared read-only through a symlink."""
        store = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")).expanduser() / "models"
        home = self.dir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "models").exists():
            (home / "models").symlink_to(store.resolve(), target_is_directory=True)
        return home

    def all_replicas(self) -> list[launch.Server]:
        return self.replicas["image"] + self.replicas["text"]

    def addresses(self, kind: str) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.replicas[kind]]

    def _start_nginx(self) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        values = render.nginx_values(self.addresses("image"), self.addresses("text"), "127.0.0.1",
                                     self.proxy_port, str(self.dir / "nginx-access.log"))  # fmt: skip
        (self.dir / "servable.conf").write_text(render.render_template(render.NGINX_TEMPLATE.read_text(), values))
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(NGINX_MAIN.format(dir=self.dir, user=user))
        nginx = _which("nginx")
        check = subprocess.run([nginx, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                               capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.nginx = _spawn("nginx", [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                            self.dir / "nginx.out", signal.SIGQUIT)  # fmt: skip
        if not _wait_http(self.proxy_url + "/healthz", self.nginx.proc, 30):
            errors = (self.dir / "nginx-error.log").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start:\n{self.nginx.log()}\n{errors}")

    def write_targets(self, prom_dir: Path) -> None:
        targets = prom_dir / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        for kind in ("image", "text"):
            sd = [{"targets": self.addresses(kind), "labels": {"service": kind}}]
            (targets / f"{kind}.json").write_text(json.dumps(sd))
        sd = [{"targets": [f"127.0.0.1:{self.prometheus_port}"], "labels": {"service": "prometheus"}}]
        (targets / "prometheus.json").write_text(json.dumps(sd))

    def _start_prometheus(self) -> None:
        prom_dir = self.dir / "prometheus"
        prom_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(render.PROMETHEUS_YML, prom_dir / "prometheus.yml")
        shutil.copytree(render.RULES_DIR, prom_dir / "rules", dirs_exist_ok=True)
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
        for p in (self.prometheus, self.nginx):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-tag", default="fashion-cnn:latest")
    ap.add_argument("--text-tag", default="sentiment-bert:latest")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    from serving.auth import parse_keys

    # parse_keys maps key -> name; the stack takes name -> key.
    keys = {name: key for key, name in parse_keys(os.environ.get("SERVABLE_AUTH_KEYS", "")).items()}
    keys = keys or {"local": secrets.token_urlsafe(18)}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="servable-stack-"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"starting {args.replicas}x image + {args.replicas}x text replicas, nginx, Prometheus in {workdir} ...",
          flush=True)  # fmt: skip
    try:
        with LocalStack(workdir, args.image_tag, args.text_tag, keys, args.replicas) as stack:
            key = next(iter(keys.values()))
            print(f"proxy:      {stack.proxy_url}   (API key: {key})\n"
                  f"prometheus: {stack.prometheus_url}\n"
                  f"try:        curl -s -H 'x-api-key: {key}' -H 'content-type: application/json' "
                  f"-d '{{\"text\": \"A fine film\"}}' {stack.proxy_url}/sentiment\n"
                  "Ctrl-C stops everything.", flush=True)  # fmt: skip
            while all(s.proc.poll() is None for s in stack.all_replicas()):
                time.sleep(1)
            print("a replica exited; stopping the stack", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
