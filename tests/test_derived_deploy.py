"""A third served model is monitored, routed and audited without editing a selector by hand.

A fake entry ("tabular": route /regress, public service tabular_regressor) is added to SERVED_MODELS
and every file `deploy/render.py` generates is rendered again: the recording rules, the dashboard,
the Prometheus-adapter rule, the scrape config and the proxy's query map must all select it, and a
real `promtool` evaluates the rendered rules and the dashboard's queries on synthetic series of the
new model. A hard-coded service or route selector (the `.+_classifier` regex of old) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deploy import render
from servable.config import SERVED_MODELS, ServedModelEntry, TextServeSettings
from serving import audit
from tests.test_deploy_static import run, tool

FAKE = ServedModelEntry(
    "tabular",
    "serving.tabular_service:TabularRegressor",
    TextServeSettings,  # any settings class: only its env prefix is read here
    "/regress",
    3002,
    "tabular",
    "tabular_regressor",
    "tabular_model",
    query_options=("precision",),
)
# Calls that are not public inference calls: probes, metrics, docs and the split topology's model
# process (it reports the same calls a second time under its own service name).
NOT_INFERENCE = {"endpoint": ["/readyz", "/livez", "/metrics", "/docs.json", "/info"],
                 "service_name": ["tabular_model", "image_model", "sentiment_model"]}  # fmt: skip
SELECTOR = re.compile(r"bentoml_service_request_\w+\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)=~"([^"]*)"')


@pytest.fixture
def third_model(monkeypatch):
    """SERVED_MODELS with the fake entry: every module reads the same dict, so all see it."""
    monkeypatch.setitem(SERVED_MODELS, FAKE.kind, FAKE)
    return FAKE


def _rules_exprs(text: str) -> list[str]:
    return [r["expr"] for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def _adapter_exprs(text: str) -> list[str]:
    return [r["metricsQuery"] for r in yaml.safe_load(text)["rules"]["custom"]]


def _dashboard_exprs(text: str) -> list[str]:
    return [t["expr"] for p in json.loads(text)["panels"] for t in p["targets"]]


def _bentoml_selectors(exprs: list[str]) -> list[dict[str, str]]:
    """The regex matchers of every selector on BentoML's request metrics in exprs."""
    return [dict(MATCHER.findall(body)) for e in exprs for body in SELECTOR.findall(e)]


def _assert_selects_every_model(selectors: list[dict[str, str]], where: str) -> None:
    assert selectors, f"{where}: no selector on BentoML's request metrics"
    for sel in selectors:
        assert {"service_name", "endpoint"} <= set(sel), f"{where}: {sel} does not select by service and route"
        for entry in SERVED_MODELS.values():
            assert re.fullmatch(sel["service_name"], entry.service_name), (where, sel, entry.kind)
            assert re.fullmatch(sel["endpoint"], entry.route), (where, sel, entry.kind)
        for label, values in NOT_INFERENCE.items():
            for value in values:
                assert not re.fullmatch(sel[label], value), f"{where}: {sel} selects {label}={value}"


def test_the_generated_files_select_a_new_model(third_model):
    generated = {path: text() for path, text in render.GENERATED.items()}
    _assert_selects_every_model(_bentoml_selectors(_rules_exprs(generated[render.RULES_YML])), "rules")
    _assert_selects_every_model(_bentoml_selectors(_adapter_exprs(generated[render.ADAPTER_RULES])), "adapter")
    _assert_selects_every_model(_bentoml_selectors(_dashboard_exprs(generated[render.DASHBOARD_JSON])), "dashboard")
    scrape = yaml.safe_load(generated[render.PROMETHEUS_YML])["scrape_configs"]
    assert "targets/tabular*.json" in {f for job in scrape if job["job_name"] == "servable-tabular"
                                       for sd in job["file_sd_configs"] for f in sd["files"]}  # fmt: skip
    assert "precision" in generated[render.NGINX_QUERY]
    assert "upstream servable_tabular {\n    ${TABULAR_UPSTREAM_SERVERS}" in generated[render.NGINX_MODELS]
    assert "location = /regress {" in generated[render.NGINX_ROUTES]
    assert "location /tabular/ {" in generated[render.NGINX_ROUTES]
    for variant in ("gpu", "cpu"):  # compose's replicas of the new model, scraped by their names
        target = render.generated()[render.COMPOSE_TARGETS / f"compose-{variant}" / "tabular.json"]()
        assert json.loads(target) == [
            {"targets": ["tabular-1:3000", "tabular-2:3000"], "labels": {"service": "tabular"}}
        ]
    assert "servable-tabular" in generated[render.RULES_YML]  # the header's list of jobs
    # the shipped files are the two-model ones: adding an entry makes them stale
    assert render.main(["--check"]) == 1


