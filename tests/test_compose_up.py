"""Opt-in, not CI: deploy/compose.yaml's stack started for real with a container engine, from the host.

    make compose-up-test        (SERVABLE_COMPOSE_TEST=1 .venv/bin/pytest -q -s tests/test_compose_up.py)

The engine is podman through its Docker-compatible API (`podman system service`), driven by Debian's
docker-compose 1.29: the same compose client code path a Docker user's `docker-compose` takes, and the
files as compose reads them (podman-compose translates a compose file into podman commands of its own,
which would test that translation instead). Images: deploy/podman/images.sh builds the replica image
from deploy/Dockerfile and nginx, Prometheus and Alertmanager from Debian's packages (no registry is
reachable); deploy/podman/compose.debian-images.yaml maps the services to them and changes nothing else.
Grafana is not packaged by Debian and is left out. Health checks: podman schedules them with systemd
timers, absent here, so a loop here runs `podman healthcheck run` for each container, as the engine's
timer would; `depends_on: condition: service_healthy` then gates the start as written.

The stack runs from a copy of deploy/ (its own secrets, certificate and key rotation) and a copy of the
model store holding a second version of each model for the roll-out. Traffic goes to 127.0.0.1 and to
the containers' own addresses only: the network isolation is checked by inspecting the engine's
networks and the containers' routes. Alertmanager gets a silence for every alert before Prometheus
starts, so an alert reaches it and shows there, and nothing is sent to the pager or the chat.

Needs root, podman, runc, iptables, mmdebstrap, docker-compose (`make compose-up-test` installs them),
Debian's mirror and PyPI for the image builds, Debian's chromium, and a model store with both models
(SERVABLE_COMPOSE_MODEL_STORE, default ~/bentoml/models as `make all` leaves it). Writes its figures to
SERVABLE_COMPOSE_REPORT when set (docs/results/compose-up.json); docs/deploy.md records a run, and
docs/releasing.md a run of the release test (docs/results/compose-release.json).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from deploy import render
from deploy.launch import free_port
from servable.config import SERVED_MODELS
from servable.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "servable-compose-test"
FILES = ["-f", "deploy/compose.yaml", "-f", "deploy/podman/compose.debian-images.yaml"]
NOT_RUN = {"grafana"}  # not packaged by Debian (docs/deploy.md)
REPLICAS = [r for kind in SERVED_MODELS for r in render.compose_replicas(kind)]
IMAGES = {"servable": render.PODMAN_SERVABLE_IMAGE, **{s: f"localhost/servable-{s}:debian"
          for s in ("nginx", "prometheus", "alertmanager")}}  # fmt: skip
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"

pytestmark = pytest.mark.skipif(
    os.environ.get("SERVABLE_COMPOSE_TEST") != "1", reason="opt-in: SERVABLE_COMPOSE_TEST=1 runs the compose stack"
)


def sh(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def png(side: int = 56) -> bytes:
    from PIL import Image

    img = Image.new("L", (side, side))
    img.putdata(
        [(x * 7 + y * 3) % 256 if side // 4 < x < 3 * side // 4 else 0 for y in range(side) for x in range(side)]
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Stack:
    """The compose project, its engine and the health-check loop; figures collected on the way."""

    def __init__(self, work: Path):
        self.work, self.repo, self.store = work, work / "repo", work / "models"
        self.sock = work / "podman.sock"
        self.ports = {"https": free_port(), "prometheus": free_port(), "alertmanager": free_port(),
                      "grafana": free_port()}  # fmt: skip
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "DOCKER_HOST": f"unix://{self.sock}",
                    "COMPOSE_PROJECT_NAME": PROJECT, "SERVABLE_MODEL_STORE": str(self.store),
                    "SERVABLE_HTTPS_PORT": str(self.ports["https"]),
                    "SERVABLE_PROMETHEUS_PORT": str(self.ports["prometheus"]),
                    "SERVABLE_ALERTMANAGER_PORT": str(self.ports["alertmanager"]),
                    "SERVABLE_GRAFANA_PORT": str(self.ports["grafana"])}  # fmt: skip
        for entry in SERVED_MODELS.values():  # the defaults, whatever the caller's shell has set
            self.env.pop(f"{entry.env_prefix}MODEL_TAG", None)
        self.report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": describe_machine(),
                             "load_average_1m": round(os.getloadavg()[0], 1), "durations_s": {}}  # fmt: skip
        self.service: subprocess.Popen | None = None
        self.left_after_down: dict[str, list[str]] | None = None
        self.stop_health = threading.Event()
        self.first_healthy: dict[str, float] = {}  # container id -> when its health check first passed
        self.health_thread: threading.Thread | None = None
        self.key = ""
        self.files = list(FILES)
        # nginx asks for 65536 open files (compose.yaml). Where this machine's hard limit is lower and
        # cannot be raised (no CAP_SYS_RESOURCE, as in some sandboxes), runc refuses to start it; and a
        # container with ulimits of its own gets none of containers.conf's defaults, so podman's own
        # process limit fails the same way. Both are lowered to what runs here (nofile: the machine's
        # hard limit; nproc: containers.conf's 1024), and the report says so.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if nofile != resource.RLIM_INFINITY and nofile < 65536:
            lowered = work / "compose.host-limits.yaml"
            lowered.write_text(f"services:\n  nginx:\n    ulimits:\n      nofile: {{soft: {nofile}, hard: {nofile}}}\n"
                               "      nproc: {soft: 1024, hard: 1024}\n")  # fmt: skip
            self.files += ["-f", str(lowered)]
            self.report["nginx_ulimits_lowered_to"] = {"nofile": nofile, "nproc": 1024}
        self.tags: dict[str, tuple[str, str]] = {}  # kind -> (tag served first, the new tag)

    # ------------------------------------------------------------ engine and compose
    def compose(self, *args: str, timeout: float = 900, check: bool = True, env: dict | None = None):
        return sh(["docker-compose", *self.files, *args], timeout=timeout, check=check, cwd=self.repo,
                  env={**self.env, **(env or {})})  # fmt: skip

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return sh(["podman", *args], check=check, timeout=timeout, env=self.env)

    def start_engine(self) -> None:
        with open(self.work / "podman-service.log", "w") as log:
            self.service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{self.sock}"],
                                            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL,
                                            stderr=log)  # fmt: skip
        for _ in range(60):
            if self.sock.exists() and self.compose("ps", check=False, timeout=30).returncode == 0:
                return
            time.sleep(1)
        raise AssertionError("podman system service did not answer")

    def containers(self) -> dict[str, str]:
        """service name -> container id of this project's running containers."""
        out = self.podman("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--format", '{{.ID}} {{index .Labels "com.docker.compose.service"}}').stdout  # fmt: skip
        return {svc: cid for cid, svc in (line.split() for line in out.splitlines() if line.strip())}

    def _health_loop(self) -> None:
        while not self.stop_health.is_set():
            try:
                for cid in self.containers().values():
                    r = subprocess.run(["podman", "healthcheck", "run", cid], capture_output=True, env=self.env,
                                       timeout=30, check=False)  # fmt: skip
                    if r.returncode == 0:
                        self.first_healthy.setdefault(cid, time.time())
            except (subprocess.SubprocessError, AssertionError):
                pass
            self.stop_health.wait(2)

    def start_health_loop(self) -> None:
        self.health_thread = threading.Thread(target=self._health_loop, daemon=True)
        self.health_thread.start()

    def inspect(self, cid: str) -> dict:
        return json.loads(self.podman("inspect", cid).stdout)[0]

    def health(self, service: str) -> str:
        """The service's health as the engine reports it; "absent" while it has no running container."""
        cid = self.containers().get(service)
        if cid is None:
            return "absent"
        state = self.inspect(cid)["State"]
        return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")

    def wait_healthy(self, services: list[str], timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.health(s) == "healthy" for s in services):
                return
            time.sleep(2)
        states = {s: self.health(s) for s in services}
        raise AssertionError(f"not healthy after {timeout} s: {states}")

    def ready_time(self, service: str) -> float:
        """Seconds from the container's start to its first passing health check (the loop runs every 2 s)."""
        cid = self.containers()[service]
        started = self.inspect(cid)["State"]["StartedAt"]
        # podman writes nanoseconds and a zone: keep microseconds for fromisoformat
        head, _, rest = started.partition(".")
        frac = "".join(c for c in rest if c.isdigit())[:6]
        zone = rest[len("".join(c for c in rest if c.isdigit() or c == " ")) :].strip().split(" ")[0]
        t0 = datetime.fromisoformat(f"{head}.{frac}{zone}").timestamp()
        return round(self.first_healthy[next(k for k in self.first_healthy if cid.startswith(k) or k.startswith(cid))]
                     - t0, 1)  # fmt: skip

    # ------------------------------------------------------------ HTTP through nginx (TLS, the project's CA)
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['https']}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=str(self.repo / "deploy" / "tls" / "local" / "ca.pem"),
                            timeout=60)  # fmt: skip

    def prometheus(self, query: str) -> list[dict]:
        r = httpx.get(f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query", params={"query": query}, timeout=10)
        return r.json()["data"]["result"]

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each replica container (the engine's cgroup figure), MiB."""
        ids = self.containers()
        out = self.podman("stats", "--no-stream", "--format", "json", *[ids[r] for r in REPLICAS]).stdout
        by_id = {s["id"][:12]: s for s in json.loads(out)}
        result = {}
        for r in REPLICAS:
            usage = by_id[ids[r][:12]]["mem_usage"].split("/")[0].strip()  # e.g. "312.4MB"
            num = float("".join(c for c in usage if c.isdigit() or c == "."))
            unit = usage.lstrip("0123456789.").strip().upper()
            scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}[unit]
            result[r] = round(num * scale / 1024**2, 1)
        return result

    # ------------------------------------------------------------ teardown
    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={PROJECT}"
        networks = self.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        volumes = self.podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
        return {"containers": self.podman("ps", "-aq", "--filter", label).stdout.split(),
                "networks": [n for n in networks if n.startswith(PROJECT)],
                "volumes": [v for v in volumes if v.startswith(PROJECT)]}  # fmt: skip

    def down(self) -> None:
        """compose down (what it leaves is recorded: test_teardown_leaves_nothing), then whatever is left
        removed by hand and the engine stopped, so a failed run leaves nothing either."""
        if self.service is not None and self.service.poll() is None:
            out = self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)
            (self.work / "compose-down.txt").write_text(out.stdout + out.stderr)
            self.left_after_down = self.leftovers()
        self.stop_health.set()
        if self.health_thread is not None:
            self.health_thread.join(timeout=60)
        if self.service is not None and self.service.poll() is None:
            os.killpg(self.service.pid, signal.SIGTERM)  # the service process this test started, by its id
            try:
                self.service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, signal.SIGKILL)
                self.service.wait(timeout=10)
        self.sock.unlink(missing_ok=True)
        left = self.leftovers()
        for cid in left["containers"]:
            self.podman("rm", "-f", "-t", "5", cid, check=False)
        for kind in ("network", "volume"):
            for name in left[f"{kind}s"]:
                self.podman(kind, "rm", "-f", name, check=False)


