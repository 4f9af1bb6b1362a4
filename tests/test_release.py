"""Shipping a new version (deploy/release.py): the checks against Prometheus' figures (a fake
/api/v1/query on 127.0.0.1), the dry run, the compose override and the Kubernetes overlay as their tools
read them, and the local stack's canary, promotion and roll back under traffic."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import yaml

from deploy import release, render
from servable.config import SERVED_MODELS
from tests.conftest import API_KEY, UNTHROTTLED_AUTH
from tests.polling import wait_for
from tests.stack_fixtures import ReleaseTraffic
from tests.test_deploy_static import run, tool

KEY = {"x-api-key": API_KEY}
DIGEST = "sha256:" + "ab" * 32


class FakePrometheus:
    """/api/v1/query answering from `figures`: the first key found in the query gives its value (None:
    an empty result, as Prometheus answers a series it does not have)."""

    def __init__(self) -> None:
        self.figures: dict[str, float | None] = {}
        self.queries: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                expr = parse_qs(url.query)["query"][0]
                fake.queries.append(expr)
                value = next((v for k, v in fake.figures.items() if k in expr), None)
                result = [] if value is None else [{"metric": {}, "value": [time.time(), str(value)]}]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
                self.send_response(200 if url.path == "/api/v1/query" else 404)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def prometheus():
    fake = FakePrometheus()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    """compose's override, state and scrape target, and the Kubernetes overlay, written under tmp_path."""
    monkeypatch.setattr(release, "COMPOSE_OVERRIDE", tmp_path / "compose.release.yaml")
    monkeypatch.setattr(release, "COMPOSE_STATE", tmp_path / "compose.release.json")
    monkeypatch.setattr(release, "COMPOSE_TARGETS", tmp_path / "targets")
    monkeypatch.setattr(release, "COMPOSE_POOLS", tmp_path / "pools")
    monkeypatch.setattr(release, "K8S_RELEASE", tmp_path / "k8s-release")
    return tmp_path


def _release(capsys, *args: str) -> tuple[int, str]:
    rc = release.main(list(args))
    got = capsys.readouterr()
    return rc, got.out + got.err


AGREEMENT, ERRORS, P99, TRAFFIC = ("shadow_agreement", "version_errors5xx", "version_latency", "version_requests")


def test_each_step_refuses_on_failing_or_missing_figures_and_goes_on_when_they_pass(prometheus, out, capsys):
    common = ("--model", "image", "--target", "compose", "--prometheus", prometheus.url)
    canary = ("canary", "--tag", "fashion-cnn:t2", "--weight", "10", *common)
    # no shadow figure at all: refused, nothing written
    rc, text = _release(capsys, *canary)
    assert rc == 2 and "no data for shadow agreement" in text and not any(out.iterdir()), text
    assert 'candidate="t2"' in prometheus.queries[-1] and 'model="fashion-cnn"' in prometheus.queries[-1]
    prometheus.figures[AGREEMENT] = 0.80  # below --min-agreement's default 0.95
    rc, text = _release(capsys, *canary)
    assert rc == 2 and "shadow agreement: 0.8 (must be >= 0.95): FAILED" in text and not any(out.iterdir())
    assert _release(capsys, *canary, "--min-agreement", "0.7", "--dry-run")[0] == 0  # the user's threshold decides
    prometheus.figures[AGREEMENT] = 0.99
    rc, text = _release(capsys, *canary)
    assert rc == 0 and "ok  shadow agreement: 0.99" in text, text
    state = json.loads(release.COMPOSE_STATE.read_text())["image"]
    assert state["canary"] == "fashion-cnn:t2" and state["weight"] == 10 and state["tag"] == "fashion-cnn:latest"

    promote = ("promote", *common, "--max-p99", "0.5")
    for figures, why in (({TRAFFIC: 3.0, ERRORS: 0.0}, "no data for canary p99"),
                         ({TRAFFIC: 3.0, ERRORS: 0.2, P99: 0.1}, "canary 5xx ratio: 0.2 (must be <= 0.01): FAILED"),
                         ({TRAFFIC: 3.0, ERRORS: 0.0, P99: 0.9}, "p99 latency (s): 0.9 (must be <= 0.5): FAILED"),
                         ({ERRORS: 0.0, P99: 0.1}, "no data for canary traffic")):  # fmt: skip
        prometheus.figures = figures
        rc, text = _release(capsys, *promote)
        assert rc == 2 and why in text, (figures, text)
        assert json.loads(release.COMPOSE_STATE.read_text())["image"]["canary"] == "fashion-cnn:t2"  # unchanged
    # the canary's figures are per version: the queries name t2
    assert all('version="t2"' in q for q in prometheus.queries[-3:])
    prometheus.figures = {TRAFFIC: 3.0, ERRORS: 0.001, P99: 0.2}
    rc, text = _release(capsys, *promote)
    assert rc == 0, text
    state = json.loads(release.COMPOSE_STATE.read_text())["image"]
    assert (state["tag"], state["canary"], state["previous"]) == ("fashion-cnn:t2", None, "fashion-cnn:latest")

    # a roll back is never refused: no figures asked for
    prometheus.figures, asked = {}, len(prometheus.queries)
    rc, text = _release(capsys, "rollback", *common)
    assert rc == 0 and len(prometheus.queries) == asked, text
    assert json.loads(release.COMPOSE_STATE.read_text())["image"]["tag"] == "fashion-cnn:latest"
    # and there is nothing left to roll back to
    assert _release(capsys, "rollback", *common)[0] == 2
    # no Prometheus at all: refused with its reason
    rc, text = _release(capsys, *canary[:-len(common)], "--model", "image", "--target", "compose", "--prometheus",
                        "http://127.0.0.1:9")  # fmt: skip
    assert rc == 2 and "did not answer" in text


