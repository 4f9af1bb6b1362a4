"""One source for the deployment configs: the nginx template filler and the Grafana dashboard.

- nginx: `deploy/nginx/servable.conf.template` is the proxy config of every environment (TLS,
  security headers, per-API-key rate limits, per-address connection limits, client timeouts,
  routing), included by the main `deploy/nginx/nginx.conf` (processes, connection slots).
  docker compose hands it to the nginx image's own envsubst (/etc/nginx/templates); the local
  stack fills it here with `render_template` (same ${NAME} placeholders, nginx's own $variables
  untouched).
- Grafana: the dashboard's panels and PromQL live in `PANELS` below; `python -m deploy.render`
  writes deploy/grafana/dashboards/servable.json, deploy/prometheus/prometheus.yml (a scrape job
  per served model), deploy/nginx/servable-query.conf (the query options the proxy lets
  through), the Prometheus rules deploy/prometheus/rules/servable.yml and the GPU overlay's
  Prometheus-adapter rule (from their *.template files), nginx's per-model pools and routes
  (servable-models.conf.template, servable-routes.inc.template) and compose's scrape targets
  (prometheus/targets/compose-{gpu,cpu}/<kind>.json) and the Kubernetes base (k8s/base/<kind>.yaml from
  model.yaml.template, ingress.yaml from ingress.yaml.template, kustomization.yaml's resources);
  `--check` fails when any is stale.
- Which calls are the served models' inference calls (service_name and endpoint matchers) is
  derived from SERVED_MODELS in one place, `selector_values()`: the dashboard, the recording
  rules and the adapter all use it, so a new model is monitored without editing a selector.
  tests/test_local_stack.py queries every expression here against a real Prometheus.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from servable.config import SERVED_MODELS, ServedModelEntry

DEPLOY = Path(__file__).resolve().parent
NGINX_TEMPLATE = DEPLOY / "nginx" / "servable.conf.template"
NGINX_MAIN = DEPLOY / "nginx" / "nginx.conf"  # processes and connection slots; includes conf.d/servable*.conf
NGINX_QUERY = DEPLOY / "nginx" / "servable-query.conf"  # generated: the query options the proxy lets through
NGINX_MODELS = DEPLOY / "nginx" / "servable-models.conf.template"  # generated: the pools, the playground paths
NGINX_ROUTES = DEPLOY / "nginx" / "servable-routes.inc.template"  # generated: the API server's model locations
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "servable.json"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULES_TEMPLATE = DEPLOY / "prometheus" / "servable-rules.yml.template"
RULES_YML = RULES_DIR / "servable.yml"  # generated from RULES_TEMPLATE; gpu.yml beside it is written by hand
ADAPTER_TEMPLATE = DEPLOY / "k8s" / "overlays" / "gpu" / "prometheus-adapter-rules.yaml.template"
ADAPTER_RULES = ADAPTER_TEMPLATE.with_suffix("")  # generated: Helm values of the Prometheus adapter
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def template_names(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ${NAME} placeholders as envsubst does; every placeholder must have a value."""
    missing = template_names(text) - set(values)
    if missing:
        raise KeyError(f"no value for template placeholders {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def upstream_servers(addresses: list[str], max_fails: int = 3, fail_timeout_s: int = 10, weight: int = 1) -> str:
    """The `server ...;` lines of one upstream pool (compose passes the same text as an env var)."""
    w = f" weight={weight}" if weight != 1 else ""
    return " ".join(f"server {a}{w} max_fails={max_fails} fail_timeout={fail_timeout_s}s;" for a in addresses)


def split_servers(stable: list[str], canary: list[str], weight: int) -> tuple[str, str]:
    """The `server` lines of a model's stable and canary replicas in its one pool, `weight` % of the requests
    to the canary ones: nginx's weighted round robin gives each server its weight's share, so each stable
    replica weighs (100 - weight) x len(canary) and each canary one weight x len(stable). A canary replica
    that fails is skipped like any other (max_fails), and its request retried on another."""
    if not 0 <= weight <= 100:
        raise ValueError(f"canary weight {weight}: a percentage, 0 to 100")
    if not canary or weight == 0:
        return upstream_servers(stable), ""
    if not stable or weight == 100:
        return "", upstream_servers(canary)
    a, b = (100 - weight) * len(canary), weight * len(stable)
    g = math.gcd(a, b)
    return upstream_servers(stable, weight=a // g), upstream_servers(canary, weight=b // g)


# Per-API-key limits when nothing else is said (compose: SERVABLE_RATE_LIMIT, SERVABLE_RATE_BURST;
# local stack: --rate-limit, --rate-burst): sustained rate, and requests allowed at once above it.
RATE_LIMIT = "50r/s"
RATE_BURST = 100
# Explanations' own per-key budget (compose: SERVABLE_EXPLAIN_RATE_LIMIT, SERVABLE_EXPLAIN_RATE_BURST;
# local stack: --explain-rate-limit, --explain-rate-burst), on top of RATE_LIMIT: one explanation is
# tens of model rows, so one a second per key is about what RATE_LIMIT's predictions cost.
EXPLAIN_RATE_LIMIT = "60r/m"
EXPLAIN_RATE_BURST = 5
# Requests in progress at once per client address (compose: SERVABLE_CONN_LIMIT; local stack:
# --conn-limit): as many as the rate limit lets one key send at once.
CONN_LIMIT = RATE_BURST


_KIND = re.compile(r"[a-z][a-z0-9_]*")


def _kind_name(kind: str) -> str:
    """A kind names an nginx upstream, a path prefix and an envsubst variable (<KIND>_UPSTREAM_SERVERS)."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"served model kind {kind!r}: use lower-case letters, digits and _ (it names nginx pools)")
    return kind


# compose: each stable replica's weight in its pool, so that a canary can be given a share beside them by
# a file nginx includes and reloads (deploy/release.py), without a new environment (a recreated nginx)
COMPOSE_STABLE_WEIGHT = 100
COMPOSE_POOLS = DEPLOY / "nginx" / "pools"  # mounted at /etc/nginx/pools: <kind>-canary.conf, written by a release
COMPOSE_POOLS_MOUNT = "/etc/nginx/pools"


def compose_stable_servers(kind: str) -> str:
    """compose: the `server` lines of a model's stable replicas, each of COMPOSE_STABLE_WEIGHT."""
    return upstream_servers([f"{r}:3000" for r in compose_replicas(kind)], weight=COMPOSE_STABLE_WEIGHT)


def compose_canary_weight(stable: int, weight: int) -> int:
    """compose: one canary replica's weight beside `stable` replicas of COMPOSE_STABLE_WEIGHT each, so that it
    gets `weight` percent of the requests (rounded to a whole weight: within half a percentage point)."""
    if not 0 < weight < 100:
        raise ValueError(f"canary weight {weight}: 1 to 99 beside the stable replicas (promote gives it all)")
    return max(1, round(COMPOSE_STABLE_WEIGHT * stable * weight / (100 - weight)))


def upstream_var(kind: str) -> str:
    """The placeholder holding one pool's `server ...;` lines (compose: an environment variable of nginx)."""
    return f"{_kind_name(kind).upper()}_UPSTREAM_SERVERS"


def canary_var(kind: str) -> str:
    """The placeholder holding the `server ...;` lines of a model's canary replicas, in the same pool
    (empty unless a canary runs: deploy/release.py)."""
    return f"{_kind_name(kind).upper()}_CANARY_UPSTREAM_SERVERS"


# A pool with no replica (a stack started without one model): nginx refuses an empty upstream, and
# a `down` server makes its routes answer 502 instead.
_NO_REPLICA = "server 127.0.0.1:9 down;"


def nginx_values(upstreams: Mapping[str, list[str]], listen_addr: str, listen_port: int, access_log: str, *,
                 tls_cert: str = "/etc/nginx/tls/server.crt", tls_key: str = "/etc/nginx/tls/server.key",
                 http_port: int = 8080, https_public_port: int | None = None, rate_limit: str = RATE_LIMIT,
                 rate_burst: int = RATE_BURST, conn_limit: int = CONN_LIMIT,
                 explain_rate_limit: str = EXPLAIN_RATE_LIMIT, explain_rate_burst: int = EXPLAIN_RATE_BURST,
                 canary: Mapping[str, tuple[list[str], int]] | None = None) -> dict:  # fmt: skip
    """Values for every placeholder of the nginx templates: each served model's pool (kind ->
    replica addresses; a kind left out gets none; `canary`: kind -> (canary replica addresses,
    percent of the requests they get), split_servers), HTTPS on listen_addr:listen_port, the
    redirect-only plain listener on listen_addr:http_port, the certificate, the per-key and
    per-address limits."""
    for rate in (rate_limit, explain_rate_limit):
        if not re.fullmatch(r"[0-9]+r/[sm]", rate):
            raise ValueError(f"rate limit {rate!r} is not nginx's <n>r/s or <n>r/m")
    unknown = (set(upstreams) | set(canary or {})) - set(SERVED_MODELS)
    if unknown:
        raise KeyError(f"upstreams for {sorted(unknown)}: not in SERVED_MODELS")
    pools = {}
    for kind in SERVED_MODELS:
        stable, canary_servers = split_servers(upstreams.get(kind, []), *(canary or {}).get(kind, ([], 0)))
        pools[upstream_var(kind)] = stable or ("" if canary_servers else _NO_REPLICA)
        pools[canary_var(kind)] = canary_servers
    return {
        **pools,
        "LISTEN_ADDR": listen_addr,
        "LISTEN_PORT": str(listen_port),
        "HTTP_LISTEN_ADDR": listen_addr,
        "HTTP_PORT": str(http_port),
        "HTTPS_PUBLIC_PORT": str(https_public_port or listen_port),
        "ACCESS_LOG": access_log,
        "TLS_CERT": tls_cert,
        "TLS_KEY": tls_key,
        "RATE_LIMIT": rate_limit,
        "RATE_BURST": str(int(rate_burst)),
        "EXPLAIN_RATE_LIMIT": explain_rate_limit,
        "EXPLAIN_RATE_BURST": str(int(explain_rate_burst)),
        "CONN_LIMIT": str(int(conn_limit)),
    }


def body_limit(entry: ServedModelEntry) -> str:
    """The proxy's (and the Ingress') body limit of a model's routes: its replicas' own default
    max_body_bytes, in nginx's size syntax."""
    size = int(entry.settings.model_fields["max_body_bytes"].default)
    for unit, factor in (("m", 1 << 20), ("k", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _generated_head(what: str) -> str:
    return (
        f"# Generated by `python -m deploy.render` from SERVED_MODELS (servable/config.py): do not edit\n"
        f"# (`python -m deploy.render --check` fails when it is stale). {what}\n"
    )


def nginx_models_text() -> str:
    """servable-models.conf.template (nginx's http block): one upstream pool per served model, its
    servers a placeholder filled per environment, and which paths are playground pages."""
    pools = "".join(
        f"upstream servable_{_kind_name(kind)} {{\n    ${{{upstream_var(kind)}}}\n    ${{{canary_var(kind)}}}\n"
        "    keepalive 16;\n    keepalive_timeout 4s;\n}\n\n"
        for kind in SERVED_MODELS
    )
    kinds = "|".join(SERVED_MODELS)
    return (
        _generated_head(
            "The placeholders are filled as\n# servable.conf.template's (compose: the nginx image's "
            "envsubst; local stack: deploy/render.py)."
        )
        + "# A pool's second line is its canary replicas (weighted: deploy/render.py::split_servers), empty\n"
        "# unless deploy/release.py runs a canary.\n"
        "# Idle connections to the replicas are kept for 4 s: below the replicas' own keep-alive timeout\n"
        "# (5 s, BentoML's default), so nginx never sends a request on a connection a replica is closing.\n"
        + pools
        + "# Every service serves its playground page (GET /<kind>/playground, its script and style):\n"
        "# servable.conf.template's $servable_csp gives these paths the page policy.\n"
        "map $uri $servable_playground {\n"
        f'    "~^/({kinds})/playground(/|$)" 1;\n'
        "    default 0;\n}\n"
    )


def nginx_routes_text() -> str:
    """servable-routes.inc.template (the API's server block): each model's REST route, its explain route
    (also under the per-key explain budget) and its /<kind>/ prefix (info, V2, docs, playground) to its
    pool, under the per-key limit and the model's body limit; any other path is a JSON 404."""
    out = [_generated_head("Included in the API's server block of\n# servable.conf.template.")]
    for kind, entry in SERVED_MODELS.items():
        limits = f"        limit_req zone=servable_per_key burst=${{RATE_BURST}} nodelay;\n" \
                 f"        client_max_body_size {body_limit(entry)};\n"  # fmt: skip
        explain = f"        limit_req zone=servable_explain_per_key burst=${{EXPLAIN_RATE_BURST}} nodelay;\n{limits}"
        route = entry.route + "/explain"
        out.append(
            f"\n    # {entry.service_name}: POST {entry.route}, {route} and everything else under /{kind}/.\n"
            f"    location = {entry.route} {{\n{limits}        proxy_pass http://servable_{kind};\n    }}\n"
            f"    location = {route} {{\n{explain}        proxy_pass http://servable_{kind};\n    }}\n"
            f"    location = /{kind}{route} {{\n{explain}        proxy_pass http://servable_{kind}{route};\n    }}\n"
            f"    location /{kind}/ {{\n{limits}        proxy_pass http://servable_{kind}/;\n    }}\n"
        )
    uses = ", ".join([e.route for e in SERVED_MODELS.values()] + [f"/{k}/..." for k in SERVED_MODELS])
    out.append(
        "\n    location / {\n"
        f'        return 404 \'{{"error":"unknown route: use {uses}","reason":"not_found"}}\';\n'
        "    }\n"
    )
    return "".join(out)


def nginx_conf_files(values: dict[str, str]) -> dict[str, str]:
    """The proxy's files under nginx's conf.d/, rendered from the current SERVED_MODELS (a model
    added in-process included): what compose's envsubst and mounts put there."""
    return {
        "servable.conf": render_template(NGINX_TEMPLATE.read_text(), values),
        NGINX_MODELS.name.removesuffix(".template"): render_template(nginx_models_text(), values),
        NGINX_ROUTES.name.removesuffix(".template"): render_template(nginx_routes_text(), values),
        NGINX_QUERY.name: nginx_query_text(),
    }


def nginx_template_texts() -> str:
    """The shared template and the generated ones, as one text (checks of what nginx is told)."""
    return "\n".join((NGINX_TEMPLATE.read_text(), nginx_models_text(), nginx_routes_text()))


def nginx_query_text() -> str:
    """servable-query.conf: $servable_query_refused is 1 when the query string holds a parameter no
    served model declares (SERVED_MODELS' query_options); the template refuses those requests."""
    names = "|".join(dict.fromkeys(o for e in SERVED_MODELS.values() for o in e.query_options))
    allowed = f'    "~^(?:(?:{names})(?:=[^&]*)?)?(?:&(?:(?:{names})(?:=[^&]*)?)?)*$" 0;\n' if names else ""
    return (
        "# Generated by `python -m deploy.render` from servable/config.py (SERVED_MODELS, query_options):\n"
        "# do not edit. Included in nginx's http block with the other conf.d/servable*.conf files; the\n"
        "# API's server (servable.conf.template) refuses a request when this is 1.\n"
        "map $args $servable_query_refused {\n"
        '    "" 0;\n' + allowed + "    default 1;\n}\n"
    )


# ---------------------------------------------------------------- the served models' calls, as PromQL selectors

# Names and routes go into PromQL regexes as they are: they may hold no regex (or string) syntax.
_PLAIN = re.compile(r"[A-Za-z0-9_/-]+")
V2_ROUTES = "/v2/models/.+"  # the V2 inference protocol: one route family, every model's name in it


def _alternation(values: list[str]) -> str:
    bad = [v for v in values if not _PLAIN.fullmatch(v)]
    if bad:
        raise ValueError(f"{bad} cannot go into a PromQL regex unescaped: use letters, digits, _, - and /")
    return "|".join(dict.fromkeys(values))


def front_selector() -> str:
    """Matcher of the served models' public services (BentoML's service_name): the split
    topology's model processes (model_service_name) count the same calls again and stay out."""
    return f'service_name=~"{_alternation([e.service_name for e in SERVED_MODELS.values()])}"'


def endpoint_selector(v2: bool = True) -> str:
    """Matcher of the public inference routes: each model's REST route and, with v2, the V2
    protocol's. Never the probes, /metrics or the docs: they would dilute the ratios."""
    routes = _alternation([e.route for e in SERVED_MODELS.values()])
    return f'endpoint=~"{routes}|{V2_ROUTES}"' if v2 else f'endpoint=~"{routes}"'


def selector_values() -> dict[str, str]:
    """The ${NAME} placeholders of the *.template files and of PANELS: the one place the rules,
    the adapter and the dashboard learn which calls are the served models' inference calls."""
    return {
        "SERVICES": front_selector(),
        "ENDPOINTS": endpoint_selector(),  # REST and V2 inference routes
        "REST_ENDPOINTS": endpoint_selector(v2=False),  # REST only (the latency SLO, the dashboard)
        "JOBS": ", ".join(f"servable-{kind}" for kind in SERVED_MODELS),
    }


# ---------------------------------------------------------------- Grafana dashboard


_SHADOW_BY = "sum by (model, version, candidate)"
_SHADOW_LEGEND = "{{model}} {{version}} vs {{candidate}}"
SHADOW_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Shadow: candidate agreement with the live answers", "percentunit", [
        ("servable:shadow_agreement:ratio_rate5m", _SHADOW_LEGEND)]),
    ("Shadow: mean absolute score difference (regressor: its error)", "short", [
        (f"{_SHADOW_BY} (rate(servable_shadow_abs_diff_sum[5m])) "
         f"/ {_SHADOW_BY} (rate(servable_shadow_abs_diff_count[5m]))", _SHADOW_LEGEND)]),
    ("Shadow: rows scored and dropped", "reqps", [
        (f"{_SHADOW_BY} (rate(servable_shadow_scored_total[1m]))", "scored " + _SHADOW_LEGEND),
        (f"{_SHADOW_BY} (rate(servable_shadow_dropped_total[1m]))", "dropped " + _SHADOW_LEGEND)]),
    ("Shadow: candidate run time per batch (p50 / p99)", "s", [
        (f"histogram_quantile({q}, sum by (model, version, candidate, le) "
         "(rate(servable_shadow_latency_seconds_bucket[5m])))", f"p{int(q * 100)} {_SHADOW_LEGEND}")
        for q in (0.5, 0.99)]),
    ("Shadow: live vs candidate label (classifiers)", "reqps", [
        ("sum by (model, candidate, live_label, candidate_label) (rate(servable_shadow_confusion_total[5m]))",
         "{{model}} {{live_label}} -> {{candidate}} {{candidate_label}}")]),
]  # fmt: skip

DRIFT_PANEL = "Input drift: PSI against the training reference (alert above DRIFT_PSI_ALERT)"

# (title, unit, [(PromQL, legend)]): the one place the dashboard's queries are written. ${NAME}
# placeholders are the served models' selectors (selector_values), filled when the dashboard is written.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Request rate per endpoint", "reqps", [("servable:requests:rate1m", "{{job}} {{endpoint}}")]),
    ("5xx error ratio", "percentunit", [("servable:errors5xx:ratio_rate1m", "{{job}}")]),
    ("4xx rejections by reason", "reqps", [("sum by (job, reason) (rate(servable_rejected_total[1m]))",
                                            "{{job}} {{reason}}")]),
    ("Latency per endpoint (p50 / p95 / p99)", "s", [
        (f"histogram_quantile({q}, sum by (job, endpoint, le) (rate(bentoml_service_request_duration_seconds_bucket"
         "{${SERVICES}, ${REST_ENDPOINTS}}[1m])))", f"p{int(q * 100)} {{{{job}}}} {{{{endpoint}}}}")
        for q in (0.5, 0.95, 0.99)
    ]),
    ("In-flight requests per replica", "short", [("servable:in_flight:sum", "{{instance}}")]),
    ("Batch size (items per model run)", "short", [
        ("sum by (job) (rate(servable_batch_size_sum[1m])) / sum by (job) (rate(servable_batch_size_count[1m]))",
         "mean {{job}}"),
        # servable_batch_size covers both topologies; BentoML's adaptive_batch_size exists only in split.
        ("histogram_quantile(0.95, sum by (job, le) (rate(servable_batch_size_bucket[1m])))", "p95 {{job}}"),
    ]),
    ("Model time vs queue time (mean per request)", "s", [
        ("servable:model_seconds:mean1m", "model (ONNX Runtime) {{job}}"),
        ("servable:queue_seconds:mean1m", "queue + transport {{job}}"),
        ("sum by (job) (rate(servable_preprocess_seconds_sum[1m])) "
         "/ sum by (job) (rate(servable_preprocess_seconds_count[1m]))", "pre-processing {{job}}"),
    ]),
    ("Queue wait per request (p50 / p99) and batch releases", "s", [
        *((f"histogram_quantile({q}, sum by (job, le) (rate(servable_queue_wait_seconds_bucket[1m])))",
           f"queue wait p{int(q * 100)} {{{{job}}}}") for q in (0.5, 0.99)),
        ("sum by (job, reason) (rate(servable_batch_releases_total[1m]))", "batches/s released {{reason}} {{job}}"),
    ]),
    ("Replicas up", "short", [('sum by (job) (up{job=~"servable-.+"})', "{{job}}")]),
    ("Predictions by label", "reqps", [("sum by (model, label) (rate(servable_predictions_total[1m]))",
                                        "{{model}} {{label}}")]),
    ("Model version served", "short", [("max by (model, tag, variant, provider) (servable_model_info)",
                                        "{{tag}} {{variant}} {{provider}}")]),
    ("Requests and 5xx ratio per version (canary)", "percentunit", [
        ("servable:version_errors5xx:ratio_rate5m", "5xx {{job}} {{version}}"),
        ("servable:version_requests:rate5m / ignoring (version) group_left sum by (job) "
         "(servable:version_requests:rate5m)", "share of requests {{job}} {{version}}"),
    ]),
    ("Latency p99 per version (canary)", "s", [("servable:version_latency_seconds:p99_5m",
                                                "p99 {{job}} {{version}}")]),
    ("Low-confidence share (drift signal)", "percentunit", [("servable:low_confidence:ratio_rate5m",
                                                             "{{job}} {{model}}")]),
    ("Feedback queue size (opt-in items to label)", "short", [("max by (model) (servable_feedback_queue_size)",
                                                               "{{model}}")]),
    # Shadow scoring (serving/shadow.py): series only where a replica runs a candidate.
    *SHADOW_PANELS,
    # the alert's threshold is a series: each model version's replicas export their own DRIFT_PSI_ALERT
    (DRIFT_PANEL, "short", [("servable:drift_psi:max", "{{model}} {{version}} {{feature}}"),
                            ("min by (job, model, version) (servable_drift_psi_alert)",
                             "alert threshold {{model}} {{version}}")]),
]  # fmt: skip

