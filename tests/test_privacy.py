"""Privacy and security (issue 9): audit trail, key rotation, opt-in feedback loop, PII scrubbing, retention."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from servable.config import FeedbackSettings
from serving.feedback.pii import luhn_valid, scrub
from serving.feedback.store import PROVENANCE_FILE, FeedbackStore, png_from_image_bytes
from tests.conftest import ROOT, SECRET_SENTENCE, _serve
from tests.polling import wait_for

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
ROTOR_OLD, ROTOR_NEW = "rotor-old-key-1111", "rotor-new-key-2222"
EMAIL, PHONE = "jane.roe@example.org", "+1 415 555 0142"
PLANTED = f"Terrible film, refund me! Write to {EMAIL} or call {PHONE}. {SECRET_SENTENCE}"


def _files_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- PII scrubber (documented regex set)


@pytest.mark.parametrize(
    ("text", "kind", "raw"),
    [
        ("mail jane.roe@example.org ok", "email", "jane.roe@example.org"),
        ("call +44 20 7946 0958 ok", "phone", "7946 0958"),
        ("call (555) 123-4567 ok", "phone", "123-4567"),
        ("card 4111 1111 1111 1111 ok", "card", "4111 1111 1111 1111"),
        ("iban GB82 WEST 1234 5698 7654 32 ok", "iban", "5698 7654"),
        ("iban DE89370400440532013000 ok", "iban", "DE89370400440532013000"),
        ("from 192.168.10.254 ok", "ip", "192.168.10.254"),
        ("from 2001:db8:85a3::8a2e:370:7334 ok", "ip", "8a2e:370:7334"),
        ("passport X1234567 ok", "number", "1234567"),
        ("card 4111-1111-1111-1112 (bad checksum) ok", "number", "4111-1111-1111-1112"),
    ],
)
def test_pii_scrubber_redacts_documented_kinds(text, kind, raw):
    clean, found = scrub(text)
    assert raw not in clean and found.get(kind, 0) >= 1, (clean, found)
    assert clean.split()[0] == text.split()[0] and clean.endswith(" ok")  # only the PII is replaced


def test_pii_scrubber_keeps_ordinary_review_text():
    text = "I give it 10 out of 10: the best film of 2019, 2 hours long, at 12:30 in room 4."
    assert scrub(text) == (text, {})
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


# ---------------------------------------------------------------- the hook, in process


def _hook(tmp_path, kind="text", **kw):
    from serving.feedback.hook import FeedbackHook
    from serving.feedback.store import png_from_image_bytes
    from serving.heads import ClassifierHead

    settings = FeedbackSettings(dir=tmp_path / "fb", **{"flag_keys": "*", **kw})  # every caller may store
    labels = ["negative", "positive"] if kind == "text" else ["a", "b"]
    content = (lambda item: item) if kind == "text" else png_from_image_bytes
    return FeedbackHook("m" if kind == "text" else "img", ClassifierHead(labels), content, settings)


def test_feedback_hook_stores_only_with_consent(tmp_path):
    probs = np.array([[0.55, 0.45], [0.02, 0.98]], np.float32)  # low, high confidence
    texts = [PLANTED, "great"]
    observe = lambda hook, header: asyncio.run(hook.observe({"x-servable-feedback": header} if header else {},  # noqa: E731
                                                            texts, probs, "m:v1"))  # fmt: skip
    off = _hook(tmp_path, enabled=False)
    assert observe(off, "opt-in, flag") == [] and not (tmp_path / "fb").exists()
    on = _hook(tmp_path, enabled=True, confidence_threshold=0.6)
    assert observe(on, None) == [] and observe(on, "flag") == []
    assert not _files_bytes(tmp_path / "fb")
    low = observe(on, "opt-in")  # the low-confidence text only
    assert len(low) == 1
    both = observe(on, "opt-in, flag")  # flagged: both, whatever the confidence
    assert len(both) == 2
    metas = {it.meta["id"]: it.meta for it in on.store.items("m")}
    assert metas[low[0]]["reason"] == "low-confidence" and metas[both[1]]["reason"] == "flagged"
    assert metas[low[0]]["predicted_label"] == "negative" and metas[low[0]]["label"] is None
    assert metas[low[0]]["pii_redacted"] == {"email": 1, "phone": 1, "number": 1}
    assert set(metas[low[0]]) == {"id", "model", "model_tag", "kind", "predicted_label", "confidence", "reason",
                                  "created", "created_ts", "label", "labelled_at", "pii_redacted"}  # fmt: skip
    everything = b"".join(_files_bytes(tmp_path / "fb").values())
    assert EMAIL.encode() not in everything and b"415 555" not in everything and b"X1234567" not in everything
    assert b"[EMAIL]" in everything and b"[PHONE]" in everything


def test_feedback_images_are_reencoded_without_metadata(tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # camera maker; GPS would sit beside it
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert b"SecretCam" in buf.getvalue()
    hook = _hook(tmp_path, kind="image", enabled=True, confidence_threshold=1.0)
    (item_id,) = asyncio.run(hook.observe({"x-servable-feedback": "opt-in"}, [buf.getvalue()],
                                          np.array([[0.3, 0.7]]), "img:v1"))  # fmt: skip
    stored = (tmp_path / "fb" / "img" / f"{item_id}.png").read_bytes()
    assert b"SecretCam" not in stored and not Image.open(io.BytesIO(stored)).getexif()
    assert Image.open(io.BytesIO(stored)).size == (20, 20)


def test_queue_limit_and_retention_on_write_and_by_cli(tmp_path):
    settings = FeedbackSettings(dir=tmp_path / "fb", retention_days=7, max_items=3)
    store = FeedbackStore(settings)
    common = dict(model="m", model_tag="m:v1", kind="text", predicted_label="negative", confidence=0.5,
                  reason="low-confidence")  # fmt: skip
    old = [store.add(content=f"old {i}", now=time.time() - 8 * 86400, **common) for i in range(2)]
    fresh = store.add(content="fresh", **common)
    assert store.count("m") == 3
    # on write: the first write of a process purges first, so the two old items make room
    hook = _hook(tmp_path, enabled=True, confidence_threshold=1.0, retention_days=7, max_items=3)
    ids = asyncio.run(hook.observe({"x-servable-feedback": "opt-in"}, ["a", "b", "c"], np.full((3, 2), 0.5), "m:v1"))
    assert len(ids) == 2, "two stored, the third dropped: the queue is full (max_items=3)"
    left = {p.stem for p in (tmp_path / "fb" / "m").iterdir()}
    assert {o.meta["id"] for o in old}.isdisjoint(left) and fresh.meta["id"] in left
    # by the CLI: age an item by its recorded creation time (and its mtime), then purge
    sidecar = fresh.path
    meta = json.loads(sidecar.read_text())
    meta["created_ts"] -= 30 * 86400
    sidecar.write_text(json.dumps(meta))
    os.utime(sidecar, (time.time() - 30 * 86400,) * 2)
    out = _cli(tmp_path / "fb", "purge")
    assert "deleted 1 item" in out
    assert not any(p.stem == fresh.meta["id"] for p in (tmp_path / "fb" / "m").iterdir())
    assert store.count("m") == 2


def test_storing_needs_a_key_allowed_to_flag(tmp_path):
    probs = np.array([[0.55, 0.45]], np.float32)
    header = {"x-servable-feedback": "opt-in, flag"}
    hook = _hook(tmp_path, enabled=True, flag_keys="bob, carol")
    for key_name in ("alice", None, "", "bob,carol"):  # another key; auth off (no key); no name at all
        assert asyncio.run(hook.observe(header, [PLANTED], probs, "m:v1", key_name)) == []
    assert not _files_bytes(tmp_path / "fb")
    assert len(asyncio.run(hook.observe(header, [PLANTED], probs, "m:v1", "carol"))) == 1
    # `*`: every caller, the anonymous ones of a service without auth included; empty (the default): nobody
    anyone = _hook(tmp_path, enabled=True, flag_keys="*")
    assert len(asyncio.run(anyone.observe(header, [PLANTED], probs, "m:v1", None))) == 1
    assert not FeedbackSettings().key_may_store("alice") and not FeedbackSettings().key_may_store(None)


def test_queue_byte_budget_and_item_cap(tmp_path):
    """A flood of opted-in items cannot fill the volume: every write checks the folder's bytes first."""
    hook = _hook(tmp_path, enabled=True, confidence_threshold=1.0, max_bytes=4000, max_item_bytes=1000)
    header, probs = {"x-servable-feedback": "opt-in"}, np.full((1, 2), 0.5)
    outcomes = [len(asyncio.run(hook.observe(header, [f"review {i} " + "x" * 500], probs, "m:v1", "k")))
                for i in range(12)]  # fmt: skip
    used = sum(p.stat().st_size for p in (tmp_path / "fb").rglob("*") if p.is_file())
    assert used <= 4000 and sum(outcomes) >= 3, (used, outcomes)  # ~900 bytes each: some fit, the rest dropped
    assert outcomes[-1] == 0 and FeedbackStore(hook.settings).usage("m") == (sum(outcomes), used)
    # one item over the per-item cap is dropped even with room to spare; the next small one is stored
    roomy = _hook(tmp_path / "2", enabled=True, confidence_threshold=1.0, max_item_bytes=1000)
    assert asyncio.run(roomy.observe(header, ["y" * 1001, "fine"], np.full((2, 2), 0.5), "m:v1", "k")) != []
    assert [it.content_path.read_text() for it in roomy.store.items("m")] == ["fine"]


