"""Dashboard panels drawn from their own queries (deploy/dashboard_snapshot.py) against a real Prometheus.

Prometheus (Debian's, on 127.0.0.1) scrapes a small exporter of the replicas' own shadow and drift series
every second, with the recording rules deploy/render.py generates, so the panels' queries (rules and raw
series alike) are the dashboard's, run as Grafana would run them. Seconds, no model served.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from deploy import dashboard_snapshot as snap
from deploy import launch, render
from tests.polling import wait_for

AGREEMENT = "Shadow: candidate agreement with the live answers"
CONFUSION = "Shadow: live vs candidate label (classifiers)"
DRIFT = "Input drift: PSI against the training reference"
FEEDBACK = "Feedback queue size"  # no exporter series: its panel must be reported, not drawn blank and passed
PAIR = {"model": "fashion-cnn", "version": "v1", "candidate": "v2"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exporter():
    """The series a shadowing, drift-watching replica exports: 3 of 4 rows agree; PSI 0.05 and 0.4."""
    reg = CollectorRegistry()
    scored = Counter("servable_shadow_scored", "", [*PAIR], registry=reg)
    agreed = Counter("servable_shadow_agreed", "", [*PAIR], registry=reg)
    confusion = Counter("servable_shadow_confusion", "", [*PAIR, "live_label", "candidate_label"], registry=reg)
    psi = Gauge("servable_drift_psi", "", ["model", "version", "feature"], registry=reg)
    psi.labels("fashion-cnn", "v1", "brightness").set(0.05)
    psi.labels("fashion-cnn", "v1", "contrast").set(0.4)
    alert = Gauge("servable_drift_psi_alert", "", ["model", "version"], registry=reg)  # the replica's threshold
    alert.labels("fashion-cnn", "v1").set(0.2)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.1):
            scored.labels(**PAIR).inc(4)
            agreed.labels(**PAIR).inc(3)
            confusion.labels(**PAIR, live_label="Shirt", candidate_label="Shirt").inc(3)
            confusion.labels(**PAIR, live_label="Shirt", candidate_label="T-shirt/top").inc(1)

    port = launch.free_port()
    server, thread = start_http_server(port, "127.0.0.1", registry=reg)
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    ticker.join(5)
    server.shutdown()
    thread.join(5)


@pytest.fixture(scope="module")
def prometheus(exporter, tmp_path_factory):
    """Debian's Prometheus scraping the exporter every second as servable-image, with the generated rules."""
    d = tmp_path_factory.mktemp("prometheus")
    (d / "rules.yml").write_text(render.GENERATED[render.RULES_YML]())
    job = {"job_name": "servable-image", "static_configs": [{"targets": [exporter]}]}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(d / "rules.yml")],
              "scrape_configs": [job]}  # fmt: skip
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{launch.free_port()}"
    cmd = [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={d / 'prometheus.yml'}",
           f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address={url.removeprefix('http://')}"]  # fmt: skip
    with (d / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def agreement() -> bool:  # some seconds of the rule's figure: a line, not a point
        expr = "count_over_time(servable:shadow_agreement:ratio_rate5m[1m]) >= 5"
        try:
            got = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        except requests.RequestException:
            return False  # not listening yet
        return bool(got["data"]["result"])

    try:
        assert wait_for(agreement, 60, 0.5), (d / "prometheus.log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _coloured_pixels(path: Path, rgb: tuple[int, int, int]) -> int:
    """Pixels of a line drawn in `rgb` (within antialiasing), as a count."""
    img = Image.open(path).convert("RGB")
    return sum(1 for p in img.getdata() if all(abs(a - b) <= 12 for a, b in zip(p, rgb, strict=True)))


FIRST_SERIES = (31, 119, 180)  # tab20's first colour: the series with the highest mean


def test_named_panels_are_drawn_from_their_queries_and_an_empty_one_is_reported(prometheus, tmp_path, capsys):
    """Each named panel's own targets through query_range: the agreement rule's ratio (3 of 4 rows), the
    confusion pairs named by the legendFormat, the PSI per feature with the alert's threshold line; the panel
    with no series is drawn with "No data", printed as NO DATA and makes the exit status 3."""
    out = tmp_path / "shots"
    named = ["--panel", AGREEMENT, "--panel", CONFUSION, "--panel", "input drift", "--panel", FEEDBACK]
    rc = snap.main(["--prometheus", prometheus, "--out", str(out), "--start", "now-1m", "--end", "now", "--step", "1",
                    *named])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == snap.NO_DATA_STATUS, printed
    assert f"NO DATA  {FEEDBACK} (opt-in items to label)" in printed and printed.count("NO DATA") == 1, printed
    record = json.loads((out / "snapshot.json").read_text())
    panels = {p["title"]: p for p in record["panels"]}
    assert record["machine"] and record["command"].startswith("python -m deploy.dashboard_snapshot --prometheus")
    series = {t: [s for tgt in p["targets"] for s in tgt["series"]] for t, p in panels.items()}
    assert series[AGREEMENT] == ["fashion-cnn v1 vs v2"]
    assert sorted(series[CONFUSION]) == ["fashion-cnn Shirt -> v2 Shirt", "fashion-cnn Shirt -> v2 T-shirt/top"]
    (drift,) = [t for t in panels if t.startswith(DRIFT)]
    assert sorted(series[drift]) == [
        "alert threshold fashion-cnn v1",
        "fashion-cnn v1 brightness",
        "fashion-cnn v1 contrast",
    ]
    assert {t: p["has_data"] for t, p in panels.items()} == {AGREEMENT: True, CONFUSION: True, drift: True,
                                                              f"{FEEDBACK} (opt-in items to label)": False}  # fmt: skip
    for p in record["panels"]:  # every panel drawn, the empty one too; only the ones with data have a line
        lines = _coloured_pixels(out / p["file"], FIRST_SERIES)
        assert (lines > 200) == p["has_data"], (p["title"], lines)


def test_values_units_and_thresholds_are_the_panels(prometheus, tmp_path):
    """The agreement's values are the rule's ratio (0.75), shown in percent, with the ServableShadowDisagreement
    threshold as Grafana's threshold line; the drift panel plots the ServableInputDrift threshold the replicas
    export (their DRIFT_PSI_ALERT) as a series beside the PSI."""
    dashboard = snap.load_dashboard()
    panels = snap.select_panels(dashboard, [AGREEMENT, DRIFT], [])
    now = time.time()
    agreement, drift = snap.snapshot(panels, prometheus, tmp_path, now - 60, now, 1)
    (s,) = agreement.series
    assert s.finite() and all(abs(v - 0.75) < 0.02 for v in s.finite()[-5:]), s.finite()
    assert agreement.unit == "percentunit" and snap.format_value(0.75, agreement.unit) == "75%"
    assert agreement.thresholds == [(render.alert_threshold("ServableShadowDisagreement"), "red")]
    assert {x.name: x.finite()[-1] for x in drift.series} == {"fashion-cnn v1 brightness": 0.05,
                                                               "fashion-cnn v1 contrast": 0.4,
                                                               "alert threshold fashion-cnn v1": 0.2}  # fmt: skip


def test_a_broken_query_and_a_row_are_reported_and_selected(prometheus, tmp_path, capsys):
    """A target Prometheus refuses is drawn with its error and reported; --row takes the panels under a row."""
    dashboard = snap.load_dashboard()
    agreement = next(p for p in dashboard["panels"] if p["title"] == AGREEMENT)
    broken = {**agreement, "title": "Broken", "targets": [{"refId": "A", "expr": "sum(", "legendFormat": ""}]}
    rows = [{"type": "row", "title": "Shadow", "panels": []}, agreement, broken,
            {"type": "row", "title": "Other", "panels": []}, dashboard["panels"][0]]  # fmt: skip
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps({**dashboard, "panels": rows}))
    rc = snap.main(["--prometheus", prometheus, "--dashboard", str(path), "--row", "Shadow", "--start", "now-1m",
                    "--out", str(tmp_path / "shots")])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == snap.NO_DATA_STATUS and "NO DATA  Broken: A: bad_data:" in printed, printed
    assert f"ok       {AGREEMENT}: 1 series" in printed and "Request rate" not in printed, printed
    assert (tmp_path / "shots" / "broken.png").exists()
    assert snap.main(["--prometheus", prometheus, "--dashboard", str(path), "--panel", "nothing like it", "--out",
                      str(tmp_path)]) == 2  # fmt: skip


def test_the_release_pictures_are_recorded_panels_of_the_current_dashboard():
    """Each picture docs/releasing.md shows from img/releasing/ is one that release.json records with data, from
    a release with no failed request, named after a panel the dashboard still has (a renamed or removed panel
    leaves a stale picture: this fails until `make release-pictures` draws them again)."""
    shown = re.findall(r"!\[[^\]]*\]\(img/releasing/([^)]+\.png)\)", (ROOT / "docs" / "releasing.md").read_text())
    record = json.loads((ROOT / "docs" / "img" / "releasing" / "release.json").read_text())
    recorded = {p["file"]: p for p in record["panels"]}
    panels = {f"{snap.slug(p['title'])}.png" for p in snap.load_dashboard()["panels"]}
    assert len(shown) >= 5 and set(shown) <= set(recorded) and set(shown) <= panels, (shown, recorded, panels)
    assert all(recorded[f]["has_data"] for f in shown), [f for f in shown if not recorded[f]["has_data"]]
    assert record["command"].startswith("python -m loadtest.release_pictures") and record["machine"]
    assert record["traffic"]["requests"] > 100 and record["traffic"]["failed"] == 0, record["traffic"]
