"""Kubernetes as locked down as compose (issue #25, point 6).

The Ingress and the ingress-nginx controller's ConfigMap against the compose proxy's nginx files,
setting by setting (each read from deploy/nginx/, never from a copy); the same statements run in
a real nginx laid out as the controller lays them out; the NetworkPolicy evaluated for who may
reach a replica; the release overlay pinned by digest.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote

import pytest
import requests
import yaml

from deploy import k8s_release, render
from deploy.launch import free_port
from servable.config import SERVED_MODELS
from tests.test_deploy_static import _ingress_route, run, tool

ANN = "nginx.ingress.kubernetes.io/"
HSTS = "Strict-Transport-Security"


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    """The CPU overlay as kustomize renders it (the GPU one shares the base: test_k8s_manifests)."""
    out = run([tool("kubectl"), "kustomize", str(render.DEPLOY / "k8s" / "overlays" / "cpu")])
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


@pytest.fixture(scope="module")
def controller() -> dict[str, str]:
    return yaml.safe_load(render.K8S_CONTROLLER_CONFIG.read_text())["data"]


def _ingresses(rendered) -> list[dict]:
    found = [d for (kind, _), d in rendered.items() if kind == "Ingress"]
    assert len(found) == 2 * len(SERVED_MODELS)  # per model: its routes, its explain routes
    return found


def _ingress_paths(ingress: dict) -> list[str]:
    return [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]


def _probe(location: str) -> str:
    """A URI a location of servable-routes.inc handles: `location = /x` -> /x, `location /kind/` -> /kind/info."""
    uri = location.split()[-1]
    return uri + "info" if uri.endswith("/") else uri


def _nginx_server():
    """The compose proxy's API server block and its http-level statements, from deploy/nginx/."""
    template = render.nginx_tree(render.NGINX_TEMPLATE.read_text())
    return render.nginx_api_server(template), template


def _block(tree, head: str):
    (children,) = [c for h, c in tree if h == head]
    return children


def _heads(tree, prefix: str) -> list[str]:
    return [h for h, c in tree if h.startswith(prefix) and c is None]


def _controller_ids(tree):
    """nginx's $request_id is the controller's $req_id (the client's X-Request-ID, else nginx's)."""
    return [(h.replace("$request_id", "$req_id"), _controller_ids(c) if c else c) for h, c in tree]


def _headers(tree) -> dict[str, str]:
    return {h.split()[1]: h.split(" ", 2)[2] for h in _heads(tree, "add_header ")}