def _copy_deploy(dst: Path) -> None:
    """deploy/ as a fresh clone has it: no secrets, certificate or .env of this checkout's own."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).relative_to(ROOT / "deploy")
        drop = {".env", "__pycache__"}
        if here == Path("secrets"):
            drop |= {n for n in names if not n.endswith(".example")}
        if here == Path("tls"):
            drop.add("local")
        if here == Path("model-store"):
            drop |= {n for n in names if n.endswith(".bentomodel")}
        return drop & set(names)

    shutil.copytree(ROOT / "deploy", dst / "deploy", ignore=ignore)


def _store_with_new_versions(src: Path, dst: Path) -> dict[str, tuple[str, str]]:
    """A copy of the model store with a second version of each served model's default tag (the same
    files under a new version, in the store's entry and in the artifact's manifest, whose checksum the
    entry carries: what `make all` registers after retraining), readable by uid 10001. The replicas
    label their metrics with the manifest's version (a release's checks select on it)."""
    from servable.artifact import MANIFEST, sha256_file

    shutil.copytree(src, dst)
    new_version = datetime.now(UTC).strftime("v%Y%m%d-%H%M%S")
    tags = {}
    for kind, entry in SERVED_MODELS.items():
        name, version = str(entry.settings.model_fields["model_tag"].default).split(":")
        if version == "latest":
            version = (dst / name / "latest").read_text().strip()
        shutil.copytree(dst / name / version, dst / name / new_version)
        manifest = dst / name / new_version / MANIFEST
        old_sha = sha256_file(manifest)
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": new_version}, indent=2))
        spec = dst / name / new_version / "model.yaml"
        text = spec.read_text().replace(f"version: {version}\n", f"version: {new_version}\n", 1)
        spec.write_text(text.replace(f"manifest_sha256: {old_sha}", f"manifest_sha256: {sha256_file(manifest)}", 1))
        tags[kind] = (f"{name}:{version}", f"{name}:{new_version}")
    sh(["chmod", "-R", "o+rX", str(dst)])
    return tags


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = Path(os.environ.get("SERVABLE_COMPOSE_WORK") or tmp_path_factory.mktemp("compose-up"))
    work.mkdir(parents=True, exist_ok=True)
    s = Stack(work)
    t0 = time.time()
    # 1. the images
    out = sh([str(ROOT / "deploy" / "podman" / "images.sh")], timeout=3600, env={**s.env, "WORK": str(work)})
    print(out.stdout)
    s.report["durations_s"]["images"] = round(time.time() - t0, 1)
    # 2. a fresh deploy/ prepared as a user prepares it, and the model store
    _copy_deploy(s.repo)
    store = Path(os.environ.get("SERVABLE_COMPOSE_MODEL_STORE", Path.home() / "bentoml" / "models"))
    s.tags = _store_with_new_versions(store, s.store)
    prep = sh([str(s.repo / "deploy" / "compose_prep.sh")], env=s.env)
    s.key = next(line.split(":", 1)[1] for line in (s.repo / "deploy/secrets/api/api_keys").read_text().splitlines()
                 if line and not line.startswith("#"))  # fmt: skip
    assert "ready:" in prep.stdout, prep.stdout
    # 3. the engine, the health loop, Alertmanager silenced before anything can alert, then the rest
    t1 = time.time()
    s.start_engine()
    try:
        s.start_health_loop()
        s.compose("up", "-d", "--no-build", "alertmanager")
        am = f"http://127.0.0.1:{s.ports['alertmanager']}"
        for _ in range(60):
            try:
                if httpx.get(f"{am}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        now = datetime.now(UTC)
        silence = {"matchers": [{"name": "alertname", "value": ".+", "isRegex": True, "isEqual": True}],
                   "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=2)).isoformat(),
                   "createdBy": "tests/test_compose_up.py", "comment": "a test stack: deliver nothing"}  # fmt: skip
        httpx.post(f"{am}/api/v2/silences", json=silence, timeout=10).raise_for_status()
        services = [n for n in s.compose("config", "--services").stdout.split() if n not in NOT_RUN]
        s.compose("up", "-d", "--no-build", *services)  # returns once the replicas are healthy and the rest started
        s.wait_healthy(services)
        s.report["durations_s"]["up_to_healthy"] = round(time.time() - t1, 1)
        s.report["services"] = services
        yield s
    finally:
        if s.service is not None and s.service.poll() is None:  # every container's log, for a failure's reader
            logs = s.compose("logs", "--no-color", "--tail", "200", check=False, timeout=120)
            (work / "compose-logs.txt").write_text(logs.stdout + logs.stderr)
        s.down()
        s.report["durations_s"]["total"] = round(time.time() - t0, 1)
        print(json.dumps(s.report, indent=1))
        if path := os.environ.get("SERVABLE_COMPOSE_REPORT"):
            Path(path).write_text(json.dumps(s.report, indent=1) + "\n")


# ---------------------------------------------------------------- the checks, in the walkthrough's order


def test_every_service_is_up_and_healthy(stack):
    running = stack.containers()
    assert set(stack.report["services"]) <= set(running)
    for replica in REPLICAS:
        info = stack.inspect(running[replica])
        assert info["Config"]["User"] == "10001:10001" and info["HostConfig"]["ReadonlyRootfs"] is True, replica
    stack.report["replica_start_to_ready_s"] = {r: stack.ready_time(r) for r in REPLICAS}


def test_both_endpoints_and_the_v2_routes_answer_through_nginx_over_tls(stack):
    with stack.client() as c:
        key = {"x-api-key": stack.key}
        r = c.post("/classify", files={"image": ("probe.png", png(), "image/png")}, headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == stack.tags["image"][0] and r.json()["predictions"][0]["label"]
        r = c.post("/sentiment", json={"texts": ["A gorgeous, witty film.", "Dull and far too long."]}, headers=key)
        assert r.status_code == 200, r.text
        labels = [p["label"] for p in r.json()["predictions"]]
        assert len(labels) == 2, r.json()
        image_name, text_name = (stack.tags[k][0].split(":")[0] for k in ("image", "text"))
        v2 = c.post(
            f"/image/v2/models/{image_name}/infer",
            headers=key,
            json={
                "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png()).decode()]}
                ]
            },
        )
        assert v2.status_code == 200 and v2.json()["model_name"] == image_name, v2.text
        v2 = c.post(
            f"/text/v2/models/{text_name}/infer",
            headers=key,
            json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["Wonderful.", "Awful."]}]},
        )
        assert v2.status_code == 200 and v2.json()["model_name"] == text_name, v2.text
        assert c.get("/text/v2/health/ready").status_code == 200
        # no key: refused by the replica, through the proxy
        assert c.post("/sentiment", json={"texts": ["x"]}).status_code == 401
        assert c.post("/sentiment", json={"texts": ["x"]}, headers={"x-api-key": "not-a-key"}).status_code == 401
    # the plain port (8080) is not published: one port for the API, HTTPS
    ports = stack.inspect(stack.containers()["nginx"])["NetworkSettings"]["Ports"]
    published = {p: v for p, v in ports.items() if v}
    assert list(published) == ["8443/tcp"], ports
    assert published["8443/tcp"][0]["HostIp"] == "127.0.0.1"


def test_the_playground_loads_under_its_csp(stack):
    from playwright.sync_api import sync_playwright

    from serving.playground import CSP
    from tests.test_playground import CHROMIUM, _open, check_image_page, check_text_page

    with stack.client() as c:
        r = c.get("/image/playground")
    assert r.status_code == 200 and CSP in r.headers["content-security-policy"]
    image = png(84)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page, problems = _open(browser, stack.url + "/image/playground", ignore_https_errors=True)
            check_image_page(page, image, (84, 84), key=stack.key)
            assert problems == []
            page, problems = _open(browser, stack.url + "/text/playground", ignore_https_errors=True)
            check_text_page(page, "Dull, predictable and far too long.", key=stack.key)
            assert problems == []
        finally:
            browser.close()


def test_replicas_are_reached_only_through_nginx_and_the_backend_network_is_internal(stack):
    """By inspection (the engine's networks, the containers' ports and routes), never by sending anything
    out: no replica port is published, the backend network is internal and a replica has no default
    route. The host itself shares a bridge with every network of its engine, internal or not (so does
    Docker's): whether it reaches a replica's own address is recorded, not asserted."""
    backend = json.loads(stack.podman("network", "inspect", f"{PROJECT}_backend").stdout)[0]
    frontend = json.loads(stack.podman("network", "inspect", f"{PROJECT}_frontend").stdout)[0]
    assert backend["internal"] is True and frontend["internal"] is False
    running = stack.containers()
    reached = {}
    for replica in REPLICAS:
        info = stack.inspect(running[replica])
        assert not any(info["NetworkSettings"]["Ports"].values()), replica  # nothing published
        assert list(info["NetworkSettings"]["Networks"]) == [f"{PROJECT}_backend"], replica
        # no default route inside: /proc/net/route has no 00000000 destination
        routes = stack.podman("exec", running[replica], "cat", "/proc/net/route").stdout.splitlines()[1:]
        assert routes and not [r for r in routes if r.split()[1] == "00000000"], routes
        address = info["NetworkSettings"]["Networks"][f"{PROJECT}_backend"]["IPAddress"]
        try:
            socket.create_connection((address, 3000), timeout=3).close()
            reached[replica] = True
        except OSError:
            reached[replica] = False
    stack.report["host_reaches_replica_address"] = reached
    # nginx and Prometheus bridge the two networks; the replicas are on the internal one only
    for name in ("nginx", "prometheus"):
        nets = stack.inspect(running[name])["NetworkSettings"]["Networks"]
        assert set(nets) == {f"{PROJECT}_frontend", f"{PROJECT}_backend"}, name


def test_a_rotated_key_file_revokes_the_old_key_without_a_restart(stack):
    keys = stack.repo / "deploy" / "secrets" / "api" / "api_keys"
    old, new = stack.key, base64.b16encode(os.urandom(24)).decode().lower()
    tmp = keys.with_name(".api_keys.new")
    tmp.write_text(f"compose:{new}\n")
    shutil.copymode(keys, tmp)
    os.chown(tmp, -1, keys.stat().st_gid)
    started = {r: stack.inspect(stack.containers()[r])["State"]["StartedAt"] for r in REPLICAS}
    tmp.replace(keys)  # what an operator does: a new file moved over the old one
    t0 = time.time()
    with stack.client() as c:
        for _ in range(30):
            codes = {c.post("/sentiment", json={"texts": ["x"]}, headers={"x-api-key": old}).status_code
                     for _ in range(4)}  # both text replicas, whichever answers  # fmt: skip
            if codes == {401}:
                break
            time.sleep(1)
        assert codes == {401}, codes
        stack.report["key_revoked_after_s"] = round(time.time() - t0, 1)
        for _ in range(4):
            assert c.post("/sentiment", json={"texts": ["x"]}, headers={"x-api-key": new}).status_code == 200
            r = c.post("/classify", files={"image": ("p.png", png(), "image/png")}, headers={"x-api-key": new})
            assert r.status_code == 200
    assert {r: stack.inspect(stack.containers()[r])["State"]["StartedAt"] for r in REPLICAS} == started
    stack.key = new


def test_a_killed_replica_is_routed_around_and_pages(stack):
    # first, Prometheus scrapes every replica by its compose service name
    deadline = time.time() + 60
    while time.time() < deadline:
        up = {s["metric"]["instance"]: s["value"][1] for s in stack.prometheus('up{job=~"servable-.+"}')}
        if up == {f"{r}:3000": "1" for r in REPLICAS}:
            break
        time.sleep(2)
    assert up == {f"{r}:3000": "1" for r in REPLICAS}, up
    victim = REPLICAS[0]
    instance = f"{victim}:3000"
    stack.podman("kill", stack.containers()[victim])
    t0 = time.time()
    with stack.client() as c:
        for _ in range(20):  # the pool's other replica answers every call
            r = c.post("/classify", files={"image": ("p.png", png(), "image/png")}, headers={"x-api-key": stack.key})
            assert r.status_code == 200, r.text
    down = alert = None
    am = f"http://127.0.0.1:{stack.ports['alertmanager']}/api/v2/alerts"
    while time.time() - t0 < 240 and alert is None:
        if down is None and [s for s in stack.prometheus(f'up{{instance="{instance}"}}') if s["value"][1] == "0"]:
            down = round(time.time() - t0, 1)
        alerts = httpx.get(am, params={"filter": 'alertname="ServableReplicaDown"'}, timeout=10).json()
        found = [a for a in alerts if a["labels"].get("instance") == instance]
        if found:
            alert = found[0]
            break
        time.sleep(5)
    assert down is not None, "Prometheus never saw the killed replica down"
    assert alert is not None, "ServableReplicaDown never reached Alertmanager"
    assert alert["labels"]["severity"] == "page" and alert["status"]["state"] == "suppressed"  # our silence
    stack.report["replica_kill"] = {"target_down_after_s": down, "alert_in_alertmanager_after_s":
                                    round(time.time() - t0, 1)}  # fmt: skip
    # back in service: the replica started again, nginx reloaded to learn its (new) address
    stack.compose("up", "-d", "--no-build", "--no-deps", victim)
    stack.wait_healthy([victim])
    stack.compose("exec", "-T", "nginx", "nginx", "-s", "reload")


class Clients:
    """Client threads (`threads`) that run from the start of a `with` block until its end (`stop`)."""

    threads: list[threading.Thread]
    stop: threading.Event

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


class Load(Clients):
    """Clients calling both endpoints through nginx, each at most `rate` calls a second (all of them
    together under the per-key limit, 50 r/s: a 429 here would be the limit, not the roll-out); every
    answer that is not a 200 counts."""

    def __init__(self, stack: Stack, clients: int = 4, rate: float = 8.0):
        self.period = 1 / rate
        self.stack, self.stop, self.codes, self.latencies = stack, threading.Event(), {}, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        image = png()
        with self.stack.client() as c:
            while not self.stop.is_set():
                key = {"x-api-key": self.stack.key}
                t = time.perf_counter()
                try:
                    if i % 2:
                        r = c.post("/classify", files={"image": ("p.png", image, "image/png")}, headers=key)
                    else:
                        r = c.post("/sentiment", json={"texts": ["A fine film.", "Too long."]}, headers=key)
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                took = time.perf_counter() - t
                with self.lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
                    self.latencies.append(took)
                self.stop.wait(max(0.0, self.period - took))


def served_tag(stack: Stack, kind: str) -> set[str]:
    """The tags the kind's replicas answer /info with (six calls: both replicas of the pool)."""
    tags = set()
    with stack.client() as c:
        for _ in range(6):
            r = c.get(f"/{kind}/info", headers={"x-api-key": stack.key})
            assert r.status_code == 200, r.text
            tags.add(r.json()["model_tag"])
    return tags


def test_rollout_and_rollback_under_load_fail_no_request(stack):
    stack.report["memory_at_rest_mib"] = stack.memory_mib()
    rollout = str(stack.repo / "deploy" / "compose_rollout.sh")
    env = {"COMPOSE": "docker-compose", "COMPOSE_FILES": " ".join(stack.files), "ENGINE": "podman"}
    steps = {}
    with Load(stack) as load:
        time.sleep(10)
        stack.report["memory_under_load_mib"] = stack.memory_mib()
        for phase, which in (("rollout", 1), ("rollback", 0)):
            for kind, entry in SERVED_MODELS.items():
                tag = stack.tags[kind][which]
                t = time.time()
                out = sh([rollout, kind], env={**stack.env, **env, f"{entry.env_prefix}MODEL_TAG": tag},
                         cwd=stack.repo, timeout=900)  # fmt: skip
                steps[f"{phase} {kind}"] = round(time.time() - t, 1)
                assert f"rolled: {' '.join(render.compose_replicas(kind))}" in out.stdout, out.stdout
                assert served_tag(stack, kind) == {tag}, kind
    total = sum(load.codes.values())
    stack.report["rollout"] = {"durations_s": steps, "requests": total, "answers": load.codes,
                               "p50_s": round(statistics.median(load.latencies), 3),
                               "p99_s": round(statistics.quantiles(load.latencies, n=100)[98], 3)}  # fmt: skip
    assert total > 100 and load.codes == {200: total}, load.codes


class Answers(Clients):
    """Clients calling /classify (and one /sentiment) through nginx all along, each answer kept with its
    time, status and the version that gave it (the answer's `model`), so that every step's requests are
    counted, its failures found by time, and each window's share of the canary read off."""

    def __init__(self, stack: Stack, image_clients: int = 3, rate: float = 8.0):
        self.stack, self.period, self.stop = stack, 1 / rate, threading.Event()
        self.got: list[tuple[float, str, int | str, str]] = []  # (time, path, status or error, model)
        self.lock = threading.Lock()
        kinds = ["image"] * image_clients + ["text"]
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in kinds]

    def _run(self, kind: str) -> None:
        image = png()
        with self.stack.client() as c:
            while not self.stop.is_set():
                key, t = {"x-api-key": self.stack.key}, time.perf_counter()
                try:
                    if kind == "image":
                        r = c.post("/classify", files={"image": ("p.png", image, "image/png")}, headers=key)
                    else:
                        r = c.post("/sentiment", json={"texts": ["A fine film."]}, headers=key)
                    code, model = r.status_code, (r.json().get("model", "") if r.status_code == 200 else r.text)
                except httpx.HTTPError as e:
                    code, model = type(e).__name__, str(e)[:200]
                with self.lock:
                    self.got.append((time.time(), kind, code, model))
                self.stop.wait(max(0.0, self.period - (time.perf_counter() - t)))

    def since(self, t0: float, t1: float | None = None, kind: str | None = None) -> list[tuple]:
        with self.lock:
            return [a for a in self.got if t0 <= a[0] < (t1 or math.inf) and kind in (None, a[1])]