def test_images_are_stored_at_the_model_resolution(tmp_path):
    """A 12 Mpx photo is stored shrunk to the model's input size (aspect kept), not as a huge PNG."""
    from servable.config import ImageServeSettings
    from serving.adapters.image import ImageAdapter

    photo = Image.fromarray((np.random.default_rng(1).random((3000, 4000, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    adapter = ImageAdapter(ImageServeSettings())
    adapter.size = 32  # what `load` reads from the artifact's pre-processing
    png = adapter.feedback_content(buf.getvalue())
    assert Image.open(io.BytesIO(png)).size == (32, 24) and len(png) < 10_000
    from serving.feedback.hook import FeedbackHook
    from serving.heads import ClassifierHead

    settings = FeedbackSettings(dir=tmp_path / "fb", enabled=True, flag_keys="k", confidence_threshold=1.0)
    hook = FeedbackHook("img", ClassifierHead(["a", "b"]), adapter.feedback_content, settings)
    (item_id,) = asyncio.run(hook.observe({"x-servable-feedback": "opt-in"}, [buf.getvalue()], np.array([[0.5, 0.5]]),
                                          "img:v1", "k"))  # fmt: skip
    assert Image.open(tmp_path / "fb" / "img" / f"{item_id}.png").size == (32, 24)


# ---------------------------------------------------------------- CLI, export, training loaders


def _cli(queue: Path, *args: str, check: bool = True) -> str:
    # Asserts the CLI imports neither torch nor BentoML (a labelling machine needs neither).
    code = ("import runpy, sys; sys.argv = ['serving.feedback', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('serving.feedback', run_name='__main__')\n"
            "finally:\n    assert not {'torch', 'bentoml'} & set(sys.modules), 'heavy import'")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, "--dir", str(queue), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, check=False)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_cli_labels_and_exports_a_text_set_the_training_loader_reads(tmp_path):
    from training.data_text import load_user_file

    store = FeedbackStore(FeedbackSettings(dir=tmp_path / "fb"))
    reviews = [(f"{EMAIL} says film {i} was {'great' if i % 2 else 'awful'}", i % 2) for i in range(12)]
    common = dict(model="sentiment-bert", model_tag="sentiment-bert:v1", kind="text", predicted_label="positive",
                  confidence=0.55, reason="low-confidence")  # fmt: skip
    items = [store.add(content=t, **common) for t, _ in reviews]
    labels = ["negative", "positive"]
    assert "label=None" in _cli(tmp_path / "fb", "list", "--unlabelled")
    assert ": negative" in _cli(tmp_path / "fb", "label", items[0].meta["id"], labels[reviews[0][1]])
    csv_path = tmp_path / "labels.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([it.meta["id"], labels[y]] for it, (_, y) in zip(items[1:], reviews[1:], strict=True))
    assert "labelled 11 item(s)" in _cli(tmp_path / "fb", "import-labels", str(csv_path))
    assert _cli(tmp_path / "fb", "list", "--unlabelled") == ""
    shown = _cli(tmp_path / "fb", "show", items[1].meta["id"])
    assert "[EMAIL] says film 1" in shown and EMAIL not in shown
    out = tmp_path / "export"
    assert "python -m training text --data-file" in _cli(tmp_path / "fb", "export", "--model", "sentiment-bert",
                                                         "--out", str(out))  # fmt: skip
    splits = load_user_file(out / "feedback.csv", seed=0, val_fraction=0.2)
    assert splits.labels == labels and len(splits.train) + len(splits.val) + len(splits.test) == 12
    prov = splits.provenance["feedback"]
    assert prov["source"] == "feedback queue" and prov["model_tags"] == ["sentiment-bert:v1"]
    counts = {"items": 12, "by_label": {"negative": 6, "positive": 6}, "by_reason": {"low-confidence": 12}}
    assert prov["counts"] == counts and prov["pii_scrubbed"]
    assert "exported_at" in prov and json.loads((out / PROVENANCE_FILE).read_text()) == prov
    assert EMAIL not in (out / "feedback.csv").read_text()
    assert "not empty" in _cli(tmp_path / "fb", "export", "--model", "sentiment-bert", "--out", str(out), check=False)


@pytest.mark.slow
def test_exported_image_folder_loads_and_trains(tmp_path):
    from servable.config import FASHION_MNIST_DIR, ImageTrainConfig
    from training.data_images import read_idx, scan_image_folder
    from training.image_pipeline import train_image

    x = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:300]
    y = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:300]
    names = {0: "T-shirt/top", 1: "Trouser", 9: "Ankle boot"}  # a label with a slash: folder T-shirt_top
    store = FeedbackStore(FeedbackSettings(dir=tmp_path / "fb"))
    picked = [i for i in range(len(y)) if int(y[i]) in names][:36]
    for i in picked:
        item = store.add(model="fashion-cnn", model_tag="fashion-cnn:v1", kind="image",
                         content=png_from_image_bytes(_png(x[i])), predicted_label="Shirt", confidence=0.4,
                         reason="low-confidence")  # fmt: skip
        store.label(item.meta["id"], names[int(y[i])])
    out = tmp_path / "export"
    prov = store.export("fashion-cnn", out)
    classes, files = scan_image_folder(out)
    assert classes == ["Ankle_boot", "T-shirt_top", "Trouser"] and len(files) == len(picked)
    assert prov["label_dirs"]["T-shirt_top"] == "T-shirt/top"
    cfg = ImageTrainConfig(data_dir=out, runs_dir=tmp_path / "runs", limit=None, image_size=32, epochs_head=1,
                           epochs_finetune=0, batch_size=16, quantize=False, register_model=False, progress=False,
                           calibration_size=8, version="fb1")  # fmt: skip
    run = train_image(cfg)
    assert run.splits.provenance["feedback"]["source"] == "feedback queue"
    assert run.splits.provenance["feedback"]["counts"]["items"] == len(picked)  # the manifest's provenance
    assert run.splits.provenance["feedback"]["model_tags"] == ["fashion-cnn:v1"] and run.metrics["test"]


# ---------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def privacy_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("privacy")
    keys = root / "secrets" / "api-keys"
    keys.parent.mkdir()
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\nrotor:{ROTOR_OLD}\n")
    return {"keys": keys, "audit": root / "audit" / "audit.jsonl", "fb_on": root / "fb-on", "fb_off": root / "fb-off"}


@pytest.fixture(scope="module")
def privacy_image_server(image_run, tmp_path_factory, privacy_dirs):
    """Inline keys, audit on stderr (the default), feedback loop off (the default) but a queue folder set."""
    server = _serve("image", image_run.tag, tmp_path_factory, {
        "SERVABLE_AUTH_KEYS": f"alice:{ALICE},bob:{BOB}", "SERVABLE_FEEDBACK_DIR": str(privacy_dirs["fb_off"]),
        "SERVABLE_FEEDBACK_CONFIDENCE_THRESHOLD": "1.0",
    })  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def privacy_text_server(text_run, tmp_path_factory, privacy_dirs, privacy_image_server):
    """Keys from a file, audit to a rotating file, feedback loop on with every prediction 'low-confidence',
    only bob's key allowed to store.

    Started after the image server on purpose: `bentoml serve` empties the Prometheus multiprocess
    folder of its BENTOML_HOME at start, which would hide this server's metrics if it started first.
    """
    server = _serve("text", text_run.tag, tmp_path_factory, {
        "SERVABLE_AUTH_KEYS": "", "SERVABLE_AUTH_KEYS_FILE": str(privacy_dirs["keys"]),
        "SERVABLE_AUDIT_FILE": str(privacy_dirs["audit"]),
        "SERVABLE_FEEDBACK_ENABLED": "true", "SERVABLE_FEEDBACK_DIR": str(privacy_dirs["fb_on"]),
        "SERVABLE_FEEDBACK_CONFIDENCE_THRESHOLD": "1.0", "SERVABLE_FEEDBACK_FLAG_KEYS": "bob",
    })  # fmt: skip
    yield server
    server.stop()


def _audit_text(audit: Path) -> str:
    """Every HTTP worker's audit file: audit.jsonl, audit.w2.jsonl, ..."""
    return "".join(f.read_text() for f in sorted(audit.parent.glob(f"{audit.stem}*{audit.suffix}")))


def _audit_lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("logger") == "servable.audit"]


