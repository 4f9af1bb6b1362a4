"""The release dashboard's panels, pictured: a release played through on the local stack, then its panels
drawn from their own queries (deploy/dashboard_snapshot.py) -> docs/img/releasing/*.png + release.json.

    python -m loadtest.release_pictures                  (or `make release-pictures`; about 15 minutes)
    python -m loadtest.release_pictures --live fashion-cnn:v1 --candidate fashion-cnn:v2   (your versions)

Without tags it trains the suite's fixture image model twice (tests/fixture_models.py: 400 Fashion-MNIST
images, 32 px; v1 and a retrain with another seed, v2) in a throw-away model store. Then the local stack
(deploy/local_stack.py: nginx, Prometheus, the image model's replicas) serves v1 under steady traffic of
Fashion-MNIST test images, and deploy/release.py takes v2 through each step, as a user runs them:

  shadow (v2 scores half of the requests off the request path) -> canary at 30 % -> inputs shift
  (the same images inverted, for a while) -> promote -> in-distribution traffic again.

Each phase lasts --phase seconds (default 90). The release panels of the dashboard are then drawn over
the whole run; release.json beside them records the command, the date, the machine, the tags, each
step's time and what each panel's queries returned.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

OUT = Path("docs/img/releasing")
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
# The dashboard's release panels (deploy/render.py's titles), drawn in this order.
PANELS = [
    "Shadow: candidate agreement with the live answers",
    "Shadow: live vs candidate label (classifiers)",
    "Shadow: rows scored and dropped",
    "Requests and 5xx ratio per version (canary)",
    "Latency p99 per version (canary)",
    "Input drift: PSI against the training reference",
    "Model version served",
]
KEY = "release-pictures-" + os.urandom(6).hex()
SLACK = {"SERVABLE_IMAGE_SERVE_MAX_LATENCY_MS": "5000", "SERVABLE_AUTH_FAILED_LIMIT": "1000000",
         "SERVABLE_IMAGE_SERVE_DRIFT_WINDOW": "50"}  # fmt: skip  # PSI from 50 requests: a shift shows in seconds


def fixture_versions(runs_dir: Path) -> tuple[str, str]:
    """v1 and v2 of the suite's fixture image model: the same recipe, another seed (a retrain)."""
    from tests.fixture_models import image_config
    from training.image_pipeline import train_image

    v1 = train_image(image_config(runs_dir, "v1")).tag
    v2 = train_image(image_config(runs_dir, "v2", seed=7)).tag
    return str(v1), str(v2)


