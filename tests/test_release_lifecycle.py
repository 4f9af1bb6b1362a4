"""A new version shipped end to end on the local stack (issue 29), with the image fixture model: v1 serves with
the labelling queue on, opted-in traffic fills it, the sheet is labelled, v2 is trained with the labels added,
shadowed, canaried, promoted and rolled back; traffic runs through nginx all along and no request fails.

Each step is a command of docs/releasing.md's local-stack walkthrough, run as it is written there (the doc's
`<workdir>` and v1 tag replaced by the test's; the training command gets the image fixture's recipe as flags),
so the walkthrough itself is what is tested."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
import time

import numpy as np
import requests
from PIL import Image

from deploy import release
from servable import artifact
from servable.config import FASHION_MNIST_DIR, FeedbackSettings, ServeCommon
from serving.feedback.store import FeedbackStore
from tests.conftest import API_KEY, ROOT, UNTHROTTLED_AUTH
from tests.fixture_models import IMAGE_FIXTURE_RECIPE
from tests.polling import wait_for
from tests.stack_fixtures import ReleaseTraffic
from tests.test_doc_commands import blocks, commands

WALKTHROUGH_DOC = ROOT / "docs" / "releasing.md"
DOC_V1, DOC_V2, KEY_NAME = "fashion-cnn:v1", "fashion-cnn:v2", "local"
ITEMS, WINDOW = 8, 40  # images per request; the drift window in requests (tests/test_drift.py's)
PAUSE_S = 0.1  # the background client's pause between requests
DRIFT_ALERT = ServeCommon.model_fields["drift_psi_alert"].default


def walkthrough() -> list[list[str]]:
    """The words of each command of the doc's local-stack walkthrough, in order."""
    (text,) = [t for _, lang, _, t in blocks(WALKTHROUGH_DOC) if lang == "bash" and "deploy.local_stack" in t]
    return commands(text)