def as_run_here(stack: Stack, command: str) -> str:
    """A command deploy/release.py printed, as this engine runs it: Debian's docker-compose 1.29 for the
    doc's `docker compose` (the same subcommands and flags), and the image mapping (and lowered limits)
    after deploy/compose.yaml; the roll-out script reads COMPOSE/ENGINE (set by the caller)."""
    extra = " ".join(stack.files[2:])  # what FILES and the host limits add after -f deploy/compose.yaml
    command = command.split("   #")[0].strip()  # the printed line's comment
    assert command.count("-f deploy/compose.yaml ") == 1, command
    return command.replace("docker compose ", "docker-compose ").replace(
        "-f deploy/compose.yaml ", f"-f deploy/compose.yaml {extra} "
    )


def test_release_shadow_canary_promote_and_rollback_as_docs_releasing_md_says(stack):
    """docs/releasing.md's Compose steps on the image model, traffic running all along: `python -m
    deploy.release ... --target compose` against the stack's Prometheus, then the commands it prints,
    run as printed. Shadow (the agreement recorded), canary at 20 % (the Prometheus target scraped with
    its version; the share of answers from the new version within a binomial bound), promote (all
    answers from it), roll back (all from the old one). Every request is counted, and a failure is
    recorded with the command it fell in; nginx reloads for a new pool (a recreated nginx is measured
    first, for reference)."""
    kind, (old, new) = "image", stack.tags["image"]
    weight = 20
    prom = f"http://127.0.0.1:{stack.ports['prometheus']}"
    # the release's files go to the copy's deploy/ (python -m deploy.release from its root, the way a clone runs it)
    env = {**stack.env, "PYTHONPATH": f"{stack.repo}:{ROOT}", "COMPOSE": "docker-compose", "ENGINE": "podman",
           "SERVABLE_IMAGE": IMAGES["servable"]}  # the canary extends image-1 from compose.yaml: its image  # fmt: skip
    steps: list[dict] = []

    def release(*args: str) -> list[str]:
        cmd = [sys.executable, "-m", "deploy.release", *args, "--model", kind, "--target", "compose",
               "--prometheus", prom]  # fmt: skip
        out = sh(cmd, cwd=stack.repo, env=env, timeout=120, check=False)
        assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"
        lines = out.stdout.splitlines()
        return [line.strip() for line in lines[lines.index("now run, in order:") + 1 :] if line.strip()]

    def run_printed(step: str, commands: list[str]) -> None:
        for printed in commands:
            command, nginx = as_run_here(stack, printed), stack.containers()["nginx"]
            t0 = time.time()
            out = sh(["bash", "-c", command], cwd=stack.repo, env=env, timeout=900, check=False)
            t1 = time.time()
            recreated = stack.containers()["nginx"] != nginx
            steps.append({"step": step, "printed": printed, "ran": command, "rc": out.returncode, "t0": t0, "t1": t1,
                          "seconds": round(t1 - t0, 1), "nginx_recreated": recreated})  # fmt: skip
            assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            if f"up -d --no-deps {kind}-canary-1" in command:  # the printed comment: wait until healthy
                stack.wait_healthy([f"{kind}-canary-1"])
            time.sleep(3)  # let a moment of traffic through before the next command

    def figure(expr: str, timeout: float = 180) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if found := stack.prometheus(expr):
                return found
            time.sleep(3)
        raise AssertionError(f"no data for {expr} in {timeout} s")

    def versions(t0: float, t1: float | None = None) -> list[str]:
        return [a[3] for a in load.since(t0, t1, kind) if a[2] == 200]

    report: dict = {"model": kind, "old": old, "new": new, "weight_percent": weight}
    stack.report["release"] = report
    t_start = time.time()

    def summary() -> list[tuple]:
        """Every request since the first step, by command (a failure counts in the command it fell in, or
        the 3 s after it); the failed ones returned."""
        everything = load.since(t_start)
        failed = [a for a in everything if a[2] != 200]
        report["requests"] = len(everything)
        report["answers"] = {str(c): sum(1 for a in everything if a[2] == c) for c in {a[2] for a in everything}}
        report["commands"] = []
        for s in steps:
            during = [a for a in failed if s["t0"] <= a[0] < s["t1"] + 3]
            report["commands"].append({"step": s["step"], "printed": s["printed"], "seconds": s["seconds"],
                                       "nginx_recreated": s["nginx_recreated"],
                                       "requests": len(load.since(s["t0"], s["t1"] + 3)), "failed": len(during),
                                       "failed_for_s": round(during[-1][0] - during[0][0], 2) if during else 0.0,
                                       "errors": sorted({str(a[2]) for a in during})})  # fmt: skip
        report["failed_examples"] = [(round(a[0] - t_start, 2), a[1], str(a[2]), a[3][:120]) for a in failed[:10]]
        return failed

    with Answers(stack) as load:
        time.sleep(5)
        # for reference, not a release step: nginx recreated under the same traffic, what a new environment
        # for it costs (the release's steps reload it instead)
        nginx, t0 = stack.containers()["nginx"], time.time()
        stack.compose("up", "-d", "--no-deps", "--force-recreate", "nginx")
        t1 = time.time()
        time.sleep(10)
        assert stack.containers()["nginx"] != nginx
        lost = [a for a in load.since(t0) if a[2] != 200]
        report["reference_nginx_recreated"] = {
            "command_s": round(t1 - t0, 1), "requests": len(load.since(t0)), "failed": len(lost),
            "failed_for_s": round(lost[-1][0] - lost[0][0], 2) if lost else 0.0,
            "errors": sorted({str(a[2]) for a in lost})}  # fmt: skip
        t_start = time.time()
        try:
            # 1. shadow: the stable replicas roll to score a share with the candidate
            run_printed("shadow", release("shadow", "--tag", new))
            agreement = figure(f'servable:shadow_agreement:ratio_rate5m{{candidate="{new.split(":")[1]}"}}')
            report["shadow_agreement"] = float(agreement[0]["value"][1])
            # 2. canary: the shadow check passes in the real Prometheus; the canary starts, nginx gets the pools
            commands = release("canary", "--tag", new, "--weight", str(weight))
            run_printed("canary", commands)
            t_canary = time.time()
            instance = f"{kind}-canary-1:3000"
            up = figure(f'up{{instance="{instance}"}} == 1')
            info = figure(f'servable_model_info{{instance="{instance}"}}')
            report["canary_target"] = {"job": up[0]["metric"]["job"], "version": info[0]["metric"]["version"]}
            assert report["canary_target"] == {"job": f"servable-{kind}", "version": new.split(":")[1]}, info
            # the canary's own figures, per version, before promote checks them
            figure(f'servable:version_latency_seconds:p99_5m{{job="servable-{kind}", version="{new.split(":")[1]}"}}')
            time.sleep(max(0.0, 45 - (time.time() - t_canary)))
            share_window = versions(t_canary, time.time())
            n, p = len(share_window), weight / 100
            share = share_window.count(new) / n
            bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations of a binomial share
            report["canary_share"] = {"answers": n, "from_new": share_window.count(new), "share": round(share, 4),
                                      "bound": round(bound, 4)}  # fmt: skip
            # 3. promote: the canary's figures pass (p99 up to 2 s: a shared two-core machine), then every answer is new
            run_printed("promote", release("promote", "--max-p99", "2"))
            t_promoted = time.time()
            time.sleep(15)
            after_promote = set(versions(t_promoted))
            # 4. roll back: every answer from the old version again
            run_printed("rollback", release("rollback"))
            t_back = time.time()
            time.sleep(15)
            after_rollback = set(versions(t_back))
        finally:
            failed = summary()
    report["after_promote"], report["after_rollback"] = sorted(after_promote), sorted(after_rollback)
    assert abs(share - p) <= bound, report["canary_share"]
    assert after_promote == {new}, after_promote
    assert after_rollback == {old}, after_rollback
    assert report["requests"] > 500 and not failed, (len(failed), report["commands"])