def test_ingress_matches_the_nginx_proxy_setting_by_setting(rendered, controller):
    """Every protection of the compose proxy's API server is on each Ingress (its annotations and
    configuration-snippet) or the controller's ConfigMap, with the same value: TLS and the redirect,
    the security headers, the query refusal, the one-credential refusal, the rate limits of each
    proxied location (the per-key limit; on the explain routes the explain budget too) and their
    429, the per-address connection limit, the proxy timeouts and retries. Every proxied location
    of the compose proxy is routed by exactly one Ingress, which applies that location's limits."""
    server, http = _nginx_server()
    query = render.nginx_tree(render.NGINX_QUERY.read_text())
    routes = render.nginx_tree(render.NGINX_ROUTES.read_text())
    models = render.nginx_tree(render.NGINX_MODELS.read_text())
    fill = {
        "${RATE_LIMIT}": render.RATE_LIMIT,
        "${RATE_BURST}": str(render.RATE_BURST),
        "${EXPLAIN_RATE_LIMIT}": render.EXPLAIN_RATE_LIMIT,
        "${EXPLAIN_RATE_BURST}": str(render.EXPLAIN_RATE_BURST),
    }

    def filled(head: str) -> str:
        for name, value in fill.items():
            head = head.replace(name, value)
        return head

    http_snippet = render.nginx_tree(controller["http-snippet"])
    server_snippet = render.nginx_tree(controller["server-snippet"])
    # snippet annotations are read at all only with these
    assert controller["allow-snippet-annotations"] == "true" and controller["annotations-risk-level"] == "Critical"
    # the maps (per-key limit key, page policy, playground paths, query allowlist) and the per-key zones
    for head, children in [*http, *models, *query]:
        if head.startswith("map "):
            assert _block(http_snippet, head) == children, head
    zones = [filled(h) for h in _heads(http, "limit_req_zone ")]
    assert zones and zones == _heads(http_snippet, "limit_req_zone ")
    # the 429 location: the same JSON answers, Retry-After and headers (HSTS included: no Lua header filter there)
    rate_limited = _controller_ids(_block(server, "location @rate_limited"))
    assert _block(server_snippet, f"location {render.K8S_RATE_LIMITED}") == rate_limited
    assert controller["limit-req-status-code"] == controller["limit-conn-status-code"] == "429"
    hsts = _headers(server)[HSTS].removesuffix(" always").strip('"')
    locations = [(h, c) for h, c in routes if c and _heads(c, "proxy_pass ")]
    routed_by = {h: [] for h, _ in locations}
    for ing in _ingresses(rendered):
        name, ann = ing["metadata"]["name"], ing["metadata"]["annotations"]
        snippet = render.nginx_tree(ann[ANN + "configuration-snippet"])
        # TLS: a certificate for every host it serves; plain HTTP only redirects (code and protocols as nginx)
        (tls,) = ing["spec"]["tls"]
        assert tls["secretName"] and {r["host"] for r in ing["spec"]["rules"]} <= set(tls["hosts"]), name
        assert ann[ANN + "ssl-redirect"] == ann[ANN + "force-ssl-redirect"] == "true", name
        # security headers: the server's, with HSTS from the controller (its Lua header filter, every HTTPS answer)
        headers = _headers(_controller_ids(server))
        assert hsts == f"max-age={controller['hsts-max-age']}; includeSubDomains" and controller["hsts"] == "true"
        assert controller["hsts-include-subdomains"] == "true" and controller["hsts-preload"] == "false"
        assert _headers(snippet) == {k: v for k, v in headers.items() if k != HSTS}, name
        # the query allowlist's refusal, and the JSON type of the answers nginx writes itself
        for refusal in ("if ($servable_query_refused)", "if ($servable_two_credentials)"):
            assert _block(snippet, refusal) == _block(server, refusal), (name, refusal)
        for prefix in ("default_type ", "limit_req_status ", "limit_req_log_level "):
            assert _heads(snippet, prefix) == _heads(server, prefix), (name, prefix)
        assert _heads(snippet, "error_page 429 ") == [f"error_page 429 {render.K8S_RATE_LIMITED}"]
        # the rate limits of each compose location this Ingress routes (the explain budget on explain routes)
        paths, target = _ingress_paths(ing), ann[ANN + "rewrite-target"]
        served = [(h, c) for h, c in locations if _ingress_route(paths, target, _probe(h))]
        assert served, name
        for head, children in served:
            routed_by[head].append(name)
            limits = [filled(h) for h in _heads(children, "limit_req ")]
            assert limits and _heads(snippet, "limit_req ") == limits, (name, head)
        # per-address connection limit, timeouts, retries: the server's values as annotations
        (conn,) = [h.split()[-1] for h in _heads(server, "limit_conn ")]
        assert conn == "${CONN_LIMIT}" and ann[ANN + "limit-connections"] == str(render.CONN_LIMIT)
        for directive in ("proxy_connect_timeout", "proxy_read_timeout", "proxy_send_timeout",
                          "proxy_next_upstream_timeout"):  # fmt: skip
            (value,) = [h.split()[1] for h in _heads(server, directive + " ")]
            assert ann[ANN + directive.replace("_", "-")] + "s" == value, (name, directive)
        for directive in ("proxy_next_upstream", "proxy_next_upstream_tries"):
            (value,) = [h.split(" ", 1)[1] for h in _heads(server, directive + " ")]
            assert ann[ANN + directive.replace("_", "-")] == value, (name, directive)
    assert all(len(names) == 1 for names in routed_by.values()), routed_by
    assert any("zone=servable_explain_per_key " in h for _, c in locations for h in _heads(c, "limit_req "))
    (protocols,) = [h.split(" ", 1)[1] for h in _heads(server, "ssl_protocols ")]
    assert controller["ssl-protocols"] == protocols
    assert _heads(server, "ssl_session_tickets ") == ["ssl_session_tickets off"] and controller[
        "ssl-session-tickets"] == "false"  # fmt: skip
    redirects = [r for h, c in http if h == "server" for _, lc in c if lc for r in _heads(lc, "return ")]
    assert [r.split()[1] for r in redirects if r.startswith("return 30")] == [controller["http-redirect-code"]]
    assert "server_tokens off" in _heads(http, "server_tokens") and controller["server-tokens"] == "false"