def _env_and_module(words: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """A `VAR=value ... python -m module args` line: its environment, module and arguments."""
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["python", "-m"], words
    return env, words[2], words[3:]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _prometheus(stack, expr: str) -> list[dict]:
    r = requests.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_serve_label_retrain_shadow_canary_promote_and_roll_back_without_a_failed_request(image_run, tmp_path):
    from deploy.local_stack import LocalStack
    from servable.idx import read_idx

    began = time.monotonic()

    def mark(what: str) -> None:  # the wall time of each step (pytest -s shows it)
        print(f"{time.monotonic() - began:6.1f} s  {what}", flush=True)

    lines = walkthrough()
    stack_env, module, stack_args = _env_and_module(lines[0])
    assert module == "deploy.local_stack" and stack_args == ["--workdir", "<workdir>", "--tag", f"image={DOC_V1}"]
    assert stack_env["SERVABLE_FEEDBACK_FLAG_KEYS"] == KEY_NAME
    v1 = image_run.tag
    work, queue = tmp_path / "work", tmp_path / "queue"  # the user's checkout (data/ ...), the feedback queue
    work.mkdir()
    env = {**stack_env, "SERVABLE_FEEDBACK_DIR": str(queue), "SERVABLE_IMAGE_SERVE_DRIFT_WINDOW": str(WINDOW),
           "SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000", **UNTHROTTLED_AUTH}  # fmt: skip
    stack = LocalStack(tmp_path / "stack", api_keys={KEY_NAME: API_KEY}, tags={"image": v1},
                       replicas_per_kind={"image": 1, "text": 0}, rate_limit="1000r/s", rate_burst=1000,
                       extra_env=env)  # fmt: skip

    def run(words: list[str], *extra: str, refused: bool = False) -> str:
        """One walkthrough command, as written (the stack's workdir, v1's tag) with `extra` flags, from the user's
        checkout; its output. `refused`: it must exit with status 2 (deploy.release's refusal)."""
        cmd_env, module, args = _env_and_module([w.replace("<workdir>", str(stack.dir)) for w in words])
        args = [v1 if a == DOC_V1 else a for a in args]
        done = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=work, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "SERVABLE_FEEDBACK_DIR": str(queue),
                                   **cmd_env}, timeout=600, check=False)  # fmt: skip
        assert done.returncode == (2 if refused else 0), (words, done.stdout[-3000:], done.stderr[-3000:])
        return done.stdout + done.stderr

    # In-distribution traffic: Fashion-MNIST test images the fixture never saw (its test set is the first 300),
    # uploaded as the 28 x 28 files they are, eight per request; their true labels are the labeller's answers.
    x = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[1000 : 1000 + WINDOW * ITEMS]
    y = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[1000 : 1000 + WINDOW * ITEMS]
    labels = artifact.load(v1).manifest.labels
    truth = {img.tobytes(): labels[int(c)] for img, c in zip(x, y, strict=True)}
    pngs = [_png(img) for img in x]
    headers = {"x-api-key": API_KEY, "x-servable-feedback": "opt-in"}  # the caller opts in (serving/feedback/hook.py)
    turn = iter(range(10**9))

    def send() -> tuple[int, str]:
        start = next(turn) * ITEMS % len(pngs)
        files = [("image", (f"{i}.png", pngs[i], "image/png")) for i in range(start, start + ITEMS)]
        r = requests.post(stack.proxy_url + "/classify", files=files, headers=headers, timeout=60,
                          verify=stack.ca_file)  # fmt: skip
        return r.status_code, r.json().get("model", "") if r.status_code == 200 else r.text

    def step(name: str, *extra: str) -> str:
        (words,) = [w for w in lines if w[:4] == ["python", "-m", "deploy.release", name]]
        out = run(words, *extra)
        state = release.local_states(stack.dir)[1]["image"]
        assert (state.tag, state.canary) == {"shadow": (v1, None), "canary": (v1, v2), "promote": (v2, None),
                                             "rollback": (v1, None)}[name], (name, state)  # fmt: skip
        return out

    def quiet_drift(version: str) -> None:
        """Each input feature's PSI in the version's last full window (40 requests in a row: the 320 images once)
        under the alert threshold. Called after WINDOW requests to one replica; 10 s: two scrape and rule
        evaluation intervals, the background client sending on."""
        time.sleep(10)
        expr = f'servable:drift_psi:max{{job="servable-image", version="{release.version_of(version)}"}}'
        found = wait_for(lambda: len(got := _prometheus(stack, expr)) == 5 and got, 60, 1)  # once the window is full
        psi = {s["metric"]["feature"]: float(s["value"][1]) for s in found or []}
        mark(f"{version} PSI: {', '.join(f'{k} {v:.3f}' for k, v in sorted(psi.items()))}")
        assert len(psi) == 5 and all(v < DRIFT_ALERT for v in psi.values()), psi

    store = FeedbackStore(FeedbackSettings(dir=queue))
    with stack, ReleaseTraffic(stack, send, pause_s=PAUSE_S) as traffic:
        mark("stack up")
        # 1-2. v1 serves; opted-in traffic fills the labelling queue (low confidence, the 10 % sample)
        assert set(traffic.answers(WINDOW)) == {v1}
        reasons = lambda: {it.meta["reason"] for it in store.items("fashion-cnn")}  # noqa: E731
        assert wait_for(lambda: {"low-confidence", "sampled"} <= reasons(), 30), reasons()
        quiet_drift(v1)

        mark("3. label")
        # 3. label: the sheet, its label column filled in with the true labels, read back
        select, imported, export, train = (w for w in lines[1:] if w[2] in ("serving.feedback", "training"))
        assert [select[3], imported[3], export[3], train[2]] == ["select", "import-labels", "export", "training"]
        out = run(select)
        sheet = work / imported[-1]
        with sheet.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and f"{len(rows)} item(s) to label" in out, out
        for row in rows:
            pixels = np.asarray(Image.open(sheet.parent / row["image"]))
            row["label"] = truth[pixels.tobytes()]  # the stored image is the upload's pixels
        with sheet.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        assert f"labelled {len(rows)} item(s)" in run(imported)
        run(export)

        mark("4. v2")
        # 4. v2: the fixture's recipe, one fine-tuning epoch fewer (as test_labelling_loop's runs), with the
        # labelled export added to its training data; registered. The traffic goes on, slower: the two cores train.
        recipe = {**IMAGE_FIXTURE_RECIPE, "epochs_finetune": 1, "average_last": 0}
        traffic.pause_s = 2.0
        run(train, *(f"--{k.replace('_', '-')}={v}" for k, v in recipe.items()))
        traffic.pause_s = PAUSE_S
        v2 = DOC_V2
        extra = artifact.load(v2).manifest.provenance["extra_data"]
        assert extra["added"] + sum(extra["dropped"].values()) == len(rows), extra
        assert extra["added"] > 0 and extra["feedback"]["model_tags"] == [v1], extra

        mark("5. shadow")
        # 5. shadow: v2 scores a share of the requests beside v1; every answer still v1's
        step("shadow")
        assert set(traffic.answers(WINDOW)) == {v1}
        (agreement,) = [c.expr for c in release.shadow_checks("image", v2, release.Thresholds())]  # canary's query
        found = wait_for(lambda: _prometheus(stack, agreement), 90, 1)
        assert found, f"no shadow agreement in Prometheus: {_prometheus(stack, 'servable_shadow_scored_total')}"
        ratio = float(found[0]["value"][1])
        assert 0 <= ratio <= 1, found
        mark(f"shadow agreement of {v2} with {v1}: {ratio:.3f}")

        mark("6. canary")
        # 6. canary at 10 %: the shadow's agreement read from Prometheus against the threshold given (refused, the
        # stack unchanged, above the figure); v2's share of the answers within a binomial bound. The fixture models,
        # trained for seconds on 400 images, agree less than --min-agreement's default asks of a real retrain.
        out = run(next(w for w in lines if w[3:4] == ["canary"]), f"--min-agreement={ratio + 0.1:.3f}", refused=True)
        assert "shadow agreement: " in out and "FAILED" in out, out
        assert release.local_states(stack.dir)[1]["image"].canary is None
        step("canary", f"--min-agreement={max(0.0, ratio - 0.2):.3f}")
        n, p = 200, 0.10
        share = traffic.answers(n).count(v2) / n
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n), share  # 4 standard deviations

        mark("7. promote")
        # 7. promote (on the canary's own figures in Prometheus): every answer v2's
        figures = [c.expr for c in release.canary_checks("image", v2, release.Thresholds())]
        assert wait_for(lambda: all(_prometheus(stack, e) for e in figures), 90, 1), "no canary figures"
        step("promote", "--max-p99=30")  # its figures read, their bounds lifted for a busy 2-core machine
        assert set(traffic.answers(WINDOW)) == {v2}
        quiet_drift(v2)

        mark("8. roll back")
        # 8. roll back: every answer v1's again
        step("rollback")
        assert set(traffic.answers(WINDOW)) == {v1}
        quiet_drift(v1)

        mark("the drift alert")
        # the drift alert never fired on this in-distribution traffic
        firing = 'max_over_time(ALERTS{alertname="ServableInputDrift", alertstate="firing"}[1h])'
        assert not _prometheus(stack, firing), _prometheus(stack, firing)
        # for the record: the largest PSI any window had (the canary's share makes a window repeat some images)
        psi = {(s["metric"]["version"], s["metric"]["feature"]): round(float(s["value"][1]), 3)
               for s in _prometheus(stack, "max_over_time(servable:drift_psi:max[1h])")}  # fmt: skip
        mark(f"largest PSI of each version and feature over the run: {psi}")
    assert traffic.sent > 20 and not traffic.failed, (traffic.sent, traffic.failed[:5])
