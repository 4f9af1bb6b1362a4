"""The compose topology on 127.0.0.1: proxy routing, Prometheus targets, every dashboard and alert
expression against real metrics, and a replica failure behind the proxy."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import certifi
import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from deploy import launch, render
from deploy.local_stack import stop_replica
from tests import stack_fixtures
from tests.conftest import API_KEY
from tests.polling import wait_for

local_stack = stack_fixtures.local_stack  # the fixture, used by name below
KEY = {"x-api-key": API_KEY}
# `<signal> <op> <threshold>`: a number, or a series joined on labels (a setting the replicas export)
COMPARISON = re.compile(
    r"^(?P<signal>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?:-?[0-9.]+|on \([^)]*\) group_left \(\)\s*(?P<threshold>.+))$", re.S
)
# Shadow scoring's series exist only where a replica runs a candidate (serving/shadow.py); the stack runs
# none: tests/test_shadow.py queries those expressions against a real Prometheus scraping one that does.
SHADOW_ONLY = re.compile(r"servable[_:]shadow")


def _png(image_run, i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_run.splits.test_x[i][:, :, 0])).save(buf, "PNG")
    return buf.getvalue()


def _query(stack, expr: str) -> list[dict]:
    r = requests.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    return r.json()["data"]["result"]


def _traffic(stack, image_run, text_run, n: int = 12) -> None:
    texts = [t for t, _ in text_run.splits.test[:n]]

    def one(i):
        img = requests.post(stack.proxy_url + "/classify", files={"image": ("x.png", _png(image_run, i))},
                            headers=KEY, timeout=60)  # fmt: skip
        txt = requests.post(stack.proxy_url + "/sentiment", json={"text": texts[i % len(texts)]}, headers=KEY,
                            timeout=60)  # fmt: skip
        return img.status_code, txt.status_code

    with cf.ThreadPoolExecutor(6) as ex:
        assert set(ex.map(one, range(n))) == {(200, 200)}
    # a few refused calls, so the rejection series exist too
    requests.post(stack.proxy_url + "/sentiment", json={"text": ""}, headers=KEY, timeout=30)
    requests.post(stack.proxy_url + "/classify", json={"images": []}, headers=KEY, timeout=30)


def rule_exprs() -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Recording-rule expressions, (alert name, alert signal) pairs, and the GPU-only expressions."""
    records, alerts, gpu_only = [], [], []
    for path in sorted(render.RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "DCGM_" in rule["expr"]:
                    gpu_only.append(rule["expr"])
                elif SHADOW_ONLY.search(rule["expr"]):
                    continue
                elif "record" in rule:
                    records.append(rule["expr"])
                else:
                    m = COMPARISON.match(rule["expr"].strip())
                    assert m, f"alert {rule['alert']} is not written as `<signal> <op> <threshold>`"
                    alerts.append((rule["alert"], m.group("signal")))
                    if m.group("threshold"):
                        alerts.append((f"{rule['alert']} threshold", m.group("threshold")))
    return records, alerts, gpu_only


def test_both_endpoints_answer_through_the_proxy(local_stack, image_run, text_run):
    stack = local_stack
    img = requests.post(stack.proxy_url + "/classify", headers=KEY, timeout=60,
                        files=[("image", (f"{i}.png", _png(image_run, i), "image/png")) for i in range(2)])  # fmt: skip
    assert img.status_code == 200, img.text
    assert img.json()["model"] == image_run.tag and len(img.json()["predictions"]) == 2
    assert img.headers.get("x-request-id")
    b64 = base64.b64encode(_png(image_run, 0)).decode()
    assert requests.post(stack.proxy_url + "/classify", json={"image": b64}, headers=KEY, timeout=60).status_code == 200
    txt = requests.post(stack.proxy_url + "/sentiment", json={"texts": ["A gorgeous film.", "Dull."]}, headers=KEY,
                        timeout=60)  # fmt: skip
    assert txt.status_code == 200 and len(txt.json()["predictions"]) == 2, txt.text
    # prefixed routes reach the right service; keys are still checked behind the proxy
    assert requests.get(stack.proxy_url + "/image/info", headers=KEY, timeout=30).json()["model_tag"] == image_run.tag
    assert requests.get(stack.proxy_url + "/text/info", headers=KEY, timeout=30).json()["model_tag"] == text_run.tag
    assert requests.get(stack.proxy_url + "/text/readyz", timeout=10).status_code == 200
    assert requests.post(stack.proxy_url + "/sentiment", json={"text": "x"}, timeout=30).status_code == 401
    assert requests.get(stack.proxy_url + "/text/metrics", timeout=10).status_code == 404  # not public
    assert requests.get(stack.proxy_url + "/nowhere", timeout=10).status_code == 404
    # the proxy's body limit (1 MiB for text) answers before any replica sees the body
    big = requests.post(stack.proxy_url + "/sentiment", data=b"x" * (2 * 1024 * 1024), timeout=30,
                        headers={**KEY, "content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413
    # round robin: both replicas of each pool answered
    for _ in range(4):
        requests.post(stack.proxy_url + "/sentiment", json={"text": "fine"}, headers=KEY, timeout=30)
    upstreams = {json.loads(line)["upstream"] for line in (stack.dir / "nginx-access.log").read_text().splitlines()}
    for kind in ("image", "text"):
        assert set(stack.addresses(kind)) <= upstreams, (kind, upstreams)


def test_prometheus_scrapes_every_replica(local_stack):
    stack = local_stack
    expected = {f"servable-{k}": set(stack.addresses(k)) for k in ("image", "text")}
    deadline = time.monotonic() + 60
    while True:
        targets = requests.get(stack.prometheus_url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        got = {job: {t["labels"]["instance"] for t in targets if t["labels"]["job"] == job} for job in expected}
        if got == expected and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, f"targets not all up: {[(t['scrapeUrl'], t['health']) for t in targets]}"
        time.sleep(1)
    rules = requests.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in rules} == {"servable-sli", "servable-alerts", "servable-gpu"}
    assert all(r["health"] == "ok" for g in rules for r in g["rules"])


def test_every_dashboard_and_alert_expression_returns_data(local_stack, image_run, text_run):
    stack = local_stack
    records, alerts, gpu_only = rule_exprs()
    # GPU rules read the DCGM exporter, which only a GPU deployment has: they are covered by
    # `promtool test rules` (tests/test_deploy_static.py), not here.
    assert len(gpu_only) == 2 and len(alerts) >= 5 and len(records) >= 5
    dashboard = json.loads(render.DASHBOARD_JSON.read_text())  # the provisioned file itself
    exprs = {t["expr"]: "dashboard" for panel in dashboard["panels"] for t in panel["targets"]}
    assert set(exprs) == set(render.dashboard_exprs())
    exprs = {e: where for e, where in exprs.items() if not SHADOW_ONLY.search(e)}
    exprs |= {e: "recording rule" for e in records} | {s: f"alert {a}" for a, s in alerts}
    deadline = time.monotonic() + 120
    missing = list(exprs)
    while missing:
        _traffic(stack, image_run, text_run, n=6)
        time.sleep(3)
        missing = [e for e in missing if not _query(stack, e)]
        assert time.monotonic() < deadline, "no data for:\n" + "\n".join(f"{exprs[e]}: {e}" for e in missing)


def _shorten_alert_for(stack, alert: str, for_s: int) -> None:
    """Reload the stack's Prometheus with `alert`'s `for:` cut to `for_s` (the expression, labels and
    annotations stay the shipped ones; the shipped `for:` itself is proven by the promtool cases)."""
    path = stack.dir / "prometheus" / "rules" / "servable.yml"
    rules = yaml.safe_load(path.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["for"] = f"{for_s}s"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    os.kill(stack.prometheus.proc.pid, signal.SIGHUP)  # Prometheus reloads its rules on SIGHUP
    deadline = time.monotonic() + 30
    while True:
        groups = requests.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        if any(r.get("name") == alert and r.get("duration") == for_s for g in groups for r in g["rules"]):
            return
        assert time.monotonic() < deadline, f"Prometheus did not reload {alert} with for: {for_s}s"
        time.sleep(0.5)


def test_killed_replica_proxy_keeps_answering_and_replica_down_fires(local_stack, image_run):
    stack = local_stack
    victim = stack.replicas["image"][0]
    _shorten_alert_for(stack, "ServableReplicaDown", 10)
    firing = 'ALERTS{alertname="ServableReplicaDown", alertstate="firing"}'
    assert not _query(stack, firing)
    stop_replica(victim, crash=True)  # SIGKILL to the replica and its workers: a crash, not a drain
    assert launch.get(victim.url + "/readyz")[0] == 0  # really gone
    statuses = [
        requests.post(stack.proxy_url + "/classify", files={"image": ("x.png", _png(image_run, i % 5))}, headers=KEY,
                      timeout=60).status_code
        for i in range(12)
    ]  # fmt: skip
    assert statuses == [200] * 12
    deadline = time.monotonic() + 90
    while not (fired := _query(stack, firing)):  # the alert itself, pending then firing after its `for:`
        assert time.monotonic() < deadline, "ServableReplicaDown did not fire"
        time.sleep(1)
    assert [r["metric"]["instance"] for r in fired] == [f"127.0.0.1:{victim.port}"]
    assert fired[0]["metric"]["job"] == "servable-image" and fired[0]["metric"]["severity"] == "page"
    alerts = requests.get(stack.prometheus_url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    down = [a for a in alerts if a["labels"]["alertname"] == "ServableReplicaDown" and a["state"] == "firing"]
    assert down and "down (scrape failing)" in down[0]["annotations"]["summary"]


def test_sigterm_one_replica_under_load_loses_no_request(local_stack, text_run):
    """A rolling restart's step: SIGTERM one sentiment replica while clients keep calling the proxy.

    The replica answers what it accepted or refuses with a retryable 503, and nginx retries those
    (and refused connections) on the other replica (`proxy_next_upstream ... http_503 non_idempotent`),
    so no client request fails.
    """
    stack = local_stack
    texts = [t for t, _ in text_run.splits.test[:16]]
    victim = stack.replicas["text"][0]
    stop_at = time.monotonic() + 8
    results: list[tuple[int, float]] = []

    def client(i: int) -> None:
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                code = requests.post(stack.proxy_url + "/sentiment", json={"texts": texts[i % 4 :: 4]}, headers=KEY,
                                     timeout=30).status_code  # fmt: skip
            except requests.RequestException:
                code = 0
            results.append((code, time.perf_counter() - start))

    with cf.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(client, i) for i in range(6)]
        time.sleep(2)
        victim.stop()  # SIGTERM: a graceful stop, as `docker stop` or a pod deletion sends
        cf.wait(futures, timeout=60)
    codes = [c for c, _ in results]
    figures = {"requests": len(codes), "failed": sum(c != 200 for c in codes),
               "5xx": sum(c >= 500 for c in codes), "max_latency_s": round(max(s for _, s in results), 3)}  # fmt: skip
    print("\nSIGTERM under load behind the proxy:", json.dumps(figures))
    assert launch.get(victim.url + "/readyz")[0] == 0  # really stopped
    assert figures["requests"] > 20 and figures["failed"] == 0, figures


# ---------------------------------------------------------------- TLS, rate limits, secrets (issue 9)

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) with a listening socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_proxy_is_https_with_security_headers_and_plain_http_redirects(local_stack):
    stack = local_stack
    assert stack.proxy_url.startswith("https://")
    ok = requests.get(stack.proxy_url + "/text/info", headers=KEY, timeout=30, verify=stack.ca_file)
    assert ok.status_code == 200
    refused = requests.post(stack.proxy_url + "/sentiment", json={"text": "x"}, timeout=30, verify=stack.ca_file)
    nowhere = requests.get(stack.proxy_url + "/nowhere", timeout=10, verify=stack.ca_file)
    for r in (ok, refused, nowhere):  # on answers from the replicas and from nginx itself, errors included
        assert {h: r.headers.get(h) for h in SECURITY_HEADERS} == SECURITY_HEADERS, (r.status_code, r.headers)
        assert r.headers.get("server", "nginx") == "nginx"  # server_tokens off: no version
    assert (refused.status_code, nowhere.status_code) == (401, 404)
    # the certificate is the stack's own: a client that does not trust that CA refuses the connection
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(stack.proxy_url + "/healthz", timeout=10, verify=certifi.where())
    # plain HTTP serves no API: 301 to the same path on HTTPS
    plain = requests.post(stack.http_url + "/sentiment?x=1", json={"text": "x"}, headers=KEY, timeout=10,
                          allow_redirects=False)  # fmt: skip
    assert plain.status_code == 301
    assert plain.headers["location"] == f"{stack.proxy_url}/sentiment?x=1"
    # everything the stack runs listens on 127.0.0.1 only
    ports = [stack.proxy_port, stack.http_port, stack.prometheus_port, *(s.port for s in stack.all_replicas()
             if s.proc.poll() is None)]  # fmt: skip
    for port in ports:
        assert _listening(port) in ({"0100007F"}, {"0000000000000000FFFF00000100007F"}), (port, _listening(port))


def test_rate_limit_per_api_key_answers_429_with_retry_after(local_stack):
    """A second proxy from the same template and certificate, limited to 2 r/s with a burst of 4:
    one key flooding it gets 429s with Retry-After and a JSON body, while another key (as a Bearer
    token) at the same time is not limited. The main proxy's limit is far above the other tests."""
    stack = local_stack
    url = stack.start_extra_proxy("proxy-limited", rate_limit="2r/s", rate_burst=4)
    flooder = {"x-api-key": API_KEY}
    other = {"authorization": f"Bearer {stack_fixtures.OTHER_KEY}"}

    def get(headers):
        return requests.get(url + "/text/info", headers=headers, timeout=30, verify=stack.ca_file)

    with cf.ThreadPoolExecutor(8) as ex:
        flood = [ex.submit(get, flooder) for _ in range(40)]
        calm = []
        for _ in range(3):
            calm.append(get(other))
            time.sleep(0.1)
        flood = [f.result() for f in flood]
    codes = [r.status_code for r in flood]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4 and codes.count(429) >= 20, codes
    limited = next(r for r in flood if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["content-type"].startswith("application/json")
    assert limited.json()["reason"] == "rate_limited" and limited.json()["error"]
    assert {h: limited.headers.get(h) for h in SECURITY_HEADERS} == SECURITY_HEADERS
    assert [r.status_code for r in calm] == [200, 200, 200]  # the other key is not limited
    time.sleep(1.5)  # the flooder's bucket drains: it is served again
    assert get(flooder).status_code == 200
    # the same key as x-api-key and as a Bearer token is one bucket: 1 + burst pass at once, not twice that
    time.sleep(3)
    same_key = [flooder, {"authorization": f"Bearer {API_KEY}"}] * 10
    with cf.ThreadPoolExecutor(8) as ex:
        codes = [r.status_code for r in ex.map(get, same_key)]
    assert set(codes) <= {200, 429} and codes.count(200) <= 7, codes


def test_one_credential_per_request_and_an_explain_budget_per_key_at_the_proxy(local_stack):
    """A valid Bearer token beside a fresh x-api-key is refused by nginx itself (400, no replica asked),
    so the pair can no longer buy a fresh per-key bucket each request; and explanations draw from a
    budget of their own per key: beyond it 429, while the same key's predictions are still served."""
    stack = local_stack
    url = stack.start_extra_proxy("proxy-identity", rate_limit="5r/s", rate_burst=5, explain_rate_limit="6r/m",
                                  explain_rate_burst=1)  # fmt: skip
    ids = []
    for i in range(8):
        headers = {"authorization": f"Bearer {API_KEY}", "x-api-key": f"fresh-key-{i:04d}-abcdef"}
        r = requests.get(url + "/text/info", headers=headers, timeout=30, verify=stack.ca_file)
        assert r.status_code == 400 and r.json()["reason"] == "ambiguous_credentials", r.text
        ids.append(r.headers["x-request-id"])
    log = [json.loads(line) for line in (stack.dir / "proxy-identity" / "nginx-access.log").read_text().splitlines()]
    assert {e["upstream"] for e in log if e["request_id"] in ids} == {""}  # answered by nginx, not a replica

    def explain(path: str) -> requests.Response:
        return requests.post(url + path, json={"text": "a fine film"}, headers=KEY, timeout=120, verify=stack.ca_file)

    assert explain("/sentiment/explain").status_code == 200  # the first starts the explain process: slow
    with cf.ThreadPoolExecutor(4) as ex:  # at once: at most 1 + burst of them pass, both spellings one budget
        codes = [r.status_code for r in ex.map(explain, ["/text/sentiment/explain", "/sentiment/explain"] * 2)]
    assert codes.count(429) >= 2 and set(codes) <= {200, 429}, codes
    time.sleep(1)
    r = requests.post(url + "/sentiment", json={"text": "a fine film"}, headers=KEY, timeout=30, verify=stack.ca_file)
    assert r.status_code == 200, r.text


def test_planted_key_and_sentence_never_reach_logs_or_configs(local_stack, image_run):
    """A key from the stack's key file (as deployments mount one) and a sentence sent through the
    proxy, on success, refusal, malformed-body, rate-limited and upstream-error paths, and put in the
    URL by mistake: neither appears in any log the stack wrote (replicas, nginx access and error
    logs, Prometheus' log) or rendered config."""
    stack = local_stack
    key, sentence = stack_fixtures.PLANTED_KEY, "my neighbour Ingrid Vasquez-Holt owes 4711 crowns"
    planted = {"x-api-key": key}
    url = stack.proxy_url
    bearer = {"authorization": f"Bearer {key}"}
    malformed, as_json = f'{{"text": "{sentence}"'.encode(), {**planted, "content-type": "application/json"}
    calls = [
        requests.post(url + "/sentiment", json={"text": sentence}, headers=planted, timeout=60),
        requests.post(url + "/sentiment", json={"texts": [sentence, sentence]}, headers=bearer, timeout=60),
        requests.post(url + "/sentiment", json={"text": sentence}, headers={"x-api-key": key + "-wrong"}, timeout=30),
        requests.post(url + "/sentiment", data=malformed, headers=as_json, timeout=30),
        requests.post(url + "/sentiment", json={"text": sentence * 3000}, headers=planted, timeout=30),
    ]
    assert [c.status_code for c in calls][:3] == [200, 200, 401], [(c.status_code, c.text[:200]) for c in calls]
    assert all(c.status_code < 500 for c in calls)
    # the API's own query options pass the proxy
    top1 = requests.post(url + "/classify?top_k=1", files={"image": ("x.png", _png(image_run, 0))}, headers=planted,
                         timeout=60)  # fmt: skip
    assert top1.status_code == 200 and len(top1.json()["predictions"][0]["top_k"]) == 1, top1.text
    # A second proxy whose pools list a dead replica first, at 1 r/s: nginx's error log records the
    # request line (query included) of each request that meets a dead replica or the limit. The key
    # and the sentence put in the URL (a body too big for the route, too) are refused before either.
    second = stack.start_extra_proxy("proxy-secrets", rate_limit="1r/s", rate_burst=1, dead_replica=True)
    in_url = [f"/text/info?key={key}&q={sentence}", f"/sentiment?top_k=1&api_key={key}", f"/classify?text={sentence}"]
    for base in (url, second):
        for path in in_url * 2:
            refused = requests.post(base + path, data=b"x" * (2 * 1024 * 1024), headers=as_json, timeout=30)
            assert refused.status_code == 400 and refused.json()["reason"] == "invalid_query", (path, refused.text)
            assert refused.headers["content-type"] == "application/json"
            assert requests.get(base + path, headers=planted, timeout=30).status_code == 400
    with cf.ThreadPoolExecutor(6) as ex:
        codes = list(ex.map(lambda _: requests.post(second + "/sentiment", json={"text": sentence},
                                                    headers=planted, timeout=60).status_code, range(12)))  # fmt: skip
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    errors = wait_for(lambda: (p := stack.dir / "proxy-secrets" / "nginx-error.log").exists() and p.read_text(),
                      timeout_s=10)  # fmt: skip
    assert "limiting requests" in errors and "connect() failed" in errors, errors  # both paths were logged
    time.sleep(2)  # log buffers flushed
    files = [p for p in stack.written_files() if p.name != "api_keys"]  # the key file is the one place it belongs
    names = {p.name for p in files}
    assert {"nginx-access.log", "nginx-error.log", "servable.conf", "nginx.conf", "prometheus.yml"} <= names
    assert sum(p.suffix == ".log" and p.stat().st_size > 0 for p in files) >= 6, names
    for path in files:
        data = path.read_bytes()
        for secret in (key, sentence, "Ingrid Vasquez-Holt", "4711 crowns"):
            assert secret.encode() not in data, f"{secret!r} in {path}"
    assert key in (stack.dir / "api_keys").read_text()  # the planted key really was in the key file
    # and never in a replica's environment: keys reach the replicas by file only
    for server in stack.all_replicas():
        if server.proc.poll() is None:
            assert key.encode() not in Path(f"/proc/{server.proc.pid}/environ").read_bytes()


def test_a_model_added_to_served_models_is_served_routed_and_scraped(tmp_path, monkeypatch):
    """A SERVED_MODELS entry added in-process, whose service lives outside serving/ and whose settings
    have their own env prefix, gets replicas (its tag from `tags`), an nginx pool with its routes and
    playground page policy, and a Prometheus job; the other models can be left out (0 replicas)."""
    from deploy.local_stack import LocalStack
    from tests.fixtures.tabular import build
    from tests.fixtures.tabular.config import ENTRY

    monkeypatch.setitem(render.SERVED_MODELS, ENTRY.kind, ENTRY)
    tag = build.register()
    stack = LocalStack(tmp_path / "stack", api_keys={"tester": API_KEY}, tags={ENTRY.kind: tag},
                       replicas_per_kind={"image": 0, "text": 0, ENTRY.kind: 1})  # fmt: skip
    assert stack.tags[ENTRY.kind] == tag
    with stack:
        ca = stack.ca_file
        r = requests.post(stack.proxy_url + ENTRY.route, json={"rows": [[1500, 3, 30, 10]]}, headers=KEY, timeout=60,
                          verify=ca)  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == tag, r.text
        info = requests.get(f"{stack.proxy_url}/{ENTRY.kind}/info", headers=KEY, timeout=30, verify=ca)
        assert info.json()["model_tag"] == tag
        page = requests.get(f"{stack.proxy_url}/{ENTRY.kind}/playground", timeout=30, verify=ca)
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # a model without replicas: its routes answer 502 from the proxy, nothing else breaks
        assert requests.post(stack.proxy_url + "/sentiment", json={"text": "x"}, headers=KEY, timeout=30,
                             verify=ca).status_code == 502  # fmt: skip

        def scraped() -> bool:
            targets = requests.get(stack.prometheus_url + "/api/v1/targets", timeout=10).json()["data"]
            return any(t["labels"]["job"] == f"servable-{ENTRY.kind}" and t["health"] == "up"
                       for t in targets["activeTargets"])  # fmt: skip

        assert wait_for(scraped, timeout_s=60), f"Prometheus does not scrape servable-{ENTRY.kind}"