def test_audit_log_names_callers_and_model_never_keys_or_content(privacy_text_server, privacy_image_server,
                                                                 privacy_dirs, text_run, image_run):  # fmt: skip
    txt, img = privacy_text_server.url, privacy_image_server.url
    rids = {}
    for who, key in (("alice", ALICE), ("bob", BOB)):
        r = requests.post(txt + "/sentiment", json={"text": SECRET_SENTENCE}, headers={"x-api-key": key}, timeout=30)
        assert r.status_code == 200, r.text
        rids[who] = r.headers["x-request-id"]
    refused = requests.post(txt + "/sentiment", json={"text": SECRET_SENTENCE}, headers={"x-api-key": "nope-nope-nope"},
                            timeout=30)  # fmt: skip
    assert refused.status_code == 401
    blob = _png(image_run.splits.test_x[0][:, :, 0])
    r = requests.post(img + "/classify", files={"image": ("x.png", blob)}, headers={"x-api-key": BOB}, timeout=30)
    assert r.status_code == 200
    # A worker writes the audit line once the answer is sent: wait (bounded) for the last calls' lines.
    last_text, last_image = refused.headers["x-request-id"], r.headers["x-request-id"]
    wait_for(lambda: last_text in _audit_text(privacy_dirs["audit"]) and last_image in privacy_image_server.log(),
             timeout_s=10)  # fmt: skip
    metrics = requests.get(txt + "/metrics", timeout=10).text
    audit_text = _audit_text(privacy_dirs["audit"])
    entries = _audit_lines(audit_text)
    by_name = {e["key_name"]: e for e in entries if e["endpoint"] == "/sentiment"}
    for who in ("alice", "bob"):
        e = by_name[who]
        assert (e["status"], e["model_tag"], e["request_id"], e["method"]) == (200, text_run.tag, rids[who], "POST")
        assert e["latency_ms"] > 0 and e["ts"] > 0 and e["service"] == "sentiment_classifier"
    assert by_name[None]["status"] == 401  # failed attempts are audited, without the key presented
    # the default sink: the image service's audit lines are in its stderr log
    img_entries = [e for e in _audit_lines(privacy_image_server.log()) if e["endpoint"] == "/classify"]
    assert img_entries and img_entries[-1]["key_name"] == "bob" and img_entries[-1]["model_tag"] == image_run.tag
    # the audit file holds audit lines only; the general log holds no audit line (separate sink)
    assert all(e.get("logger") == "servable.audit" for e in map(json.loads, audit_text.splitlines()))
    assert not _audit_lines(privacy_text_server.log())
    assert re.search(r'servable_requests_by_key_total\{[^}]*key_name="alice"[^}]*\} [1-9]', metrics), metrics
    assert re.search(r'servable_requests_by_key_total\{[^}]*key_name="-"[^}]*status="401"', metrics)
    for where in (audit_text, privacy_text_server.log(), privacy_image_server.log(), metrics):
        for secret in (ALICE, BOB, "nope-nope-nope", "PURPLE-ELEPHANT", "X1234567"):
            assert secret not in where