def test_dry_run_prints_what_would_change_and_changes_nothing(prometheus, out, capsys, tmp_path):
    prometheus.figures[AGREEMENT] = 0.99
    for target in ("compose", "k8s"):
        extra = ("--image", f"registry.example.com/servable@{DIGEST}") if target == "k8s" else ()
        rc, text = _release(capsys, "canary", "--model", "image", "--tag", "fashion-cnn:t2", "--weight", "25",
                            "--target", target, "--prometheus", prometheus.url, "--dry-run", *extra)  # fmt: skip
        assert rc == 0 and "dry run: nothing changed" in text, text
        assert "canary - at 0% -> fashion-cnn:t2 at 25%" in text and "  run: " in text, text
        assert not any(out.iterdir()), list(out.iterdir())
    # local: the request is not handed to the stack
    stack = tmp_path / "stack"
    stack.mkdir()
    models = {k: {"tag": f"{k}:t1", "replicas": [], "previous": None, "canary": {"tag": None, "weight": 0}}
              for k in render.SERVED_MODELS}  # fmt: skip
    (stack / "stack.json").write_text(json.dumps({"prometheus_url": prometheus.url, "models": models}))
    rc, text = _release(capsys, "canary", "--model", "image", "--tag", "image:t2", "--target", "local",
                        "--stack", str(stack), "--dry-run")  # fmt: skip
    assert rc == 0 and "ask the local stack" in text and sorted(p.name for p in stack.iterdir()) == ["stack.json"]