def test_the_ingress_routes_neither_metrics_nor_probes(rendered):
    """/metrics (with its key names) is reachable only where the NetworkPolicy lets Prometheus in:
    no Ingress path routes it, nor the probes, at any prefix."""
    for ing in _ingresses(rendered):
        paths = _ingress_paths(ing)
        target = ing["metadata"]["annotations"][ANN + "rewrite-target"]
        tricks = ("metrics", "v2/../metrics", "v2/%2e%2e/metrics", "readyz")
        for path in ("/metrics", "/metrics/", "/readyz", "/livez", "/healthz", "/docs",
                     *(f"/{k}/{p}" for k in SERVED_MODELS for p in tricks),
                     *(f"{e.route}/metrics" for e in SERVED_MODELS.values())):  # fmt: skip
            # nginx matches locations against the decoded, normalised URI ($uri: no dot segments)
            uri = posixpath.normpath(unquote(path)) + ("/" if path.endswith("/") else "")
            routed = _ingress_route(paths, target, uri)
            assert routed is None or ("metrics" not in routed and routed.strip("/") not in ("readyz", "livez")), path


# ---------------------------------------------------------------- NetworkPolicy, evaluated

CONTROLLER = ({"kubernetes.io/metadata.name": "ingress-nginx"},
              {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"})  # fmt: skip
PROMETHEUS = ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"})


def _selects(selector: dict | None, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, values, op = e["key"], e.get("values") or [], e["operator"]
        has = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
               "Exists": key in labels, "DoesNotExist": key not in labels}[op]  # fmt: skip
        if not has:
            return False
    return True


def _admitted(policies: list[dict], pod: dict, port: int, source: tuple[dict, dict], namespace: str) -> bool:
    """Kubernetes' NetworkPolicy semantics for ingress to `pod` (its namespace `namespace`) on
    `port` from a pod of namespace labels and pod labels `source`: isolated when any policy with
    policyType Ingress selects it, then allowed when some rule's peer and port match."""
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    labels = pod["metadata"]["labels"]
    selecting = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]  # fmt: skip
    if not selecting:
        return True
    ns_labels, pod_labels = source
    for spec in selecting:
        for rule in spec.get("ingress", []):
            port_ok = not rule.get("ports") or any(ports.get(p["port"], p["port"]) == port for p in rule["ports"])
            for peer in rule.get("from", [{}]) if "from" in rule else [{}]:
                same_ns = ns_labels.get("kubernetes.io/metadata.name") == namespace
                ns_ok = _selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else same_ns
                pod_ok = _selects(peer.get("podSelector"), pod_labels) if "ipBlock" not in peer else False
                if port_ok and ns_ok and pod_ok:
                    return True
    return False


def test_network_policy_admits_only_the_ingress_controller_and_prometheus(rendered):
    """Every replica is isolated: the Ingress controller and Prometheus reach its http port; a pod
    of its own namespace, of another namespace, one labelled like Prometheus in the wrong namespace
    or the controller's namespace without its labels, and any other port are refused; and the
    namespace denies by default (a pod added later is isolated too), ingress and egress."""
    policies = [d for (kind, _), d in rendered.items() if kind == "NetworkPolicy"]
    pods = [d["spec"]["template"] | {"metadata": d["spec"]["template"]["metadata"]}
            for (kind, _), d in rendered.items() if kind == "Deployment"]  # fmt: skip
    assert len(pods) == len(SERVED_MODELS)
    namespace = next(iter(rendered.values()))["metadata"]["namespace"]
    for pod in pods:
        (port,) = [p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]]
        assert _admitted(policies, pod, port, CONTROLLER, namespace)
        assert _admitted(policies, pod, port, PROMETHEUS, namespace)
        for stranger in (({"kubernetes.io/metadata.name": namespace}, {"app": "debug"}),
                         ({"kubernetes.io/metadata.name": namespace}, pod["metadata"]["labels"]),
                         ({"kubernetes.io/metadata.name": "default"}, {}),
                         ({"kubernetes.io/metadata.name": "default"}, PROMETHEUS[1]),
                         (CONTROLLER[0], {"app.kubernetes.io/name": "something-else"})):  # fmt: skip
            assert not _admitted(policies, pod, port, stranger, namespace), stranger
        assert not _admitted(policies, pod, port + 1, CONTROLLER, namespace)
    other = {"metadata": {"labels": {"app": "added-later"}}, "spec": {"containers": [{"ports": []}]}}
    assert not _admitted(policies, other, 80, CONTROLLER, namespace)  # default deny
    (deny,) = [p["spec"] for p in policies if p["spec"]["podSelector"] == {}]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"} and not deny.get("ingress") and not deny.get("egress")
    # egress: the cluster DNS only (compose's replicas have no route out)
    egress = [r for p in policies for r in p["spec"].get("egress", [])]
    assert {p["port"] for r in egress for p in r["ports"]} == {53}