# Panels that draw an alert's threshold (Grafana: a dashed line): title -> the alert, whose own expression
# (`<signal> < value` or `> value`, in the rendered rules) gives the value.
# (The drift panel plots its threshold as a series instead: the replicas export it.)
PANEL_ALERTS = {SHADOW_PANELS[0][0]: "ServableShadowDisagreement"}


def panels() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """PANELS with the served models' selectors filled in."""
    values = selector_values()
    return [(title, unit, [(render_template(expr, values), legend) for expr, legend in targets])
            for title, unit, targets in PANELS]  # fmt: skip


def dashboard_exprs() -> list[str]:
    return [expr for _, _, targets in panels() for expr, _ in targets]


def alert_threshold(alert: str) -> float:
    """The value an alert of the rendered rules compares its signal with (`expr: <signal> < 0.9`)."""
    rules = yaml.safe_load(templated_text(RULES_TEMPLATE))
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    return float(re.fullmatch(r".*[<>]=?\s*([0-9.eE+-]+)", expr.strip(), re.S)[1])


def field_defaults(title: str, unit: str) -> dict:
    """A panel's unit, and its alert's threshold as a dashed red line where PANEL_ALERTS names one."""
    if title not in PANEL_ALERTS:
        return {"unit": unit}
    steps = [{"color": "green", "value": None}, {"color": "red", "value": alert_threshold(PANEL_ALERTS[title])}]
    return {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
            "custom": {"thresholdsStyle": {"mode": "dashed"}}}  # fmt: skip