def test_the_compose_override_validates_and_its_pools_pass_nginx_t(prometheus, out, capsys, tmp_path):
    prometheus.figures[AGREEMENT] = 0.99
    rc, text = _release(capsys, "canary", "--model", "image", "--tag", "fashion-cnn:t2", "--weight", "10",
                        "--target", "compose", "--prometheus", prometheus.url)  # fmt: skip
    reload = "exec -T nginx sh -c 'nginx -t && nginx -s reload'"
    assert rc == 0 and "up -d --no-deps image-canary-1" in text and reload in text, text
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    files = ["-f", str(render.COMPOSE_YML), "-f", str(release.COMPOSE_OVERRIDE)]
    merged = yaml.safe_load(run([tool("docker-compose"), *files, "config"], cwd=render.DEPLOY, env=env).stdout)
    services = merged["services"]
    canary = services["image-canary-1"]
    assert canary["environment"]["SERVABLE_IMAGE_SERVE_MODEL_TAG"] == "fashion-cnn:t2"
    assert canary["image"] == services["image-1"]["image"] and canary["networks"] == services["image-1"]["networks"]
    # nginx is the one of compose.yaml (a reload, not a new container, takes the canary in) ...
    plain = yaml.safe_load(run([tool("docker-compose"), "-f", str(render.COMPOSE_YML), "config"], cwd=render.DEPLOY,
                               env=env).stdout)  # fmt: skip
    ours, theirs = services["nginx"], plain["services"]["nginx"]
    assert ours["environment"] == theirs["environment"] and sorted(map(str, ours["volumes"])) == sorted(
        map(str, theirs["volumes"])
    )
    # ... and its image pool includes the canary's line: 22 beside two of 100, 9.9 % of the requests
    pool = (release.COMPOSE_POOLS / "image-canary.conf").read_text()
    assert "server image-canary-1:3000 weight=22 max_fails=3" in pool, pool
    assert not (release.COMPOSE_POOLS / "text-canary.conf").exists()
    sd = json.loads((release.COMPOSE_TARGETS / "compose-cpu" / "image-canary.json").read_text())
    assert sd == [{"targets": ["image-canary-1:3000"], "labels": {"service": "image"}}]  # Prometheus scrapes it

    # nginx -t on compose's pools (names as addresses here) with the canary's file included, and without it
    from deploy.local_stack import make_self_signed, write_nginx_config

    tls = make_self_signed(tmp_path / "tls")
    names = {f"{r}:3000": f"127.0.0.1:{10 + i}" for i, r in enumerate([*services, "image-canary-1"])}
    pools = tmp_path / "nginx-pools"
    pools.mkdir()

    def addresses(text: str) -> str:
        for name, address in names.items():
            text = text.replace(name, address)
        return text.replace(render.COMPOSE_POOLS_MOUNT, str(pools))

    values = render.nginx_values({"image": ["127.0.0.1:1"]}, "127.0.0.1", 5, str(tmp_path / "access.log"),
                                 tls_cert=str(tls / "server.crt"), tls_key=str(tls / "server.key"))  # fmt: skip
    for kind in SERVED_MODELS:
        for var in (render.upstream_var(kind), render.canary_var(kind)):
            values[var] = addresses(services["nginx"]["environment"][var])
    conf = render.nginx_conf_files(values)
    assert f"include {pools}/image-canary*.conf;" in conf["servable-models.conf"]
    run([*write_nginx_config(tmp_path / "nginx", conf, tool("nginx")), "-t"])  # no canary: nothing matches
    (pools / "image-canary.conf").write_text(addresses(pool))
    out = run([*write_nginx_config(tmp_path / "nginx", conf, tool("nginx")), "-t"])
    assert "successful" in out.stderr, out.stderr
    # the local stack's default (no canary) is the pool as before: no weights, an empty second line
    assert "weight=" not in render.nginx_conf_files(render.nginx_values({"image": ["127.0.0.1:10"]}, "127.0.0.1", 5,
                                                                        "off"))["servable-models.conf"]  # fmt: skip


def test_compose_canary_weight_gives_the_canary_its_share_beside_the_stable_replicas():
    for stable in (1, 2, 3):
        for weight in range(1, 100):
            w = render.compose_canary_weight(stable, weight)
            share = w / (w + stable * render.COMPOSE_STABLE_WEIGHT)
            assert abs(share - weight / 100) <= 0.005, (stable, weight, w, share)  # half a point
    for weight in (0, 100):  # no canary, or all to it: the pool without it, or promote
        with pytest.raises(ValueError):
            render.compose_canary_weight(2, weight)


def test_split_servers_gives_the_canary_its_weight():
    for stable, canary, weight in ((2, 1, 10), (1, 1, 30), (3, 2, 5), (2, 2, 50)):
        lines = render.split_servers([f"s{i}" for i in range(stable)], [f"c{i}" for i in range(canary)], weight)
        weights = [[int(w) for w in __import__("re").findall(r"weight=(\d+)", line) or [1] * line.count("server")]
                   for line in lines]  # fmt: skip
        assert math.isclose(sum(weights[1]) / (sum(weights[0]) + sum(weights[1])), weight / 100), (lines, weight)
    assert render.split_servers(["s"], ["c"], 0) == (render.upstream_servers(["s"]), "")
    assert render.split_servers(["s"], ["c"], 100) == ("", render.upstream_servers(["c"]))
    with pytest.raises(ValueError):
        render.split_servers(["s"], ["c"], 101)