def test_replicas_take_the_client_address_the_controller_sends_and_nothing_else(rendered, controller):
    """Failed authentications are limited per client address, which uvicorn takes from
    X-Forwarded-For only from FORWARDED_ALLOW_IPS: every replica trusts it from any peer ("*", as
    compose's replicas), the NetworkPolicy admitting only the controller and Prometheus (the test
    above); and the controller sends the client's address as the compose proxy does ($remote_addr),
    never the client's own header: ingress-nginx writes `X-Forwarded-For $remote_addr` unless
    use-forwarded-headers and compute-full-forwarded-for are on, and takes a client-sent header as
    $remote_addr with use-forwarded-headers or enable-real-ip; all three stay off, and no snippet
    sets the header or the real-ip module."""
    deployments = [d for (kind, _), d in rendered.items() if kind == "Deployment"]
    assert len(deployments) == len(SERVED_MODELS)
    for dep in deployments:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("FORWARDED_ALLOW_IPS") == "*", dep["metadata"]["name"]
    assert render.compose_regions()["model-env"].count('FORWARDED_ALLOW_IPS: "*"') == len(SERVED_MODELS)
    server, _ = _nginx_server()
    assert _heads(server, "proxy_set_header X-Forwarded-For ") == ["proxy_set_header X-Forwarded-For $remote_addr"]
    for setting in ("use-forwarded-headers", "enable-real-ip", "compute-full-forwarded-for"):
        assert controller[setting] == "false", setting
    snippets = [controller["http-snippet"], controller["server-snippet"]]
    snippets += [ing["metadata"]["annotations"][ANN + "configuration-snippet"] for ing in _ingresses(rendered)]
    for snippet in snippets:
        assert not re.search(r"x-forwarded-for|real_ip|set_real_ip_from", snippet, re.I), snippet


# ---------------------------------------------------------------- the release overlay: by digest

STAND_IN_ENGINE = """#!/bin/sh
# `<engine> image inspect --format '{{json .RepoDigests}}' IMAGE`, as podman and docker answer it.
echo "$*" >> "$CALLS"
echo "$DIGESTS"
"""


