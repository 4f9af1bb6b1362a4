"""Locust load test of every served model: real inputs, checked answers, load shapes and the SLO gate.

One user class per SERVED_MODELS entry (servable/config.py), read when Locust loads this file;
LOADTEST_EXTRA_MODELS="module:ATTR,..." adds ServedModelEntry objects defined elsewhere first.
Image and sentiment have the detailed users below; any other model gets a user that posts its
entry's `example` request to its route ("<kind> <route>") and checks the answer's predictions.
Traffic mix (stated, by task weights; users split 2 : 3 : 1 for image, sentiment, each other model):
  image      60 % one image as a multipart upload, 15 % four images as base64 JSON,
             25 % V2 infer with 1-2 images;
  sentiment  60 % one sentence, 15 % eight sentences, 25 % V2 infer with 1-4 sentences;
  other      its example request.
Each answer is checked for status and shape (counts, labels, probabilities), so a wrong
answer is a failure, not a success.

Hosts: <KIND>_URL (IMAGE_URL, TEXT_URL, ...), each falling back to --host (one URL with path
routing, as behind the proxy or docker compose, which serves V2 under <KIND>_V2_PREFIX=/<kind>);
HTTPS with a private CA: LOADTEST_CA_BUNDLE (or REQUESTS_CA_BUNDLE).
Key: LOADTEST_API_KEY, else the first of SERVABLE_AUTH_KEYS.
Shape: LOAD_SHAPE=steady|ramp|spike (sizes: LOAD_USERS, LOAD_DURATION); unset: Locust's -u/-r/-t.
Inputs: LOADTEST_INPUTS folder (see loadtest/inputs.py). Gate: loadtest/slo.toml (see loadtest/slo.py).
"""

from __future__ import annotations

import base64
import os
import random
import sys
from pathlib import Path
from typing import ClassVar

from locust import HttpUser, LoadTestShape, between, events, task
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `locust -f` does not put the repo on the path
from loadtest import inputs, profiles, slo
from loadtest.run import EXTRA_MODELS_ENV, add_extra_models, example_request, url_env, v2_prefix_env
from servable.config import SERVED_MODELS

add_extra_models(os.environ.get(EXTRA_MODELS_ENV, ""))

DATA = inputs.load(Path(os.environ.get("LOADTEST_INPUTS") or inputs.DEFAULT_DIR))
B64_IMAGES = [base64.b64encode(b).decode() for b in DATA.images]


def api_key() -> str:
    if key := os.environ.get("LOADTEST_API_KEY"):
        return key
    first = (os.environ.get("SERVABLE_AUTH_KEYS") or "").split(",")[0]
    return first.split(":", 1)[1].strip() if ":" in first else ""


HEADERS = {"x-api-key": api_key()}


class BadAnswer(AssertionError):
    """The server answered 200 with something that is not a valid prediction."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise BadAnswer(message)


def check_probability(p: object) -> None:
    check(isinstance(p, float | int) and 0.0 <= p <= 1.0, f"probability {p!r} outside [0, 1]")


def check_v2(body: dict, n: int, labels: list[str]) -> None:
    outputs = {o.get("name"): o for o in body.get("outputs", [])}
    probs, lab = outputs.get("probabilities"), outputs.get("label")
    check(probs is not None and lab is not None, "V2 answer lacks probabilities or label outputs")
    c = len(labels)
    check(probs["shape"] == [n, c] and len(probs["data"]) == n * c, f"V2 probabilities shape {probs['shape']}")
    for i in range(n):
        row = probs["data"][i * c : (i + 1) * c]
        check(abs(sum(row) - 1.0) < 1e-3, f"V2 row {i} sums to {sum(row):.4f}")
        check(lab["data"][i] == labels[max(range(c), key=row.__getitem__)], f"V2 label {i} is not the argmax")


def check_predictions(body: dict, n: int | None) -> None:
    preds = body["predictions"]
    check(isinstance(preds, list) and len(preds) > 0, "no predictions")
    check(n is None or len(preds) == n, f"{len(preds)} predictions, expected {n}")


class _ModelUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.3)
    kind = ""

    def on_start(self) -> None:
        if url := os.environ.get(url_env(self.kind)):  # Locust's --host overrides class hosts: this wins
            self.client.base_url = url.rstrip("/")
        # HttpUser sets trust_env=False, so requests ignores REQUESTS_CA_BUNDLE: pass a private CA explicitly.
        if ca := os.environ.get("LOADTEST_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE"):
            self.client.verify = ca

    def post(self, name: str, path: str, validate, n: int | None, **kw) -> None:
        with self.client.post(path, headers=HEADERS, name=name, catch_response=True, **kw) as r:
            if r.status_code != 200:
                # Status 0: no HTTP answer at all (refused, TLS, timeout): say which.
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200] or repr(r.error)[:200]}")
                return
            try:
                validate(r.json(), n)
            except (BadAnswer, ValueError, KeyError, TypeError, IndexError) as exc:
                r.failure(f"bad answer: {type(exc).__name__}: {exc}")


class ExampleUser(_ModelUser):
    """A served model without a detailed user: its entry's example request, again and again."""

    abstract = True
    weight = 1
    route = ""
    request: ClassVar[dict] = {}  # keyword arguments of the POST (example_request)
    items: int | None = None

    @task
    def example(self) -> None:
        self.post(f"{self.kind} {self.route}", self.route, check_predictions, self.items, **self.request)