def test_key_rotation_without_restart(privacy_text_server, privacy_dirs):
    """A new key file `mv`-ed into the mounted secrets directory (as compose mounts it) is in force in
    every worker within KeyStore.RELOAD_INTERVAL_S, without a restart, although it has the old file's
    mtime and size (only its inode is new); the reload logs key names and count, never a key."""
    from serving.auth import KeyStore

    url, pid = privacy_text_server.url + "/sentiment", privacy_text_server.proc.pid
    call = lambda key: requests.post(url, json={"text": "fine"}, headers={"x-api-key": key}, timeout=30).status_code  # noqa: E731
    assert call(ROTOR_OLD) == 200 and call(ROTOR_NEW) == 401
    keys = privacy_dirs["keys"]
    tmp = keys.with_name(".api-keys.new")
    tmp.write_text(f"alice:{ALICE}\nbob:{BOB}\nrotor:{ROTOR_NEW}\n")
    old = os.stat(keys)
    os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (os.stat(tmp).st_mtime_ns, os.stat(tmp).st_size) == (old.st_mtime_ns, old.st_size)
    subprocess.run(["mv", str(tmp), str(keys)], check=True)
    moved = time.monotonic()
    # once the interval has passed, every worker refuses the old key and takes the new one
    time.sleep(max(0.0, moved + KeyStore.RELOAD_INTERVAL_S + 0.1 - time.monotonic()))
    assert {call(ROTOR_OLD) for _ in range(8)} == {401} and {call(ROTOR_NEW) for _ in range(8)} == {200}
    assert call(ALICE) == 200
    assert privacy_text_server.proc.poll() is None and privacy_text_server.proc.pid == pid  # no restart
    log = privacy_text_server.log()
    assert re.search(r"loaded 3 API key\(s\) from \S+: alice, bob, rotor", log), log[-2000:]
    assert ROTOR_OLD not in log and ROTOR_NEW not in log