def dashboard() -> dict:
    out = []
    for i, (title, unit, targets) in enumerate(panels()):
        out.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": field_defaults(title, unit), "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "prometheus"}}
                        for j, (expr, legend) in enumerate(targets)],
        })  # fmt: skip
    return {
        "uid": "servable-overview", "title": "Servable: inference services", "tags": ["servable"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "timezone": "utc", "panels": out,
        "annotations": {"list": []}, "templating": {"list": []},
    }  # fmt: skip


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


PROMETHEUS_YML = Path(__file__).resolve().parent / "prometheus" / "prometheus.yml"
PROMETHEUS_HEAD = """# Generated by `python -m deploy.render` from SERVED_MODELS in servable/config.py (do not edit
# by hand; tests/test_deploy_static.py fails when it is stale). One file for compose and the local stack.
# Replica targets come from file_sd files beside this file (targets/*.json, paths relative to it):
# compose mounts deploy/prometheus/targets/compose-{gpu,cpu}/ (DNS names), the local stack writes
# 127.0.0.1 ports. Every replica is its own target: all processes of one replica share one /metrics
# (BentoML's multi-process collector).
global:
  scrape_interval: 5s
  scrape_timeout: 4s
  evaluation_interval: 5s
  external_labels:
    system: servable

rule_files:
  - rules/*.yml

# Firing alerts go to Alertmanager (compose: the `alertmanager` service, targets/alertmanager.json;
# deploy/alertmanager/alertmanager.yml says who is paged). Without a target file nothing is sent.
alerting:
  alertmanagers:
    - file_sd_configs:
        - files: [targets/alertmanager*.json]
          refresh_interval: 30s

scrape_configs:
"""
PROMETHEUS_TAIL = """  # NVIDIA DCGM exporter (GPU deployments only; the CPU variants list no target here).
  - job_name: dcgm
    file_sd_configs:
      - files: [targets/dcgm*.json]
        refresh_interval: 30s
  - job_name: prometheus
    file_sd_configs:
      - files: [targets/prometheus*.json]
        refresh_interval: 30s
"""


def prometheus_text() -> str:
    """prometheus.yml: one scrape job per served model (servable-<kind>, targets/<kind>*.json)."""
    jobs = "".join(
        f"  - job_name: servable-{kind}\n    metrics_path: /metrics\n    file_sd_configs:\n"
        f"      - files: [targets/{kind}*.json]\n        refresh_interval: 10s\n"
        for kind in SERVED_MODELS
    )
    return PROMETHEUS_HEAD + jobs + PROMETHEUS_TAIL


# Compose runs this many replicas of each served model, named <kind>-1, <kind>-2 (deploy/compose.yaml).
COMPOSE_REPLICAS = 2
COMPOSE_TARGETS = DEPLOY / "prometheus" / "targets"


def compose_target_text(kind: str) -> str:
    """targets/compose-{gpu,cpu}/<kind>.json: the model's compose replicas, by the names compose gives them."""
    replicas = [f"{kind}-{i + 1}:3000" for i in range(COMPOSE_REPLICAS)]
    return json.dumps([{"targets": replicas, "labels": {"service": kind}}]) + "\n"


def compose_targets() -> dict[Path, object]:
    return {COMPOSE_TARGETS / f"compose-{variant}" / f"{kind}.json": (lambda k=kind: compose_target_text(k))
            for variant in ("gpu", "cpu") for kind in SERVED_MODELS}  # fmt: skip


# ---------------------------------------------------------------- files filled from a template


def templated_text(template: Path) -> str:
    """A *.template file with its ${NAME} placeholders (selector_values) filled, under a header
    saying where it comes from: edit the template, then run `python -m deploy.render`."""
    head = (
        f"# Generated from {template.relative_to(DEPLOY.parent)}\n"
        "# and SERVED_MODELS (servable/config.py) by `python -m deploy.render`: do not edit by hand\n"
        "# (`python -m deploy.render --check` fails when it is stale).\n"
    )
    return head + render_template(template.read_text(), selector_values())


# ---------------------------------------------------------------- Kubernetes base (kustomize)

K8S_BASE = DEPLOY / "k8s" / "base"
K8S_MODEL_TEMPLATE = K8S_BASE / "model.yaml.template"  # one model's Deployment, Service, PDB, HPA
K8S_INGRESS_TEMPLATE = K8S_BASE / "ingress.yaml.template"  # one model's Ingress
K8S_INGRESS = K8S_BASE / "ingress.yaml"  # generated: every model's Ingress
K8S_KUSTOMIZATION = K8S_BASE / "kustomization.yaml"  # generated: the base's resources
K8S_NETWORK_POLICY = K8S_BASE / "networkpolicy.yaml"  # who may reach the replicas (written by hand)


def _template_body(template: Path) -> str:
    """A template's text without its own notes (lines starting "#:")."""
    return "".join(line for line in template.read_text().splitlines(keepends=True) if not line.startswith("#:"))


def _generated_from(*templates: Path) -> str:
    names = " and ".join(str(t.relative_to(DEPLOY.parent)) for t in templates)
    return (
        f"# Generated from {names}\n"
        "# and SERVED_MODELS (servable/config.py) by `python -m deploy.render`: do not edit by hand\n"
        "# (`python -m deploy.render --check` fails when it is stale).\n"
    )


# The public name of the Ingress (its rules and its certificate): replace it with your own in an
# overlay (docs/deploy.md#kubernetes). ingress-nginx serves an Ingress' certificate only for the
# hosts named in its rules, so the Ingress names one.
K8S_HOST = "servable.example.com"
K8S_TLS_SECRET = "servable-tls"  # a kubernetes.io/tls Secret the user creates (or cert-manager fills)
K8S_CONTROLLER_TEMPLATE = DEPLOY / "k8s" / "ingress-nginx" / "controller-config.yaml.template"
K8S_CONTROLLER_CONFIG = K8S_CONTROLLER_TEMPLATE.with_suffix("")  # generated: the controller's ConfigMap
# The compose proxy's 429 location, under a name no other Ingress of the controller uses.
K8S_RATE_LIMITED = "@servable_rate_limited"


def nginx_tree(text: str) -> list[tuple[str, list | None]]:
    """nginx configuration text as a tree: (statement, children) with children None for a simple
    statement; comments dropped, whitespace normalised, quotes kept as written."""
    root: list = []
    stack, cur, quote = [root], "", ""
    text = _PLACEHOLDER.sub(r"@\1@", text)  # ${NAME} placeholders hold braces: kept, restored below
    for line in text.splitlines():
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in ";{}":
                head = re.sub(r"@([A-Z][A-Z0-9_]*)@", r"${\1}", " ".join(cur.split()))
                cur = ""
                if ch == ";":
                    stack[-1].append((head, None))
                elif ch == "{":
                    children: list = []
                    stack[-1].append((head, children))
                    stack.append(children)
                else:
                    stack.pop()
                continue
            cur += ch
        cur += " "
    return root


def nginx_text(tree: list[tuple[str, list | None]], indent: str = "") -> str:
    """A tree of nginx_tree back as configuration text."""
    out = []
    for head, children in tree:
        if children is None:
            out.append(f"{indent}{head};\n")
        else:
            out.append(f"{indent}{head} {{\n{nginx_text(children, indent + '    ')}{indent}}}\n")
    return "".join(out)


def nginx_api_server(tree: list[tuple[str, list | None]]) -> list[tuple[str, list | None]]:
    """The API's server block (the one listening with TLS) of the template's tree."""
    (server,) = [c for h, c in tree if h == "server" and any(s.startswith("listen ") and s.endswith(" ssl")
                                                             for s, _ in c)]  # fmt: skip
    return server


def _controller_request_id(text: str) -> str:
    """ingress-nginx's request id is $req_id (the client's X-Request-ID, else nginx's $request_id)."""
    return text.replace("$request_id", "$req_id")


def k8s_http_snippet() -> str:
    """The controller's http-snippet: the compose proxy's maps (the per-key limit's key, the page
    policy, the playground paths, the query allowlist) and its per-key zones, at their defaults."""
    keep = [(h, c) for h, c in nginx_tree(NGINX_TEMPLATE.read_text()) if h.startswith(("map ", "limit_req_zone "))]
    models = [(h, c) for h, c in nginx_tree(nginx_models_text()) if h.startswith("map ")]
    query = nginx_tree(nginx_query_text())
    return render_template(
        nginx_text(keep + models + query), {"RATE_LIMIT": RATE_LIMIT, "EXPLAIN_RATE_LIMIT": EXPLAIN_RATE_LIMIT}
    )


def k8s_server_snippet() -> str:
    """The controller's server-snippet: the compose proxy's 429 location (JSON body, Retry-After,
    the security headers), named for Servable's Ingresses to send their 429s to."""
    server = nginx_api_server(nginx_tree(NGINX_TEMPLATE.read_text()))
    (block,) = [c for h, c in server if h == "location @rate_limited"]
    return _controller_request_id(nginx_text([(f"location {K8S_RATE_LIMITED}", block)]))


def k8s_location_snippet(route: str) -> str:
    """The configuration-snippet of the Ingress routing `route`: what the compose proxy's API server
    does before a request reaches a replica: the query refusal, the one-credential refusal, the JSON
    default type, the rate limits of that route's own location (the per-key one; an explain route's
    explain budget too) with their 429 location, the security headers (Strict-Transport-Security is
    the controller's own, hsts in its ConfigMap); the same statements, read from the nginx templates."""
    server = nginx_api_server(nginx_tree(NGINX_TEMPLATE.read_text()))
    wanted = ("if ($servable_query_refused)", "if ($servable_two_credentials)", "default_type ", "limit_req_status ",
              "limit_req_log_level ", "add_header ")  # fmt: skip
    out = []
    for head, children in server:
        if head.startswith("add_header Strict-Transport-Security"):
            continue
        if head.startswith(wanted):
            out.append((head, children))
        elif head == "error_page 429 @rate_limited":
            out.append((f"error_page 429 {K8S_RATE_LIMITED}", None))
    (location,) = [c for h, c in nginx_tree(nginx_routes_text()) if h == f"location = {route}"]
    out += [(h, None) for h, _ in location if h.startswith("limit_req ")]
    bursts = {"RATE_BURST": str(RATE_BURST), "EXPLAIN_RATE_BURST": str(EXPLAIN_RATE_BURST)}
    return _controller_request_id(render_template(nginx_text(out), bursts))


def _indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


def k8s_controller_config_text() -> str:
    """deploy/k8s/ingress-nginx/controller-config.yaml: the template with the snippets filled."""
    return _generated_from(K8S_CONTROLLER_TEMPLATE) + render_template(_template_body(K8S_CONTROLLER_TEMPLATE), {
        "HTTP_SNIPPET": _indented(k8s_http_snippet(), 4).rstrip("\n"),
        "SERVER_SNIPPET": _indented(k8s_server_snippet(), 4).rstrip("\n"),
    })  # fmt: skip


def k8s_values(entry: ServedModelEntry, explain: bool = False) -> dict[str, str]:
    """The placeholders of the Kubernetes templates for one served model; with explain, those of its
    explain Ingress (its explain routes, under the explain budget as well as the per-key limit)."""
    _alternation([entry.route])  # the route goes into the Ingress' path regex unescaped
    route = entry.route + "/explain" if explain else entry.route
    return {
        "KIND": _kind_name(entry.kind),
        "ENV_PREFIX": entry.env_prefix,
        "MODEL_TAG": str(entry.settings.model_fields["model_tag"].default),
        "ROUTE": entry.route,
        "INGRESS": f"servable-{entry.kind}-explain" if explain else f"servable-{entry.kind}",
        # the Ingress' two paths: /(<ROUTE_PATHS>)$ and /<kind>/(<PREFIX_PATHS>)$, to /$1
        "ROUTE_PATHS": route.removeprefix("/"),
        "PREFIX_PATHS": route.removeprefix("/") if explain else r"info|docs\.json|v2|v2/.*",
        "BODY_LIMIT": body_limit(entry),
        "CONN_LIMIT": str(CONN_LIMIT),
        "HOST": K8S_HOST,
        "TLS_SECRET": K8S_TLS_SECRET,
        "LOCATION_SNIPPET": _indented(k8s_location_snippet(route), 6).rstrip("\n"),
    }


def k8s_model_text(kind: str) -> str:
    """deploy/k8s/base/<kind>.yaml: model.yaml.template filled for one served model."""
    return _generated_from(K8S_MODEL_TEMPLATE) + render_template(
        _template_body(K8S_MODEL_TEMPLATE), k8s_values(SERVED_MODELS[kind])
    )


K8S_INGRESS_HEAD = """# Public entry (ingress-nginx), one Ingress per service so each carries its own body limit, and
# one per service's explain routes, which carry the explain budget too; the routes are those of
# deploy/nginx/servable.conf.template: POST ${ROUTES}, their /explain, and under ${PREFIXES}
# (prefix stripped) the explain route, the model info, the OpenAPI document and every V2 route.
# Not exposed, unlike the compose proxy: /<kind>/readyz, /livez and the other BentoML health and
# docs pages (the kubelet probes the pods directly); /metrics is never exposed (Prometheus scrapes
# the pods; networkpolicy.yaml lets only it and the controller reach them). HTTPS only, with the
# certificate of Secret ${TLS_SECRET} for host ${HOST} (replace both: docs/deploy.md#kubernetes).
# Per-Ingress settings are annotations; the controller-wide ones (client header and body timeouts,
# keep-alive bounds, header buffers, TLS versions, HSTS, X-Forwarded-For, the 429s, the per-key
# zones and the maps the snippets use) are in deploy/k8s/ingress-nginx/controller-config.yaml, which the controller's
# operator applies.
"""


def k8s_ingress_text() -> str:
    """deploy/k8s/base/ingress.yaml: ingress.yaml.template filled for every served model."""
    head = render_template(K8S_INGRESS_HEAD, {
        "ROUTES": ", ".join(e.route for e in SERVED_MODELS.values()),
        "PREFIXES": ", ".join(f"/{kind}/" for kind in SERVED_MODELS),
        "TLS_SECRET": K8S_TLS_SECRET,
        "HOST": K8S_HOST,
    })  # fmt: skip
    body = _template_body(K8S_INGRESS_TEMPLATE)
    docs = [render_template(body, k8s_values(entry, explain)) for entry in SERVED_MODELS.values()
            for explain in (False, True)]  # fmt: skip
    return _generated_from(K8S_INGRESS_TEMPLATE) + head + "---\n".join(docs)


def k8s_kustomization_text() -> str:
    """deploy/k8s/base/kustomization.yaml: every model's manifest and the Ingress."""
    resources = "".join(f"  - {kind}.yaml\n" for kind in SERVED_MODELS)
    return (
        _generated_head("Per model: <kind>.yaml from model.yaml.template.")
        + "# Servable on Kubernetes: shared base; apply an overlay (overlays/gpu or overlays/cpu), not this.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "labels:\n"
        "  - pairs:\n"
        "      app.kubernetes.io/part-of: servable\n"
        "    includeSelectors: false\n"
        "resources:\n" + resources + f"  - {K8S_INGRESS.name}\n  - {K8S_NETWORK_POLICY.name}\n"
    )


def k8s_models() -> dict[Path, object]:
    return {K8S_BASE / f"{kind}.yaml": (lambda k=kind: k8s_model_text(k)) for kind in SERVED_MODELS}


# ---------------------------------------------------------------- Kubernetes canary (a kustomize component per model)

K8S_COMPONENTS = DEPLOY / "k8s" / "components"
K8S_CANARY_IMAGE = "servable-canary"  # the canary Deployment's image name: a release sets it (deploy/release.py)
CANARY_TRACK = "servable.dev/track"  # the label that tells a canary's objects apart (`kubectl delete -l`)


def k8s_canary_name(kind: str) -> str:
    """The canary's Deployment, Service and pod label app.kubernetes.io/name: not the stable Service's
    selector (servable-<kind>), which would otherwise send its traffic to the canary's pods as well."""
    return f"servable-{_kind_name(kind)}-canary"


def k8s_canary_docs(kind: str) -> list[dict]:
    """One model's canary: its Deployment and Service (the base's, renamed, one replica, the image
    K8S_CANARY_IMAGE) and an ingress-nginx canary Ingress beside each of its Ingresses (same host and
    paths, to the canary Service, `canary-weight` percent of the requests; 0 until a release sets it)."""
    name, track = k8s_canary_name(kind), {CANARY_TRACK: "canary"}
    out = []
    for doc in yaml.safe_load_all(k8s_model_text(kind)):
        if doc["kind"] == "Deployment":
            doc["metadata"]["name"] = name
            doc["metadata"]["labels"] |= {"app.kubernetes.io/name": name, **track}
            doc["spec"]["replicas"] = 1
            doc["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": name}
            doc["spec"]["template"]["metadata"]["labels"] |= {"app.kubernetes.io/name": name, **track}
            doc["spec"]["template"]["spec"]["containers"][0]["image"] = K8S_CANARY_IMAGE
        elif doc["kind"] == "Service":
            doc["metadata"] |= {"name": name, "labels": {"app.kubernetes.io/name": name, **track}}
            doc["spec"]["selector"] = {"app.kubernetes.io/name": name}
        else:
            continue  # no disruption budget or autoscaler: one replica while the canary lasts
        out.append(doc)
    for doc in yaml.safe_load_all(k8s_ingress_text()):
        if not doc or doc["metadata"]["name"] not in (f"servable-{kind}", f"servable-{kind}-explain"):
            continue
        doc["metadata"]["name"] += "-canary"
        doc["metadata"]["labels"] = dict(track)
        doc["metadata"]["annotations"] = {
            "nginx.ingress.kubernetes.io/canary": "true",
            "nginx.ingress.kubernetes.io/canary-weight": "0",
            **doc["metadata"]["annotations"],
        }
        for rule in doc["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                path["backend"]["service"]["name"] = name
        out.append(doc)
    return out


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the Ingress' snippets) as YAML block literals, as the templates write them."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                  style="|" if "\n" in s else None))  # fmt: skip


def k8s_canary_texts(kind: str) -> dict[str, str]:
    """components/canary-<kind>/: kustomization.yaml (kind: Component) and canary.yaml."""
    head = _generated_head(f"The canary of {kind}: a kustomize component (docs/releasing.md).")
    return {
        "kustomization.yaml": head + "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n"
        "resources:\n  - canary.yaml\n",
        "canary.yaml": head
        + "---\n".join(yaml.dump(d, Dumper=_BlockDumper, sort_keys=False, width=120) for d in k8s_canary_docs(kind)),
    }


def k8s_canaries() -> dict[Path, object]:
    return {K8S_COMPONENTS / f"canary-{kind}" / name: (lambda k=kind, n=name: k8s_canary_texts(k)[n])
            for kind in SERVED_MODELS for name in ("kustomization.yaml", "canary.yaml")}  # fmt: skip


# ---------------------------------------------------------------- compose: generated regions of hand-written files

# compose.yaml, compose.gpu.yaml and compose_prep.sh stay one file each (the same `docker compose -f`
# commands, YAML anchors shared with the hand-written parts); their per-model parts sit between
# marker comments and are rewritten here:
#   # >>> generated: <name> (python -m deploy.render, from SERVED_MODELS: do not edit by hand)
#   # <<< generated: <name>
COMPOSE_YML = DEPLOY / "compose.yaml"
COMPOSE_GPU_YML = DEPLOY / "compose.gpu.yaml"
COMPOSE_DEBIAN_IMAGES = DEPLOY / "podman" / "compose.debian-images.yaml"
# the replica image deploy/podman/images.sh builds
PODMAN_SERVABLE_IMAGE = "localhost/servable:cpu"
COMPOSE_PREP = DEPLOY / "compose_prep.sh"
_REGION = re.compile(
    r"(?P<start>^(?P<indent>[ \t]*)# >>> generated: (?P<name>[\w-]+)\b[^\n]*\n)(?P<body>.*?)"
    r"(?P<end>^(?P=indent)# <<< generated: (?P=name)\n)",
    re.M | re.S,
)


def fill_regions(path: Path, regions: Mapping[str, str]) -> str:
    """path's text with the body of each marked region replaced by regions[name]; every region
    named must be marked in the file, and every marked region named."""
    text = path.read_text()
    found = [m["name"] for m in _REGION.finditer(text)]
    if sorted(found) != sorted(regions):
        raise KeyError(f"{path.name}: marked regions {found}, generated ones {sorted(regions)}")
    return _REGION.sub(lambda m: m["start"] + regions[m["name"]] + m["end"], text)


def compose_replicas(kind: str) -> list[str]:
    """Compose's replica services of one served model: <kind>-1, <kind>-2."""
    return [f"{_kind_name(kind)}-{i + 1}" for i in range(COMPOSE_REPLICAS)]


def _default(entry: ServedModelEntry, field: str) -> str:
    return str(entry.settings.model_fields[field].default)


# The model settings compose passes to every replica, as ${<env_prefix><FIELD>:-<default>}
# (docs/deploy.md#compose-variables lists each); the others take their defaults.
COMPOSE_MODEL_SETTINGS = ("model_tag", "variant", "device")
# The replicas' key file, in the secrets directory compose mounts (deploy/secrets/api/, read-only): a
# directory, not a file secret, so a key file replaced on the host (mv, sed -i) is seen inside.
COMPOSE_KEYS_FILE = "/run/secrets/servable/api_keys"


def compose_regions() -> dict[str, str]:
    """compose.yaml's per-model parts: each model's environment block, its replicas, nginx's pools
    and what nginx and Prometheus wait for."""
    env = []
    for kind, entry in SERVED_MODELS.items():
        lines = [f"x-{_kind_name(kind)}-env: &{kind}-env\n", f"  SERVABLE_SERVICE: {kind}\n"]
        for field in COMPOSE_MODEL_SETTINGS:
            var = f"{entry.env_prefix}{field.upper()}"
            lines.append(f"  {var}: ${{{var}:-{_default(entry, field)}}}\n")
        lines.append(f"  SERVABLE_AUTH_KEYS_FILE: {COMPOSE_KEYS_FILE}\n")
        # Replicas are reached only through nginx, which sets X-Forwarded-For to the client's address:
        # uvicorn takes it as the client (failed authentications are limited per client address).
        lines.append('  FORWARDED_ALLOW_IPS: "*"\n')
        env.append("".join(lines))
    replicas = "".join(f"  {name}:\n    <<: *replica\n    environment: *{kind}-env\n"
                       for kind in SERVED_MODELS for name in compose_replicas(kind))  # fmt: skip
    pools = "".join(
        f'      {upstream_var(kind)}: "{compose_stable_servers(kind)}"\n'
        # a canary's replica: the file deploy/release.py writes (none matches the pattern: no canary)
        f'      {canary_var(kind)}: "include {COMPOSE_POOLS_MOUNT}/{kind}-canary*.conf;"\n'
        for kind in SERVED_MODELS
    )
    healthy = "".join(
        f"      {r}: {{condition: service_healthy}}\n" for k in SERVED_MODELS for r in compose_replicas(k)
    )
    return {"model-env": "\n".join(env), "replicas": replicas, "nginx-upstreams": pools,
            "nginx-depends-on": healthy, "prometheus-depends-on": healthy}  # fmt: skip


def compose_gpu_regions() -> dict[str, str]:
    """compose.gpu.yaml: every replica takes the GPU settings."""
    return {"replicas": "".join(f"  {r}:\n    <<: *gpu\n" for k in SERVED_MODELS for r in compose_replicas(k))}


def compose_debian_images_regions() -> dict[str, str]:
    """podman/compose.debian-images.yaml: every replica on the locally built image."""
    return {"replicas": "".join(f"  {r}:\n    image: {PODMAN_SERVABLE_IMAGE}\n"
                                for k in SERVED_MODELS for r in compose_replicas(k))}  # fmt: skip


def compose_prep_regions() -> dict[str, str]:
    """compose_prep.sh: the tags compose will serve, checked in the model store."""
    tags = " ".join(f'"${{{e.env_prefix}MODEL_TAG:-{_default(e, "model_tag")}}}"' for e in SERVED_MODELS.values())
    names = " ".join(_default(e, "model_tag").split(":")[0] for e in SERVED_MODELS.values())
    return {"model-tags": f'tags=({tags})\nnames="{names}"\n'}


GENERATED = {
    DASHBOARD_JSON: dashboard_text,
    PROMETHEUS_YML: prometheus_text,
    NGINX_QUERY: nginx_query_text,
    NGINX_MODELS: nginx_models_text,
    NGINX_ROUTES: nginx_routes_text,
    RULES_YML: lambda: templated_text(RULES_TEMPLATE),
    ADAPTER_RULES: lambda: templated_text(ADAPTER_TEMPLATE),
    K8S_INGRESS: k8s_ingress_text,
    K8S_KUSTOMIZATION: k8s_kustomization_text,
    K8S_CONTROLLER_CONFIG: k8s_controller_config_text,
    COMPOSE_YML: lambda: fill_regions(COMPOSE_YML, compose_regions()),
    COMPOSE_GPU_YML: lambda: fill_regions(COMPOSE_GPU_YML, compose_gpu_regions()),
    COMPOSE_DEBIAN_IMAGES: lambda: fill_regions(COMPOSE_DEBIAN_IMAGES, compose_debian_images_regions()),
    COMPOSE_PREP: lambda: fill_regions(COMPOSE_PREP, compose_prep_regions()),
}


def generated() -> dict[Path, object]:
    """Every generated file -> the function writing its text, for the current SERVED_MODELS."""
    return {**GENERATED, **compose_targets(), **k8s_models(), **k8s_canaries()}


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = [path for path, text in generated().items() if not path.exists() or path.read_text() != text()]
        for path in stale:
            print(f"{path} is stale: run python -m deploy.render", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