def test_the_k8s_canary_overlay_renders_with_its_weight_image_and_tag(prometheus, out, capsys, tmp_path):
    prometheus.figures = {AGREEMENT: 0.99, TRAFFIC: 1.0, ERRORS: 0.0, P99: 0.1}
    image = f"registry.example.com/servable@{DIGEST}"
    # the deployed overlay: a release pinning the stable model's exact tag (as deploy/k8s_release.py writes)
    base = tmp_path / "deployed"
    base.mkdir()
    pinned = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "servable-image"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "image",
                            "env": [{"name": "SERVABLE_IMAGE_SERVE_MODEL_TAG", "value": "fashion-cnn:v7"}],
                        }
                    ]
                }
            }
        },
    }
    (base / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(release.K8S_BASE_OVERLAY, base)],
        "patches": [{"patch": yaml.safe_dump(pinned)}]}))  # fmt: skip
    common = ("--model", "image", "--target", "k8s", "--prometheus", prometheus.url, "--k8s-base", str(base))
    assert _release(capsys, "canary", "--tag", "fashion-cnn:t2", *common)[0] == 2  # no --image: refused
    rc, text = _release(capsys, "canary", "--tag", "fashion-cnn:t2", "--weight", "15", "--image", image, *common)
    assert rc == 0 and "kubectl apply -k" in text, text

    def rendered() -> dict[tuple[str, str], dict]:
        out_ = run([tool("kubectl"), "kustomize", str(release.K8S_RELEASE)]).stdout
        path = tmp_path / "rendered.yaml"
        path.write_text(out_)
        run([tool("kubernetes-validate"), "--strict", str(path)])
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out_) if d}

    def container(doc: dict) -> tuple[str, dict]:
        (c,) = doc["spec"]["template"]["spec"]["containers"]
        return c["image"], {e["name"]: e.get("value") for e in c["env"]}

    docs = rendered()
    ingress = docs[("Ingress", "servable-image-canary")]["metadata"]
    assert ingress["annotations"]["nginx.ingress.kubernetes.io/canary"] == "true"
    assert ingress["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "15"
    assert ingress["namespace"] == "servable"
    img, env = container(docs[("Deployment", "servable-image-canary")])
    assert img == image and env["SERVABLE_IMAGE_SERVE_MODEL_TAG"] == "fashion-cnn:t2"
    img, env = container(docs[("Deployment", "servable-image")])  # the stable one as deployed
    assert img == "servable:cpu" and env["SERVABLE_IMAGE_SERVE_MODEL_TAG"] == "fashion-cnn:v7"
    # the stable Service does not select the canary's pods (else its share would not be the weight)
    selector = docs[("Service", "servable-image")]["spec"]["selector"]
    labels = docs[("Deployment", "servable-image-canary")]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()
    assert ("Deployment", "servable-text-canary") not in docs  # only the model released

    rc, text = _release(capsys, "promote", *common)
    assert rc == 0 and "delete --ignore-not-found deployment/servable-image-canary" in text, text
    docs = rendered()
    img, env = container(docs[("Deployment", "servable-image")])
    assert img == image and env["SERVABLE_IMAGE_SERVE_MODEL_TAG"] == "fashion-cnn:t2"
    assert not [k for k in docs if k[1].endswith("-canary")]
    assert _release(capsys, "rollback", *common)[0] == 0
    img, env = container(rendered()[("Deployment", "servable-image")])
    assert img == "servable:cpu" and env["SERVABLE_IMAGE_SERVE_MODEL_TAG"] == "fashion-cnn:v7"  # as deployed before


# ---------------------------------------------------------------- the local stack, for real


def _second_version(tag: str, version: str, tmp_path: Path) -> str:
    """The same model registered again under another version: a real artifact, verified when served."""
    from servable import artifact

    art = artifact.load(tag)
    staging = tmp_path / version
    for rel in art.manifest.files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(art.path / rel, staging / rel)
    return artifact.register(art.manifest.model_copy(update={"version": version}), staging)


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_local_canary_share_promote_and_rollback_without_a_failed_request(image_run, tmp_path, capsys):
    """Canary at 30 %: the share of answers from the new version within a binomial bound; promote: all
    from it; roll back: all from the old one; traffic all along, and not one request failed."""
    from deploy.local_stack import LocalStack

    old, new = image_run.tag, _second_version(image_run.tag, "canary2", tmp_path)  # t2: test_shadow's candidate
    stack = LocalStack(tmp_path / "stack", api_keys={"tester": API_KEY}, tags={"image": old},
                       replicas_per_kind={"image": 1, "text": 0}, rate_limit="1000r/s", rate_burst=1000,
                       extra_env={"SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000", **UNTHROTTLED_AUTH})  # fmt: skip
    body = _png()

    def one() -> tuple[int, str]:
        r = requests.post(stack.proxy_url + "/classify", files={"image": ("x.png", body, "image/png")}, headers=KEY,
                          timeout=60, verify=stack.ca_file)  # fmt: skip
        return r.status_code, r.json().get("model", "") if r.status_code == 200 else r.text

    def step(*args: str) -> str:
        rc, text = _release(capsys, *args, "--model", "image", "--target", "local", "--stack", str(stack.dir))
        assert rc == 0, text
        return text

    with stack, ReleaseTraffic(stack, one) as traffic:
        answers = traffic.answers
        step("canary", "--tag", new, "--weight", "30", "--no-shadow-check")
        n, p = 200, 0.3
        share = answers(n).count(new) / n
        bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations of a binomial share
        assert abs(share - p) <= bound, (share, p, bound)
        assert json.loads((stack.dir / "stack.json").read_text())["models"]["image"]["canary"]["weight"] == 30
        # promote checks the canary's own figures in the stack's Prometheus (the per-version rules) ...
        ready = wait_for(lambda: release.query(stack.prometheus_url, "servable:version_latency_seconds:p99_5m"
                                               '{job="servable-image", version="canary2"}'), 90, 1)  # fmt: skip
        assert ready, "no per-version p99 for the canary in Prometheus"
        rc, text = _release(capsys, "promote", "--model", "image", "--target", "local", "--stack",
                            str(stack.dir), "--max-p99", "0.000001")  # fmt: skip
        assert rc == 2 and "canary p99 latency (s)" in text and "FAILED" in text, text  # ... and refuses
        assert set(answers(20)) == {old, new}  # nothing changed
        text = step("promote", "--max-p99", "30")
        assert "ok  canary 5xx ratio: 0" in text, text
        assert set(answers(40)) == {new}
        step("rollback")
        assert set(answers(40)) == {old}
    assert traffic.sent > 20 and not traffic.failed, (traffic.sent, traffic.failed[:5])


def test_the_k8s_scrape_config_gives_a_canarys_pods_their_models_job():
    """deploy.md's relabelling (Prometheus anchors its regexes) keeps the canary's pods and names their job as
    the stable pods' (the per-version rules group by job), and keeps nothing else."""
    import re

    from tests.test_doc_commands import blocks

    deploy_md = Path(render.DEPLOY.parent / "docs" / "deploy.md")
    (config,) = [yaml.safe_load(t) for _, lang, _, t in blocks(deploy_md) if lang == "yaml" and "scrape_configs" in t]
    relabels = [r for r in config["scrape_configs"][0]["relabel_configs"]
                if r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]]  # fmt: skip

    def job(name: str) -> str | None:
        out = None
        for r in relabels:
            m = re.fullmatch(r["regex"], name) if "regex" in r else re.fullmatch("(.*)", name)
            if r.get("action") == "keep":
                if not m:
                    return None
            elif r.get("target_label") == "job" and m:
                out = m.expand(r.get("replacement", "$1").replace("$", "\\"))
        return out

    for kind in render.SERVED_MODELS:
        assert job(f"servable-{kind}") == job(render.k8s_canary_name(kind)) == f"servable-{kind}"
    assert job("servable-image-shadowy") is None and job("other") is None