def test_the_shipped_files_select_every_served_model():
    """The same properties on the committed files (they equal the rendered ones: render --check)."""
    _assert_selects_every_model(_bentoml_selectors(_rules_exprs(render.RULES_YML.read_text())), "rules")
    _assert_selects_every_model(_bentoml_selectors(_adapter_exprs(render.ADAPTER_RULES.read_text())), "adapter")
    _assert_selects_every_model(_bentoml_selectors(_dashboard_exprs(render.DASHBOARD_JSON.read_text())), "dashboard")


def test_the_templates_name_no_model():
    """Selectors live in render.selector_values only: a model's name or route written into a
    template would be a hand-kept list again."""
    for template in (render.RULES_TEMPLATE, render.ADAPTER_TEMPLATE):
        text = template.read_text()
        for entry in SERVED_MODELS.values():
            for name in (entry.service_name, entry.model_service_name, f"servable-{entry.kind}"):
                assert name not in text, (template.name, name)
            assert not re.search(rf"{re.escape(entry.route)}\b", text), (template.name, entry.route)
        assert "_classifier" not in text, template.name


def test_a_route_that_would_need_regex_escaping_is_refused(monkeypatch):
    monkeypatch.setitem(SERVED_MODELS, "odd", ServedModelEntry("odd", "x:Y", TextServeSettings, "/odd.v1", 1, "odd",
                                                               "odd_service", "odd_model"))  # fmt: skip
    with pytest.raises(ValueError, match="unescaped"):
        render.endpoint_selector()