class _V2User(_ModelUser):
    abstract = True
    model_env, model_default = "", ""
    labels: list[str] | None = None  # from the V2 metadata, fetched once per class

    @property
    def prefix_env(self) -> str:  # the proxy serves V2 under /<kind>/ (friendly routes stay at the root)
        return v2_prefix_env(self.kind)

    def on_start(self) -> None:
        super().on_start()
        self.model = os.environ.get(self.model_env) or self.model_default
        self.v2_base = f"{os.environ.get(self.prefix_env, '').rstrip('/')}/v2/models/{self.model}"
        if type(self).labels is None:
            with self.client.get(self.v2_base, headers=HEADERS, name=f"{self.kind} v2 metadata",
                                 catch_response=True) as r:  # fmt: skip
                if r.status_code != 200:
                    r.failure(f"metadata: HTTP {r.status_code} {repr(r.error)[:200] if r.error else ''}")
                    return
                type(self).labels = r.json()["parameters"]["labels"]

    def v2(self, name: str, tensor: str, data: list[str]) -> None:
        body = {"inputs": [{"name": tensor, "datatype": "BYTES", "shape": [len(data)], "data": data}]}
        self.post(name, f"{self.v2_base}/infer", lambda b, n: check_v2(b, n, self.labels or []),
                  len(data), json=body)  # fmt: skip


class ImageUser(_V2User):
    weight = 2
    host = os.environ.get("IMAGE_URL") or None
    kind, model_env, model_default = "image", "IMAGE_MODEL", "fashion-cnn"

    def validate(self, body: dict, n: int, top_k: int) -> None:
        preds = body["predictions"]
        check(len(preds) == n, f"{len(preds)} predictions for {n} images")
        for p in preds:
            check(self.labels is None or p["label"] in self.labels, f"unknown label {p['label']!r}")
            check_probability(p["probability"])
            ranked = p["top_k"]
            check(len(ranked) == top_k, f"top_k has {len(ranked)} entries, asked {top_k}")
            check(ranked[0]["label"] == p["label"], "top_k[0] is not the predicted label")
            probs = [x["probability"] for x in ranked]
            check(probs == sorted(probs, reverse=True), "top_k not sorted by probability")

    @task(12)
    def classify_upload(self) -> None:
        blob = random.choice(DATA.images)
        ctype = "image/png" if blob.startswith(b"\x89PNG") else "image/jpeg"
        self.post("image /classify", "/classify", lambda b, n: self.validate(b, n, 3), 1,
                  files=[("image", ("item", blob, ctype))], data={"top_k": "3"})  # fmt: skip

    @task(3)
    def classify_batch_json(self) -> None:
        batch = random.sample(B64_IMAGES, 4)
        self.post("image /classify batch", "/classify", lambda b, n: self.validate(b, n, 1), 4,
                  json={"images": batch, "top_k": 1})  # fmt: skip

    @task(5)
    def v2_infer(self) -> None:
        self.v2("image v2 infer", "image", random.sample(B64_IMAGES, random.randint(1, 2)))


