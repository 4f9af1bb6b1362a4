"""Bounded metrics: paths a client makes up do not grow the request metrics' series."""

from __future__ import annotations

import re
import secrets

import requests

from serving.path_labels import UNKNOWN
from tests.conftest import API_KEY

KEY = {"x-api-key": API_KEY}
ENDPOINT = re.compile(r'endpoint="([^"]*)"')


def _endpoints(server) -> set[str]:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return {m.group(1) for line in text.splitlines() if line.startswith("bentoml_") for m in ENDPOINT.finditer(line)}


def test_random_paths_collapse_to_one_label_and_keep_their_answers(image_server, image_run):
    """300 made-up paths (root, V2 model names, BentoML's static folder) add one endpoint label value in
    all, while each still gets the answer it got before: a JSON 404 (V2's own for an unknown model)."""
    before = _endpoints(image_server)
    token = secrets.token_hex(4)
    session = requests.Session()
    for i in range(100):
        r = session.get(f"{image_server.url}/{token}-{i}", headers=KEY, timeout=30)
        assert r.status_code == 404 and r.json()["reason"] == "not_found", r.text
        r = session.post(f"{image_server.url}/v2/models/{token}-{i}/infer", json={}, headers=KEY, timeout=30)
        assert r.status_code == 404 and r.json()["reason"] == "unknown_model", r.text
        r = session.get(f"{image_server.url}/static_content/{token}-{i}.js", headers=KEY, timeout=30)
        assert r.status_code == 404, r.text
    after = _endpoints(image_server)
    assert not any(token in e for e in after), sorted(after)
    assert after - before <= {UNKNOWN}, sorted(after - before)
    assert len(after) <= len(before) + 1
    # the service's own paths keep their own label, the served model's V2 paths included
    name = requests.get(image_server.url + "/info", headers=KEY, timeout=30).json()["name"]
    assert session.get(f"{image_server.url}/v2/models/{name}", headers=KEY, timeout=30).status_code == 200
    assert f"/v2/models/{name}" in _endpoints(image_server)