def test_feedback_off_stores_nothing(privacy_image_server, privacy_dirs, image_run):
    blob = _png(image_run.splits.test_x[1][:, :, 0])
    r = requests.post(privacy_image_server.url + "/classify", files={"image": ("x.png", blob)},
                      headers={"x-api-key": ALICE, "x-servable-feedback": "opt-in, flag"}, timeout=30)  # fmt: skip
    assert r.status_code == 200
    assert not privacy_dirs["fb_off"].exists()


def test_feedback_on_without_opt_in_stores_nothing(privacy_text_server, privacy_dirs):
    before = _files_bytes(privacy_dirs["fb_on"])
    for header in ({}, {"x-servable-feedback": "flag"}, {"x-servable-feedback": "opt-out"}):
        r = requests.post(privacy_text_server.url + "/sentiment", json={"texts": [PLANTED, "so-so"]},
                          headers={"x-api-key": ALICE, **header}, timeout=30)  # fmt: skip
        assert r.status_code == 200
    assert _files_bytes(privacy_dirs["fb_on"]) == before


def test_only_a_key_allowed_to_flag_makes_the_server_store(privacy_text_server, privacy_dirs):
    url, consent = privacy_text_server.url, {"x-servable-feedback": "opt-in, flag"}
    before = _files_bytes(privacy_dirs["fb_on"])
    # a valid key, not in SERVABLE_FEEDBACK_FLAG_KEYS: its consent and flag are not enough
    r = requests.post(url + "/sentiment", json={"texts": ["Alice's own words.", "more"]},
                      headers={"x-api-key": ALICE, **consent}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    assert _files_bytes(privacy_dirs["fb_on"]) == before
    r = requests.post(url + "/sentiment", json={"text": "Bob flags this one."}, headers={"x-api-key": BOB, **consent},
                      timeout=30)  # fmt: skip
    assert r.status_code == 200
    items = FeedbackStore(FeedbackSettings(dir=privacy_dirs["fb_on"])).items("sentiment-bert")
    texts = [it.content_path.read_text() for it in items]
    assert "Bob flags this one." in texts and not any("Alice" in t for t in texts)
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert re.search(r'servable_feedback_items_total\{[^}]*outcome="key_not_allowed"[^}]*\} [1-9]', metrics)


def test_opt_in_text_is_scrubbed_before_it_reaches_disk(privacy_text_server, privacy_dirs, text_run):
    url = privacy_text_server.url
    r = requests.post(url + "/sentiment", json={"text": PLANTED},
                      headers={"x-api-key": BOB, "x-servable-feedback": "opt-in"}, timeout=30)  # fmt: skip
    assert r.status_code == 200
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PLANTED]}]}
    r2 = requests.post(url + "/v2/models/sentiment-bert/infer", json=v2,
                       headers={"x-api-key": BOB, "x-servable-feedback": "opt-in"}, timeout=30)  # fmt: skip
    assert r2.status_code == 200
    # and one call without consent: counted as such, not stored (this test's own traffic, so it passes alone)
    r3 = requests.post(url + "/sentiment", json={"text": "No consent given."}, headers={"x-api-key": BOB}, timeout=30)
    assert r3.status_code == 200
    items = FeedbackStore(FeedbackSettings(dir=privacy_dirs["fb_on"])).items("sentiment-bert")
    assert len(items) >= 2 and not any(b"No consent given" in it.content_path.read_bytes() for it in items)
    for it in items[-2:]:
        text = it.content_path.read_text()
        assert "[EMAIL]" in text and "[PHONE]" in text and "Terrible film" in text
        assert it.meta["model_tag"] == text_run.tag and it.meta["label"] is None
        assert it.meta["predicted_label"] == r.json()["predictions"][0]["label"]
    on_disk = b"".join(_files_bytes(privacy_dirs["fb_on"]).values())
    never = [EMAIL, PHONE, "415 555", "X1234567", BOB, ALICE, "bob", r.headers["x-request-id"],
             r2.headers["x-request-id"]]  # fmt: skip
    for raw in never:
        assert raw.encode() not in on_disk, raw
    for raw in (EMAIL, "415 555"):
        assert raw not in privacy_text_server.log() and raw not in _audit_text(privacy_dirs["audit"])
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert re.search(r'servable_feedback_queue_size\{[^}]*model="sentiment-bert"[^}]*\} [1-9]', metrics)
    assert re.search(r'servable_low_confidence_total\{[^}]*model="sentiment-bert"[^}]*\} [1-9]', metrics)
    assert re.search(r'servable_feedback_items_total\{[^}]*outcome="no_consent"', metrics)