def test_each_checks_query_finds_the_series_the_rules_record(tmp_path):
    """The queries the steps send (release.shadow_checks, canary_checks), answered by the generated rules
    in promtool over the raw series of a shadowing replica and of a canary replica: a selector naming a
    label a rule drops has no data, and the step is refused whatever the figures (the agreement rule had
    no `job`, so every canary with the shadow check was refused on a real Prometheus)."""
    th = release.Thresholds()
    shadow, (traffic, errors, p99) = (
        release.shadow_checks("image", "fashion-cnn:t2", th),
        release.canary_checks("image", "fashion-cnn:t2", th),
    )
    live = 'job="servable-image", instance="image-1:3000"'
    canary = 'job="servable-image", instance="image-canary-1:3000"'
    request = f'{canary}, service_name="image_classifier", endpoint="/classify"'
    series = {
        f'servable_shadow_scored_total{{{live}, model="fashion-cnn", version="t1", candidate="t2"}}': "0+60x20",
        f'servable_shadow_agreed_total{{{live}, model="fashion-cnn", version="t1", candidate="t2"}}': "0+60x20",
        f'servable_model_info{{{canary}, model="fashion-cnn", version="t2"}}': "1x20",
        f'bentoml_service_request_total{{{request}, http_response_code="200"}}': "0+60x20",
        f'bentoml_service_request_duration_seconds_bucket{{{request}, le="0.1"}}': "0+60x20",
        f'bentoml_service_request_duration_seconds_bucket{{{request}, le="+Inf"}}': "0+60x20",
    }
    expected = {  # the query -> the one sample it must give (labels as promtool prints them)
        shadow[0].expr: ('servable:shadow_agreement:ratio_rate5m{job="servable-image", model="fashion-cnn", '
                         'version="t1", candidate="t2"}', 1),
        traffic.expr: ('servable:version_requests:rate5m{job="servable-image", version="t2"}', 1),
        errors.expr: ('servable:version_errors5xx:ratio_rate5m{job="servable-image", version="t2"}', 0),
        p99.expr: ('servable:version_latency_seconds:p99_5m{job="servable-image", version="t2"}', 0.099),
    }  # fmt: skip
    test = {
        "rule_files": [str(render.RULES_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "10m", "exp_samples": [{"labels": labels, "value": value}]}
                    for expr, (labels, value) in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "release_checks_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=300))
    run([tool("promtool"), "test", "rules", str(path)])


def test_every_compose_command_a_step_prints_names_a_service_of_its_files(prometheus, out, capsys, tmp_path):
    """Each `docker compose ... <service>` a step prints names a service the files define once the step
    has written them: after promote or roll back the canary is no service of them (`docker compose rm`
    of it fails, no such service), so its container goes as an orphan, after nginx has left it."""
    prometheus.figures = {AGREEMENT: 0.99, TRAFFIC: 3.0, ERRORS: 0.0, P99: 0.1}
    common = ("--model", "image", "--target", "compose", "--prometheus", prometheus.url)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    files = ["-f", str(render.COMPOSE_YML), "-f", str(release.COMPOSE_OVERRIDE)]
    for step in (("shadow", "--tag", "fashion-cnn:t2"), ("canary", "--tag", "fashion-cnn:t2", "--weight", "10"),
                 ("promote",), ("rollback",)):  # fmt: skip
        rc, text = _release(capsys, *step, *common)
        assert rc == 0, text
        printed = [line.split("#")[0].split() for line in text.split("now run, in order:\n")[1].splitlines()]
        services = run([tool("docker-compose"), *files, "config", "--services"], cwd=render.DEPLOY, env=env)
        compose = [words for words in printed if words[:2] == ["docker", "compose"]]
        assert compose or step[0] == "shadow", text
        for words in compose:  # up ... <service>; exec -T <service> <command>
            service = words[words.index("-T") + 1] if "exec" in words else words[-1]
            assert service in services.stdout.split(), (step, " ".join(words), services.stdout)
        if step[0] in ("promote", "rollback"):  # nginx first, without the canary; then its container goes
            assert [w[-2:] for w in compose] == [["-s", "reload'"], ["--remove-orphans", "nginx"]], text