def test_image_facts(stack):
    """The images as built: size, user, and no compiler, pip or download tool in the replica image."""
    facts = {}
    for name, tag in IMAGES.items():
        info = json.loads(stack.podman("image", "inspect", tag).stdout)[0]
        facts[name] = {"size_mb": round(info["Size"] / 1e6, 1), "user": info["Config"].get("User", "") or "root"}
    assert facts["servable"]["user"] == "10001:10001"
    probe = ("for t in gcc cc c++ g++ make ld as pip pip3 curl wget git apt-get dpkg bash sh; do "
             "command -v $t >/dev/null 2>&1 && echo $t; done; for py in python3 /usr/bin/python3; do "
             "$py -c 'import pip' 2>/dev/null && echo pip-module; done; true")  # fmt: skip
    present = stack.podman("run", "--rm", "--entrypoint", "/bin/sh", IMAGES["servable"], "-c", probe).stdout.split()
    facts["servable"]["tools_present"] = present
    assert not {"gcc", "cc", "c++", "g++", "make", "ld", "as", "pip", "pip3", "pip-module", "curl", "wget",
                "git"} & set(present), present  # fmt: skip
    stack.report["images"] = facts


def test_teardown_leaves_nothing(stack):
    t = time.time()
    stack.down()
    stack.report["durations_s"]["down"] = round(time.time() - t, 1)
    assert stack.left_after_down == {"containers": [], "networks": [], "volumes": []}, stack.left_after_down
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
