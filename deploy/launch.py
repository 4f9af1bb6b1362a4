"""Start, probe and stop BentoML servers on 127.0.0.1: used by tests, `make serve` and the main job.

It starts the services from outside, as the local stack does, so it sits in deploy/ rather than in the
serving package (nor is it in the serving image).

Every server runs in its own process group and is stopped by that id (SIGTERM for a graceful
drain, SIGKILL after a bound). Waits are bounded loops that give up by themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servable.config import SERVED_MODELS

SERVICES = {kind: e.service for kind, e in SERVED_MODELS.items()}
DEFAULT_PORTS = {kind: e.port for kind, e in SERVED_MODELS.items()}


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range, not handed out before by this process.

    A port the kernel picks for bind(0) comes from the ephemeral range, which outgoing connections use
    too: between this check and the server's own bind, a client socket could take it (CI once failed
    so, "Address already in use"). Below that range only listeners take ports.
    """
    low = _ephemeral_low()
    top = low - 1 if low > 11024 else 65535
    for _ in range(200):
        port = secrets.randbelow(top - 10000 + 1) + 10000
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_or_free(port: int) -> int:
    """`port` when nothing listens on it, else any free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


@dataclass
class Server:
    target: str
    port: int
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 15.0, crash: bool = False) -> None:
        """SIGTERM (a graceful drain) to the server's group, SIGKILL after `grace_s`; `crash=True` kills at once.

        BentoML's workers call setsid, so they sit outside the group: they are found first and
        killed last if the arbiter left any behind, so no orphan keeps serving on the port.
        """
        if self.proc.poll() is not None:
            return
        tree = descendants(self.proc.pid)
        try:
            if crash:
                kill_all([self.proc.pid, *tree])
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        kill_all([pid for pid in tree if Path(f"/proc/{pid}").exists()])


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc."""
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


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def private_home(home: Path, env: dict[str, str]) -> Path:
    """A BENTOML_HOME of the server's own whose `models` is the shared store (a symlink).

    `bentoml serve` wipes and fills BENTOML_HOME/prometheus_multiproc_dir, so two servers sharing
    one home would mix and erase each other's metrics (a container has its own home anyway).
    """
    store = Path(env.get("BENTOML_HOME", Path.home() / "bentoml")).expanduser() / "models"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(store.resolve(), target_is_directory=True)
    return home


def start(target: str, env: dict[str, str] | None = None, port: int | None = None,
          log_path: Path | None = None, cwd: Path | None = None) -> Server:  # fmt: skip
    port = port or free_port()
    log_path = log_path or Path(f"/tmp/servable-{target.split(':')[-1]}-{port}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    full_env["BENTOML_HOME"] = str(private_home(log_path.parent / f"bentoml-home-{port}", full_env))
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)  # fmt: skip
    return Server(target, port, log_path, proc)


def get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_until(server: Server, path: str = "/readyz", status: int = 200, timeout_s: float = 120.0) -> bool:
    """Poll until `path` answers `status`; False on timeout or if the server process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        if get(server.url + path, timeout=2)[0] == status:
            return True
        time.sleep(0.5)
    return False


def start_ready(target: str, env: dict[str, str] | None = None, timeout_s: float = 180.0, **kw) -> Server:
    server = start(target, env, **kw)
    if not wait_until(server, timeout_s=timeout_s):
        server.stop()
        raise RuntimeError(f"{target} did not become ready in {timeout_s:.0f}s; log:\n{server.log()[-3000:]}")
    return server


def _demo_key() -> str:
    from servable.config import AuthSettings, parse_api_keys

    keys = parse_api_keys(AuthSettings().keys)
    return next(iter(keys), "")


def demo_image(path: Path) -> Path:
    """The first Fashion-MNIST test image (an ankle boot) as a PNG a client would upload."""
    from PIL import Image

    from servable.config import FASHION_MNIST_DIR
    from servable.idx import read_idx

    pixels = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((112, 112)).save(path)
    return path


def demo_calls(img: str, txt: str, key: str, sample: Path) -> list[tuple[str, Callable[[object], bool]]]:
    """The README's calls (curl command lines) and, for each, what its answer must be to count as success."""
    from pydantic import BaseModel, ValidationError

    from serving import schemas

    def answers(model: type[BaseModel], n: int) -> Callable[[object], bool]:
        def check(body: object) -> bool:
            try:
                return len(model.model_validate(body).predictions) == n
            except ValidationError:
                return False

        return check

    return [
        (f"curl -s -H 'x-api-key: {key}' -F image=@{sample} {img}/classify", answers(schemas.ClassifyResponse, 1)),
        (f"curl -s -H 'x-api-key: {key}' -H 'content-type: application/json' "
         f'-d \'{{"texts": ["A gorgeous, witty film.", "Dull and far too long."]}}\' {txt}/sentiment',
         answers(schemas.SentimentResponse, 2)),
        (f"curl -s {txt}/v2/health/ready", lambda body: body == {"ready": True}),
    ]  # fmt: skip


def run_call(cmd: str, check: Callable[[object], bool]) -> tuple[bool, str]:
    """Run one demo call; success only for HTTP 200 with the expected answer (a 401 or 503 body is JSON too)."""
    done = subprocess.run(cmd + " -w '\\n%{http_code}'", shell=True, capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    out, _, status = done.stdout.rpartition("\n")
    try:
        body = json.loads(out)
    except ValueError:
        return False, f"(HTTP {status or '-'}, no JSON answer: {out[:200]!r})"
    shown = json.dumps(body, indent=1)[:700]
    if status != "200" or not check(body):
        return False, f"(HTTP {status}, not the expected answer)\n{shown}"
    return True, shown


def demo() -> int:
    """The main job's last step: serve both models, call them as the README shows, stop."""
    key, env = _demo_key(), {}
    if not key:  # no key configured: the demo's servers get a one-off key of their own
        key = secrets.token_urlsafe(16)
        env = {"SERVABLE_AUTH_KEYS": f"demo:{key}"}
    servers, failed = {}, False
    try:
        for kind, target in SERVICES.items():
            print(f"starting {target} ...", flush=True)
            # The ports `make serve` uses, so the printed calls work again there.
            servers[kind] = start_ready(target, env, port=port_or_free(DEFAULT_PORTS[kind]))
        sample = demo_image(Path("runs/demo/ankle-boot.png"))
        for cmd, check in demo_calls(servers["image"].url, servers["text"].url, key, sample):
            ok, shown = run_call(cmd, check)
            failed |= not ok
            print(f"\n$ {cmd}\n{shown}")
        print("\nServe them yourself: make serve  (image on :3000, sentiment on :3001, key from SERVABLE_AUTH_KEYS);"
              " API docs at http://127.0.0.1:3000/docs and :3001/docs")  # fmt: skip
        return 1 if failed else 0
    finally:
        for s in servers.values():
            s.stop()


def serve_forever() -> int:
    servers: list[Server] = []
    try:
        for kind, port in DEFAULT_PORTS.items():
            servers.append(start_ready(SERVICES[kind], port=port))
        docs = "  ".join(f"{kind}: {s.url}/docs" for kind, s in zip(DEFAULT_PORTS, servers, strict=True))
        print(f"{docs}  (Ctrl-C stops them)", flush=True)
        while all(s.proc.poll() is None for s in servers):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(demo() if "--demo" in sys.argv else serve_forever())