def test_release_overlay_pins_the_image_by_digest_and_refuses_a_tag(tmp_path, monkeypatch):
    """The release is written only with the pushed image's digest (read from the engine's
    RepoDigests for the registry, or given), every rendered image is <registry>@sha256:...;
    a tag, a short digest or an unpushed image is refused, and --check refuses a release whose
    images are referenced by tag."""
    pair = ["fashion-cnn:v20260101-000000", "sentiment-bert:v20260101-000001"]
    base = ["--variant", "cpu", "--registry", "r.example/servable", "--out", str(tmp_path / "rel")]
    tag = k8s_release.image_tag("cpu", pair)
    assert k8s_release.main([*base, *pair]) == 0 and not (tmp_path / "rel").exists()  # no digest: nothing written
    for bad in ("r.example/servable:" + tag, "sha256:abc", "sha256:" + "g" * 64, "latest"):
        assert k8s_release.main([*base, "--digest", bad, *pair]) == 2, bad
    assert not (tmp_path / "rel").exists()
    # the digest from the engine, after the push: a stand-in podman answers `image inspect`
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(STAND_IN_ENGINE)
    (bin_dir / "podman").chmod(0o755)
    digest = "sha256:" + "3" * 64
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("DIGESTS", "null")  # built, never pushed
    assert k8s_release.main([*base, "--digest-from", "podman", *pair]) == 2
    monkeypatch.setenv("DIGESTS", json.dumps([f"other.example/servable@sha256:{'4' * 64}",
                                              f"r.example/servable@{digest}"]))  # fmt: skip
    assert k8s_release.main([*base, "--digest-from", "podman", *pair]) == 0
    calls = (tmp_path / "calls").read_text()
    assert f"image inspect --format {{{{json .RepoDigests}}}} r.example/servable:{tag}" in calls
    release = tmp_path / "rel" / tag
    out = run([tool("kubectl"), "kustomize", str(release)]).stdout
    images = {c["image"] for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {f"r.example/servable@{digest}"}
    assert k8s_release.main(["--check", str(release)]) == 0
    # a release edited back to a tag is refused
    text = (release / "kustomization.yaml").read_text()
    (release / "kustomization.yaml").write_text(text.replace(f"digest: {digest}", f"newTag: {tag}"))
    assert k8s_release.main(["--check", str(release)]) == 1
    assert k8s_release.unpinned_images(
        [d for d in yaml.safe_load_all(run([tool("kubectl"), "kustomize", str(release)]).stdout) if d]
    ) == [f"r.example/servable:{tag}"] * len(SERVED_MODELS)


# ---------------------------------------------------------------- the snippets, run in a real nginx


class _Replica(BaseHTTPRequestHandler):
    """Stands in for a replica: 200 with a JSON body for any request (the paths it was sent, kept)."""

    paths: ClassVar[list[str]] = []

    def _answer(self):
        self.paths.append(self.path)
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):  # nothing a client sends is logged
        pass


def _controller_conf(controller: dict, ingresses: list[dict], port: int, upstream: int, tmp: Path) -> str:
    """A config laid out as ingress-nginx lays out the Ingresses of one host: http-snippet in http, the
    server-snippet in the one server, a location per path (regex, longest path first) with its own
    Ingress' configuration-snippet before the rewrite and proxy_pass; the limit-connections annotation
    as the controller writes it (a zone per Ingress)."""
    located = sorted(((path, ing) for ing in ingresses for path in _ingress_paths(ing)), key=lambda p: -len(p[0]))
    locations = "".join(
        f'        location ~* "^{path}" {{\n{ing["metadata"]["annotations"][ANN + "configuration-snippet"]}\n'
        f"            limit_conn {ing['metadata']['name']}_conn "
        f"{ing['metadata']['annotations'][ANN + 'limit-connections']};\n"
        f'            rewrite "(?i){path}" {ing["metadata"]["annotations"][ANN + "rewrite-target"]} break;\n'
        f"            proxy_pass http://127.0.0.1:{upstream};\n        }}\n"
        for path, ing in located
    )
    zones = "".join(f"    limit_conn_zone $binary_remote_addr zone={ing['metadata']['name']}_conn:5m;\n"
                    for ing in ingresses)  # fmt: skip
    return (
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {tmp};\n    proxy_temp_path {tmp};\n"
        f"    map $http_x_request_id $req_id {{ default $request_id; ~. $http_x_request_id; }}\n"
        f"    limit_req_status {controller['limit-req-status-code']};\n"
        f"    limit_conn_status {controller['limit-conn-status-code']};\n{zones}"
        f"{controller['http-snippet']}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n{controller['server-snippet']}\n{locations}    }}\n}}\n"
    )