def _series(metric: str, service: str, endpoint: str, values: str, **labels: str) -> dict:
    """One synthetic series of the new model's replica t-1 (job servable-tabular)."""
    labels = {"job": "servable-tabular", "instance": "t-1:3000", "service_name": service, "endpoint": endpoint,
              **labels}  # fmt: skip
    return {"series": metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def _sample(expr: str, labels: str, value: float) -> dict:
    return {"expr": expr, "eval_time": "5m", "exp_samples": [{"labels": labels, "value": value}]}


# Every counter grows by 15 a 15 s step (1/s). The public service answers /regress and a V2 route
# (half of the calls fail); the probes and the model process (tabular_model) count far more and
# must stay out of every ratio and sum.
REQUESTS, IN_PROGRESS = "bentoml_service_request_total", "bentoml_service_request_in_progress"
BUCKET = "bentoml_service_request_duration_seconds_bucket"
INPUT_SERIES = [
    _series(REQUESTS, "tabular_regressor", "/regress", "0+15x40", http_response_code="200"),
    _series(REQUESTS, "tabular_regressor", "/v2/models/tabular/infer", "0+15x40", http_response_code="500"),
    _series(REQUESTS, "tabular_regressor", "/readyz", "0+1000x40", http_response_code="200"),
    _series(REQUESTS, "tabular_model", "/regress", "0+1000x40", http_response_code="500"),
    _series(IN_PROGRESS, "tabular_regressor", "/regress", "7x40"),
    _series(IN_PROGRESS, "tabular_model", "/regress", "100x40"),
    _series(BUCKET, "tabular_regressor", "/regress", "0+15x40", http_response_code="200", le="1.0"),
    _series(BUCKET, "tabular_regressor", "/regress", "0+15x40", http_response_code="200", le="+Inf"),
]
RULE_SAMPLES = [
    {"expr": "servable:requests:rate1m", "eval_time": "5m", "exp_samples": [
        {"labels": 'servable:requests:rate1m{job="servable-tabular", endpoint="/regress"}', "value": 1},
        {"labels": 'servable:requests:rate1m{job="servable-tabular", endpoint="/v2/models/tabular/infer"}', "value": 1},
    ]},
    _sample("servable:errors5xx:ratio_rate1m", 'servable:errors5xx:ratio_rate1m{job="servable-tabular"}', 0.5),
    _sample("servable:in_flight:sum", 'servable:in_flight:sum{job="servable-tabular", instance="t-1:3000"}', 7),
    _sample("count by (job, endpoint) (servable:latency_seconds:p99_1m)",
            '{job="servable-tabular", endpoint="/regress"}', 1),
]  # fmt: skip


def test_promtool_evaluates_the_rendered_rules_dashboard_and_adapter_on_a_new_model(third_model, tmp_path: Path):
    (tmp_path / "rules.yml").write_text(render.GENERATED[render.RULES_YML]())
    run([tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")])
    tests = list(RULE_SAMPLES)
    # the dashboard's queries on BentoML's metrics: each has a sample of the new model's route
    tests += [_sample(f"count by (job, endpoint) ({expr})", '{job="servable-tabular", endpoint="/regress"}', 1)
              for expr in _dashboard_exprs(render.dashboard_text()) if SELECTOR.search(expr)]  # fmt: skip
    # the adapter's query, with the adapter's own template variables filled as for one pod
    (query,) = _adapter_exprs(render.GENERATED[render.ADAPTER_RULES]())
    query = query.replace("<<.GroupBy>>", "instance").replace("<<.LabelMatchers>>", 'job="servable-tabular"')
    tests.append(_sample(query, '{instance="t-1:3000"}', 7))
    case = {"rule_files": ["rules.yml"], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": INPUT_SERIES, "promql_expr_test": tests}]}  # fmt: skip
    (tmp_path / "case.yml").write_text(yaml.safe_dump(case, sort_keys=False))
    out = run([tool("promtool"), "test", "rules", "case.yml"], cwd=tmp_path)
    assert "SUCCESS" in out.stdout


# ---------------------------------------------------------------- the audit trail's endpoint label


def test_audit_labels_every_served_route_and_folds_the_rest():
    for entry in SERVED_MODELS.values():
        assert audit.endpoint_label(entry.route) == entry.route
        assert audit.endpoint_label(entry.route + "/explain") == entry.route + "/explain"
    for path in ("/info", "/metrics", "/docs", "/docs.json", "/v2/health/live", "/v2/health/ready"):
        assert audit.endpoint_label(path) == path
    assert audit.endpoint_label("/v2/models/fashion/infer") == "/v2/models/{name}/infer"
    assert audit.endpoint_label("/v2/models/fashion") == "/v2/models/{name}"
    for scanner in ("/wp-login.php", "/classify/../etc/passwd", "/.env"):
        assert audit.endpoint_label(scanner) == "other", scanner


def test_audit_routes_follow_served_models(third_model):
    routes = audit.labelled_routes()
    assert {"/regress", "/regress/explain"} <= routes
    assert {e.route for e in SERVED_MODELS.values()} <= routes


def test_the_proxy_routes_a_new_model(third_model, tmp_path: Path):
    """nginx, as the local stack and compose run it, with a pool, the routes and the playground page
    policy of the added model; `nginx -t` accepts it, and a model without replicas gets a `down` pool."""
    from deploy.local_stack import make_self_signed, write_nginx_config

    tls = make_self_signed(tmp_path / "tls")
    pools = {"tabular": ["127.0.0.1:7"], "image": ["127.0.0.1:8"]}
    values = render.nginx_values(pools, "127.0.0.1", 5, str(tmp_path / "a.log"), tls_cert=str(tls / "server.crt"),
                                 tls_key=str(tls / "server.key"), http_port=6)  # fmt: skip
    assert values["TABULAR_UPSTREAM_SERVERS"] == render.upstream_servers(["127.0.0.1:7"])
    assert values["TEXT_UPSTREAM_SERVERS"] == "server 127.0.0.1:9 down;"
    files = render.nginx_conf_files(values)
    playground = re.search(r'"~(\S+)" 1;', files["servable-models.conf"])[1]
    for kind in SERVED_MODELS:
        assert re.search(playground, f"/{kind}/playground"), kind
    assert not re.search(playground, "/other/playground")
    routes = files["servable-routes.inc"]
    assert "proxy_pass http://servable_tabular;" in routes and "proxy_pass http://servable_tabular/;" in routes
    assert "client_max_body_size 1m;" in routes.split("location = /regress", 1)[1].split("}", 1)[0]
    run([*write_nginx_config(tmp_path / "nginx", files, tool("nginx")), "-t"])


def test_a_kind_that_cannot_name_a_pool_is_refused(monkeypatch):
    monkeypatch.setitem(SERVED_MODELS, "Odd-1", ServedModelEntry("Odd-1", "x:Y", TextServeSettings, "/odd", 1, "odd",
                                                                 "odd_service", "odd_model"))  # fmt: skip
    with pytest.raises(ValueError, match="lower-case"):
        render.nginx_models_text()


# ---------------------------------------------------------------- Kubernetes: the base rendered per model


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_kustomize_renders_a_new_model(third_model, tmp_path: Path, variant: str):
    """The Kubernetes base rendered with the added model (its manifest from model.yaml.template, the
    kustomization's resources, its Ingress): both overlays build, pass strict validation and hold
    the new model's Deployment, Service, PodDisruptionBudget, autoscaler and Ingress."""
    import shutil

    k8s = tmp_path / "k8s"
    shutil.copytree(render.DEPLOY / "k8s", k8s)
    files = render.generated()
    for path in (render.K8S_KUSTOMIZATION, render.K8S_INGRESS, render.K8S_BASE / "tabular.yaml"):
        assert path in files, path
    for path, text in files.items():
        if path.parent == render.K8S_BASE:
            (k8s / "base" / path.name).write_text(text())
    assert "  - tabular.yaml\n" in (k8s / "base" / "kustomization.yaml").read_text()
    out = run([tool("kubectl"), "kustomize", str(k8s / "overlays" / variant)])
    (tmp_path / "all.yaml").write_text(out.stdout)
    run([tool("kubernetes-validate"), "--strict", str(tmp_path / "all.yaml")])
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress"):
        for model in SERVED_MODELS:
            assert (kind, f"servable-{model}") in docs, (kind, model)
    (container,) = docs["Deployment", "servable-tabular"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["name"] == "tabular" and env["SERVABLE_SERVICE"] == "tabular"
    assert env[f"{FAKE.env_prefix}MODEL_TAG"] == FAKE.settings.model_fields["model_tag"].default
    assert env[f"{FAKE.env_prefix}DEVICE"] == ("cuda" if variant == "gpu" else "cpu")  # the overlay's patch
    ingress = docs["Ingress", "servable-tabular"]
    paths = [p for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert {p["path"] for p in paths} == {"/(regress)$", r"/tabular/(info|docs\.json|v2|v2/.*)$"}
    assert {p["backend"]["service"]["name"] for p in paths} == {"servable-tabular"}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == render.body_limit(FAKE)


def test_the_k8s_templates_name_no_model():
    """The per-model Kubernetes templates hold placeholders, never a served model's name or route."""
    for template in (render.K8S_MODEL_TEMPLATE, render.K8S_INGRESS_TEMPLATE):
        text = template.read_text()
        for entry in SERVED_MODELS.values():
            for name in (f"servable-{entry.kind}", entry.env_prefix, entry.route):
                assert name not in text, (template.name, name)


# ---------------------------------------------------------------- compose: the generated regions


def test_compose_renders_a_new_model(third_model, tmp_path: Path):
    """compose.yaml and compose.gpu.yaml rendered with the added model: its replicas (on the shared
    replica settings, its own environment block), nginx's pool of them and nginx and Prometheus
    waiting for them; both variants pass `docker-compose config`; compose_prep.sh checks its tag."""
    from tests.test_deploy_static import load_compose

    files = render.generated()
    cpu_text = files[render.COMPOSE_YML]()
    (tmp_path / "compose.yaml").write_text(cpu_text)
    (tmp_path / "compose.gpu.yaml").write_text(files[render.COMPOSE_GPU_YML]())
    assert "x-tabular-env: &tabular-env\n  SERVABLE_SERVICE: tabular\n" in cpu_text
    cpu = load_compose(str(tmp_path / "compose.yaml"))  # an absolute name: DEPLOY / it is it
    gpu = load_compose(str(tmp_path / "compose.yaml"), str(tmp_path / "compose.gpu.yaml"))
    replicas = [f"{kind}-{n}" for kind in SERVED_MODELS for n in (1, 2)]
    nginx = cpu["services"]["nginx"]
    assert nginx["depends_on"] == cpu["services"]["prometheus"]["depends_on"]
    assert nginx["depends_on"] == {r: {"condition": "service_healthy"} for r in replicas}
    pool = render.upstream_servers(["tabular-1:3000", "tabular-2:3000"], weight=render.COMPOSE_STABLE_WEIGHT)
    assert nginx["environment"]["TABULAR_UPSTREAM_SERVERS"] == pool
    assert nginx["environment"]["TABULAR_CANARY_UPSTREAM_SERVERS"] == "include /etc/nginx/pools/tabular-canary*.conf;"
    for name in ("tabular-1", "tabular-2"):
        svc = cpu["services"][name]
        assert svc["environment"]["SERVABLE_SERVICE"] == "tabular" and svc["read_only"] is True
        assert gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "devices" not in svc["deploy"]["resources"]["reservations"]
        assert "slim" in svc["build"]["args"]["BASE_IMAGE"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(render.DEPLOY.parent)}
    for variant in (["-f", "compose.yaml"], ["-f", "compose.yaml", "-f", "compose.gpu.yaml"]):
        out = run([tool("docker-compose"), "--project-directory", str(render.DEPLOY), *variant, "config",
                   "--services"], cwd=tmp_path, env=env)  # fmt: skip
        assert {"tabular-1", "tabular-2"} <= set(out.stdout.split()), variant
    prep = files[render.COMPOSE_PREP]()
    tag = FAKE.settings.model_fields["model_tag"].default
    assert f'"${{{FAKE.env_prefix}MODEL_TAG:-{tag}}}")\n' in prep  # the third tag, last in the list
    (tmp_path / "compose_prep.sh").write_text(prep)
    run([tool("bash"), "-n", str(tmp_path / "compose_prep.sh")])


def test_a_marked_region_must_be_generated(tmp_path: Path):
    """A marked region nobody generates, or a generated one not marked, is an error (not a stale file)."""
    path = tmp_path / "f.yaml"
    path.write_text("a: 1\n# >>> generated: one (x)\nold\n# <<< generated: one\nb: 2\n")
    assert (
        render.fill_regions(path, {"one": "new\n"})
        == "a: 1\n# >>> generated: one (x)\nnew\n# <<< generated: one\nb: 2\n"
    )
    with pytest.raises(KeyError):
        render.fill_regions(path, {"one": "", "two": ""})
    with pytest.raises(KeyError):
        render.fill_regions(path, {})