class SentimentUser(_V2User):
    weight = 3
    host = os.environ.get("TEXT_URL") or None
    kind, model_env, model_default = "text", "TEXT_MODEL", "sentiment-bert"

    def validate(self, body: dict, n: int) -> None:
        preds = body["predictions"]
        check(len(preds) == n, f"{len(preds)} predictions for {n} texts")
        for p in preds:
            scores = p["scores"]
            check(self.labels is None or set(scores) == set(self.labels), f"score labels {sorted(scores)}")
            check(abs(sum(scores.values()) - 1.0) < 1e-3, f"scores sum to {sum(scores.values()):.4f}")
            check(p["label"] == max(scores, key=scores.get), "label is not the highest score")
            check_probability(p["probability"])

    @task(12)
    def one_text(self) -> None:
        self.post("text /sentiment", "/sentiment", self.validate, 1, json={"text": random.choice(DATA.texts)})

    @task(3)
    def batch(self) -> None:
        self.post("text /sentiment batch", "/sentiment", self.validate, 8, json={"texts": random.sample(DATA.texts, 8)})

    @task(5)
    def v2_infer(self) -> None:
        self.v2("text v2 infer", "text", random.sample(DATA.texts, random.randint(1, 4)))


DETAILED: dict[str, type[_ModelUser]] = {"image": ImageUser, "text": SentimentUser}


def example_user(kind: str) -> type[ExampleUser]:
    """The user of a served model without a detailed one, from its SERVED_MODELS entry."""
    entry = SERVED_MODELS[kind]
    request, items = example_request(entry)
    attrs = {"kind": kind, "route": entry.route, "request": request, "items": items, "abstract": False,
             "host": os.environ.get(url_env(kind)) or None, "__module__": __name__}  # fmt: skip
    return type(f"{kind.title().replace('_', '')}ExampleUser", (ExampleUser,), attrs)


def model_users(only: str = "") -> dict[str, type[_ModelUser]]:
    """kind -> its user class for every served model; `only`: a comma list of kinds to keep."""
    keep = set(filter(None, only.split(","))) or set(SERVED_MODELS)
    return {kind: DETAILED.get(kind) or example_user(kind) for kind in SERVED_MODELS if kind in keep}


# LOAD_ONLY=kind[,kind] keeps those models' users (e.g. only one service is up).
USERS = model_users(os.environ.get("LOAD_ONLY", ""))
for _kind, _user in DETAILED.items():
    _user.abstract = _kind not in USERS  # a detailed user of a model not served (or left out) stays idle
del _kind, _user  # Locust takes every user class among this module's names
globals().update({u.__name__: u for u in USERS.values()})  # Locust picks up the user classes of this module

if (_shape := os.environ.get("LOAD_SHAPE", "").lower()) and _shape != "none":
    PROFILE = profiles.Profile.from_env(_shape)

    class SelectedShape(LoadTestShape):  # the one shape class Locust finds in this module
        def tick(self) -> tuple[int, float] | None:
            users = PROFILE.users_at(self.get_run_time())
            return None if users is None else (users, PROFILE.rate)


def endpoint_stats(environment) -> list[slo.EndpointStats]:
    def row(name: str, e) -> slo.EndpointStats:
        pct = e.get_response_time_percentile
        return slo.EndpointStats(name, e.num_requests, e.num_failures, pct(0.5) or 0, pct(0.95) or 0, pct(0.99) or 0)

    rows = [row(e.name, e) for e in environment.stats.entries.values()]
    return [*sorted(rows, key=lambda r: r.name), row(slo.TOTAL, environment.stats.total)]


@events.quitting.add_listener
def slo_gate(environment, **_kw) -> None:
    """Decide the exit code from the SLO alone (Locust would otherwise exit 1 on any failure)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    stats = endpoint_stats(environment)
    checks = slo.evaluate(stats, slo.load_config())
    print("\n" + slo.verdict_table(checks) + "\n", flush=True)
    options = environment.parsed_options
    if prefix := (getattr(options, "csv_prefix", None) or os.environ.get("LOADTEST_VERDICT_PREFIX")):
        slo.write_verdict(prefix, checks, stats)
    environment.process_exit_code = 0 if all(c.ok for c in checks) else 1