def test_audit_file_rotation_bounds_retention(tmp_path, monkeypatch):
    import logging

    from servable.config import AuditSettings
    from serving import audit

    monkeypatch.setattr(audit, "_configured", False)
    monkeypatch.setattr(audit.log, "propagate", True)
    before = list(audit.log.handlers)
    path = tmp_path / "audit" / "audit.jsonl"
    audit.configure(AuditSettings(file=path, max_bytes=2048, backup_count=2))
    try:
        audit.set_model_tag("svc", "m:v1")
        scope = {"path": "/v2/models/m/infer", "method": "POST", "state": {"key_name": "alice", "request_id": "r1"}}
        for _ in range(100):
            audit.record("svc", scope, 200, time.perf_counter())
    finally:
        for h in set(audit.log.handlers) - set(before):
            h.close()
            audit.log.removeHandler(h)
        audit.log.setLevel(logging.NOTSET)
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2048 for p in path.parent.iterdir())
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["endpoint"] == "/v2/models/{name}/infer" and line["model_tag"] == "m:v1" and line["key_name"] == "alice"


def test_feedback_write_failure_never_fails_the_request(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the queue root is a file: every write fails
    from serving.feedback.hook import FeedbackHook
    from serving.heads import ClassifierHead

    hook = FeedbackHook(
        "m", ClassifierHead(["negative", "positive"]), str, FeedbackSettings(dir=blocker, enabled=True, flag_keys="*")
    )
    stored = asyncio.run(hook.observe({"x-servable-feedback": "opt-in, flag"}, ["x"], np.array([[0.5, 0.5]]), "m:v1"))
    assert stored == [] and blocker.read_text() == ""  # logged and counted as an error, never raised