def pngs(n: int = 200) -> tuple[list[bytes], list[bytes]]:
    """Fashion-MNIST test images as uploads, and the same inverted (a shift the drift panel must show)."""
    import io

    from PIL import Image

    from servable.idx import read_idx

    def png(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        return buf.getvalue()

    images = read_idx(FASHION_MNIST_TEST)[:n]
    return [png(p) for p in images], [png(255 - p) for p in images]


class Traffic:
    """Clients posting images through the proxy all along; `shifted` switches them to the inverted ones."""

    def __init__(self, url: str, ca_file: str, plain: list[bytes], inverted: list[bytes], clients: int = 3) -> None:
        self.url, self.ca_file, self.plain, self.inverted = url, ca_file, plain, inverted
        self.stop, self.shifted = threading.Event(), threading.Event()
        self.sent, self.failed = 0, 0
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import requests

        session, n = requests.Session(), i
        while not self.stop.is_set():
            body = (self.inverted if self.shifted.is_set() else self.plain)[n % len(self.plain)]
            n += len(self.threads)
            try:
                r = session.post(self.url + "/classify", files={"image": ("x.png", body, "image/png")},
                                 headers={"x-api-key": KEY}, timeout=60, verify=self.ca_file)  # fmt: skip
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            self.sent += 1
            self.failed += not ok
            self.stop.wait(0.1)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


def play(live: str, candidate: str, workdir: Path, phase_s: float, out: Path, command: str,
         min_agreement: float) -> dict:  # fmt: skip
    """The release, step by step under traffic, then the panels drawn over it; returns release.json's record."""
    from deploy import dashboard_snapshot as snap
    from deploy import release
    from deploy.local_stack import LocalStack

    steps: list[dict] = []
    version = release.version_of(candidate)
    stack = LocalStack(workdir, api_keys={"pictures": KEY}, tags={"image": live}, extra_env=SLACK,
                       replicas_per_kind={"image": 1, "text": 0}, rate_limit="1000r/s", rate_burst=1000)  # fmt: skip
    plain, inverted = pngs()
    with stack:
        handler_stop = threading.Event()

        def handle() -> None:  # what `python -m deploy.local_stack` does in its loop
            while not handler_stop.wait(0.5):
                stack.handle_request()

        def step(name: str, *args: str) -> None:
            argv = [name, *args, "--model", "image", "--target", "local", "--stack", str(workdir)]
            print(f"{datetime.now(UTC):%H:%M:%S} python -m deploy.release {' '.join(argv)}", flush=True)
            if release.main(argv) != 0:
                raise SystemExit(f"deploy.release {name} refused or failed; stack logs:\n{stack.logs()[-4000:]}")
            steps.append({"step": " ".join([name, *args]), "at": time.time()})

        handler = threading.Thread(target=handle, daemon=True)
        handler.start()
        start = time.time()
        with Traffic(stack.proxy_url, stack.ca_file, plain, inverted) as traffic:
            try:
                time.sleep(phase_s)
                step("shadow", "--tag", candidate, "--share", "0.5")
                time.sleep(phase_s)
                # The fixture models are tiny (about 40 % accurate): 0 passes any agreement, but the figure must exist.
                step("canary", "--tag", candidate, "--weight", "30", "--min-agreement", str(min_agreement))
                time.sleep(phase_s)
                traffic.shifted.set()
                steps.append({"step": "inputs shift: the same images inverted", "at": time.time()})
                time.sleep(phase_s)
                traffic.shifted.clear()
                steps.append({"step": "inputs back to the test images", "at": time.time()})
                step("promote", "--max-p99", "10")
                time.sleep(phase_s)
            finally:
                handler_stop.set()
        end = time.time()
        dashboard = snap.load_dashboard()
        panels = snap.select_panels(dashboard, PANELS, [])
        step_s = snap.default_step(start, end)
        shots = snap.snapshot(panels, stack.prometheus_url, out, start, end, step_s)
    print("\n".join(snap.report(shots)))
    rec = snap.record(shots, start, end, step_s, command)
    rec["models"] = {"live": live, "candidate": candidate, "candidate_version": version}
    rec["steps"] = [{**s, "at": datetime.fromtimestamp(s["at"], UTC).isoformat(timespec="seconds")} for s in steps]
    rec["traffic"] = {"requests": traffic.sent, "failed": traffic.failed}
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", help="the image model's served tag (default: the fixture model's v1, trained now)")
    ap.add_argument("--candidate", help="the new version's tag (default: the fixture model's v2, trained now)")
    ap.add_argument("--phase", type=float, default=90, help="seconds of traffic in each phase")
    ap.add_argument("--min-agreement", type=float, default=None,
                    help="the canary step's threshold (default: deploy.release's with --live, else 0: the fixture "
                         "models agree on few images)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if bool(args.live) != bool(args.candidate):
        ap.error("--live and --candidate go together")
    command = "python -m loadtest.release_pictures " + " ".join(argv if argv is not None else sys.argv[1:])
    scratch = Path(tempfile.mkdtemp(prefix="release-pictures-"))
    try:
        if not args.live:  # a model store of its own, before anything imports bentoml
            os.environ["BENTOML_HOME"] = str(scratch / "bentoml")
            args.live, args.candidate = fixture_versions(scratch / "runs")
            args.min_agreement = 0.0 if args.min_agreement is None else args.min_agreement
        if args.min_agreement is None:
            from deploy.release import Thresholds

            args.min_agreement = Thresholds.min_agreement
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("*.png"):
            old.unlink()
        rec = play(args.live, args.candidate, scratch / "stack", args.phase, args.out, command.strip(),
                   args.min_agreement)  # fmt: skip
        (args.out / "release.json").write_text(json.dumps(rec, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(p["has_data"] for p in rec["panels"]) and not rec["traffic"]["failed"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