def test_the_ingress_snippets_refuse_queries_limit_per_key_and_send_the_headers_in_nginx(rendered, controller,
                                                                                           tmp_path):  # fmt: skip
    """The generated snippets, run by a real nginx in the layout ingress-nginx gives them: a key in
    the query string gets 400 invalid_query before any replica; a Bearer token with a different
    x-api-key gets 400 ambiguous_credentials; answers carry the security headers; one key past its
    burst gets 429 rate_limited with Retry-After and the headers, while another key still gets 200;
    a key past its explain budget (on both explain routes together) gets 429 for explanations while
    its predictions still pass."""
    nginx = tool("nginx")
    replica = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    kind, entry = next(iter(SERVED_MODELS.items()))
    port = free_port()
    conf = tmp_path / "nginx.conf"
    ingresses = [rendered["Ingress", f"servable-{kind}"], rendered["Ingress", f"servable-{kind}-explain"]]
    conf.write_text(_controller_conf(controller, ingresses, port, replica.server_address[1], tmp_path))
    run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)])
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"])
    try:
        url = f"http://127.0.0.1:{port}{entry.route}"
        for _ in range(50):
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        expected = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"}  # fmt: skip
        ok = requests.post(url, data=b"{}", headers={"x-api-key": "key-a"}, timeout=5)
        assert ok.status_code == 200 and ok.json() == {"ok": True}
        assert {k: ok.headers.get(k) for k in expected} == expected and ok.headers["X-Request-ID"]
        refused = requests.post(url + "?api_key=secret-in-url", data=b"{}", timeout=5)
        assert refused.status_code == 400 and refused.json()["reason"] == "invalid_query"
        assert {k: refused.headers.get(k) for k in expected} == expected
        # one credential: a Bearer token paired with another x-api-key is refused (the same one twice is not)
        two = requests.post(url, data=b"{}", headers={"Authorization": "Bearer key-b", "x-api-key": "key-x"}, timeout=5)
        assert two.status_code == 400 and two.json()["reason"] == "ambiguous_credentials"
        assert {k: two.headers.get(k) for k in expected} == expected
        same = requests.post(
            url, data=b"{}", headers={"Authorization": "Bearer key-d", "x-api-key": "key-d"}, timeout=5
        )
        assert same.status_code == 200
        # the explain budget: explanations beyond it get 429, on both explain routes; predictions still pass
        key_e = {"x-api-key": "key-e"}
        _Replica.paths.clear()
        explain = [
            f"http://127.0.0.1:{port}{entry.route}/explain",
            f"http://127.0.0.1:{port}/{kind}{entry.route}/explain",
        ]
        start = time.monotonic()
        answers = [requests.post(explain[i % 2], data=b"{}", headers=key_e, timeout=5)
                   for i in range(3 * render.EXPLAIN_RATE_BURST)]  # fmt: skip
        elapsed = time.monotonic() - start
        passed = [r for r in answers if r.status_code == 200]
        assert {r.status_code for r in answers} == {200, 429}, [r.status_code for r in answers]
        refill = int(elapsed * int(render.EXPLAIN_RATE_LIMIT.split("r/")[0]) / 60) + 1  # tokens earned meanwhile
        assert len(passed) <= render.EXPLAIN_RATE_BURST + 1 + refill, (len(passed), elapsed)
        assert all(r.json()["reason"] == "rate_limited" for r in answers if r.status_code == 429)
        assert set(_Replica.paths) == {entry.route + "/explain"}  # both routes reach the replica's explain route
        assert requests.post(explain[1], data=b"{}", headers=key_e, timeout=5).status_code == 429
        assert requests.post(url, data=b"{}", headers=key_e, timeout=5).status_code == 200  # predictions pass
        assert requests.post(explain[0], data=b"{}", headers={"x-api-key": "key-f"}, timeout=5).status_code == 200
        with ThreadPoolExecutor(16) as pool:  # faster than the rate refills the burst
            codes = list(pool.map(lambda _: requests.post(url, data=b"{}", headers={"x-api-key": "key-a"}, timeout=5),
                                  range(3 * render.RATE_BURST)))  # fmt: skip
        limited = [r for r in codes if r.status_code == 429]
        assert limited, "the per-key burst was never enforced"
        r = limited[0]
        assert r.json()["reason"] == "rate_limited" and r.headers["Retry-After"] == "1"
        assert {k: r.headers.get(k) for k in expected} == expected and r.headers[HSTS].startswith("max-age=")
        other = requests.post(url, data=b"{}", headers={"Authorization": "Bearer key-b"}, timeout=5)
        assert other.status_code == 200, "another key shares the first key's limit"
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=10)
        replica.shutdown()
    assert "secret-in-url" not in (tmp_path / "error.log").read_text()
    assert re.search(r"limiting requests", (tmp_path / "error.log").read_text())
