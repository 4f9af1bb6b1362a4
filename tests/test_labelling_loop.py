"""The labelling loop, closed (issue 29 point 5): why each item was queued (and never without consent), a
labelling sheet balanced across predicted classes, and `--extra-data` runs of both pipelines that add the
labelled export to the bundled training data, keep it out of the held-out sets, record it in the artifact and
its model card, and are held to the release gate like any run."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from servable import artifact
from servable.config import FeedbackSettings
from serving.feedback.selection import SHEET_COLUMNS, balanced, by_class
from serving.feedback.store import FeedbackError, FeedbackStore, png_from_image_bytes
from tests.conftest import ROOT
from tests.test_privacy import _cli, _files_bytes
from tests.test_training_gates import DOCUMENTED, default_run
from training import gates
from training.data_images import DataError

OPT_IN = {"x-servable-feedback": "opt-in"}


def _hook(tmp_path, **kw):
    from serving.feedback.hook import FeedbackHook
    from serving.heads import ClassifierHead

    settings = FeedbackSettings(dir=tmp_path / "fb", **{"enabled": True, "flag_keys": "*", **kw})
    return FeedbackHook("m", ClassifierHead(["negative", "positive"]), lambda item: item, settings)


def _texts(share: float, inside: bool, n: int) -> list[str]:
    """`n` review texts that the content-hash sample of `share` takes (`inside`) or leaves."""
    from serving.feedback.hook import sampled

    return [t for t in (f"An ordinary review, number {i}." for i in range(400)) if sampled(t, share) == inside][:n]


# ---------------------------------------------------------------- why an item is queued, and consent


def test_each_queued_item_says_why_and_nothing_is_stored_without_opt_in(tmp_path):
    share = 0.3
    low_text, in_sample = _texts(share, True, 2)
    texts = [low_text, in_sample, _texts(share, False, 1)[0]]
    probs = np.array([[0.55, 0.45], [0.03, 0.97], [0.02, 0.98]], np.float32)  # low; confident; confident
    hook = _hook(tmp_path, confidence_threshold=0.6, sample_share=share)
    observe = lambda headers, key="k": asyncio.run(hook.observe(headers, texts, probs, "m:v1", key))  # noqa: E731
    disagree = lambda headers, rows, key="k": asyncio.run(  # noqa: E731
        hook.observe_disagreement(headers, texts, probs, "m:v2", key, rows)
    )
    # Without the caller's opt-in nothing is stored: not the low-confidence row, not the sampled one, not a
    # shadow disagreement; and an opted-in caller whose key may not store stores nothing either.
    assert observe({}) == [] and observe({"x-servable-feedback": "flag"}) == [] and disagree({}, [0, 1, 2]) == []
    for row in range(3):  # each reason alone, without consent
        assert asyncio.run(hook.observe({}, texts[row : row + 1], probs[row : row + 1], "m:v1", "k")) == []
    keyed = _hook(tmp_path, confidence_threshold=0.6, sample_share=share, flag_keys="bob")
    assert asyncio.run(keyed.observe(OPT_IN, texts, probs, "m:v1", "alice")) == []
    assert asyncio.run(keyed.observe_disagreement(OPT_IN, texts, probs, "m:v1", "alice", [2])) == []
    assert not _files_bytes(tmp_path / "fb")
    # With it: the low-confidence row and the sampled confident row; the other confident row is not queued
    stored = observe(OPT_IN)
    reasons = {hook.store.get(i).meta["reason"]: hook.store.get(i).content_path.read_text() for i in stored}
    assert reasons == {"low-confidence": low_text, "sampled": in_sample}
    # The shadow lane's disagreements: rows the request already queued are not queued twice
    (shadow_id,) = disagree(OPT_IN, [0, 1, 2])
    meta = hook.store.get(shadow_id).meta
    assert meta["reason"] == "shadow-disagree" and hook.store.get(shadow_id).content_path.read_text() == texts[2]
    assert meta["model_tag"] == "m:v2" and meta["predicted_label"] == "positive"
    # A caller's flag queues every row, as flagged
    flagged = asyncio.run(hook.observe({"x-servable-feedback": "opt-in, flag"}, texts, probs, "m:v1", "k"))
    assert {hook.store.get(i).meta["reason"] for i in flagged} == {"flagged"} and len(flagged) == 3
    # sampling off (the default): confident rows are never queued by the request path
    off = _hook(tmp_path / "off", confidence_threshold=0.6)
    assert len(asyncio.run(off.observe(OPT_IN, texts, probs, "m:v1", "k"))) == 1
    with pytest.raises(FeedbackError, match="unknown reason"):
        hook.store.add(model="m", model_tag="m:v1", kind="text", content="x", predicted_label="negative",
                       confidence=0.5, reason="whim")  # fmt: skip


def test_the_sample_share_is_about_the_share_asked_for():
    from serving.feedback.hook import sampled

    taken = sum(sampled(f"review {i}", 0.1) for i in range(5000))
    assert 400 <= taken <= 600, taken  # 10 % of 5,000 within about 4.5 binomial standard deviations
    assert not any(sampled(f"review {i}", 0.0) for i in range(500))
    assert all(sampled(f"review {i}", 1.0) for i in range(500))


# ---------------------------------------------------------------- balanced selection and the sheet


def _skewed_queue(tmp_path) -> FeedbackStore:
    """A queue skewed like uncertainty sampling makes it: 60 'Shirt' items at the lowest confidences, 25
    'Pullover', and 3 items of the rare class 'Bag', the most confident of all."""
    store = FeedbackStore(FeedbackSettings(dir=tmp_path / "fb"))
    plan = [("Shirt", 60, 0.30), ("Pullover", 25, 0.45), ("Bag", 3, 0.58)]
    for label, n, base in plan:
        for i in range(n):
            store.add(model="fashion-cnn", model_tag="fashion-cnn:v1", kind="text", content=f"{label} {i}",
                      predicted_label=label, confidence=base + i / 1000, reason="low-confidence")  # fmt: skip
    return store


def test_labelling_selection_is_balanced_across_predicted_classes_on_a_skewed_queue(tmp_path):
    store = _skewed_queue(tmp_path)
    items = store.items("fashion-cnn")
    uncertainty_first = sorted(items, key=lambda it: it.meta["confidence"])[:12]
    assert "Bag" not in by_class(uncertainty_first)  # what the limited-data study saw: the rare class starved
    chosen = balanced(items, 12)
    assert by_class(chosen) == {"Bag": 3, "Pullover": 5, "Shirt": 4}  # round-robin, the rarest class first
    shirts = [it.meta["confidence"] for it in chosen if it.meta["predicted_label"] == "Shirt"]
    assert shirts == sorted(it.meta["confidence"] for it in items if it.meta["predicted_label"] == "Shirt")[:4]
    assert set(by_class(balanced(items, 3))) == {"Bag", "Pullover", "Shirt"}  # one each as soon as it can
    # within a class: a caller's flag and a shadow disagreement come before lower confidence; labelled items never
    flag = store.add(model="fashion-cnn", model_tag="fashion-cnn:v1", kind="text", content="flagged shirt",
                     predicted_label="Shirt", confidence=0.9, reason="flagged")  # fmt: skip
    shadow = store.add(model="fashion-cnn", model_tag="fashion-cnn:v2", kind="text", content="disputed shirt",
                       predicted_label="Shirt", confidence=0.8, reason="shadow-disagree")  # fmt: skip
    store.label(items[0].meta["id"], "Shirt")
    picked = [it.meta["id"] for it in balanced(store.items("fashion-cnn"), 9) if it.meta["predicted_label"] == "Shirt"]
    assert picked[:2] == [flag.meta["id"], shadow.meta["id"]] and items[0].meta["id"] not in picked


def test_the_sheet_a_labeller_fills_in_goes_back_through_import_labels(tmp_path):
    store = _skewed_queue(tmp_path)
    out = _cli(tmp_path / "fb", "select", "--model", "fashion-cnn", "--count", "9", "--out", str(tmp_path / "sheet"))
    assert "9 item(s) to label" in out and "Bag 3, Pullover 3, Shirt 3" in out
    sheet = tmp_path / "sheet" / "labels.csv"
    with sheet.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == SHEET_COLUMNS and all(r["label"] == "" for r in rows) and len(rows) == 9
    assert {r["reason"] for r in rows} == {"low-confidence"} and all(r["text"] for r in rows)
    for r in rows[:-1]:  # the labeller fills in the label column (one row left blank: skipped)
        r["label"] = r["predicted_label"] if r["predicted_label"] != "Shirt" else "T-shirt/top"
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert "labelled 8 item(s)" in _cli(tmp_path / "fb", "import-labels", str(sheet))
    labelled = [it for it in store.items("fashion-cnn") if it.meta["label"]]
    assert len(labelled) == 8 and {it.meta["id"] for it in labelled} == {r["id"] for r in rows[:-1]}
    assert "not empty" in _cli(tmp_path / "fb", "select", "--model", "fashion-cnn", "--count", "3", "--out",
                               str(tmp_path / "sheet"), check=False)  # fmt: skip


# ---------------------------------------------------------------- the release gate covers extra data


@pytest.mark.parametrize("kind", sorted(DOCUMENTED))
def test_a_run_with_extra_data_is_gated_like_the_default_run(kind):
    extra = {"path": "/x", "sha256": "0" * 64, "added_to": "train", "read": 40, "added": 40,
             "by_label": {"a": 40}, "dropped": {"copies_of_held_out": 0, "duplicates": 0}}  # fmt: skip
    tol = DOCUMENTED[kind]["tolerance"]
    for shift, passed in ((-tol - 0.002, False), (0.0, True)):
        run = default_run(kind, shift=shift, extra_data="/data/feedback-export")
        run.provenance["extra_data"] = extra
        gate = gates.check(run)
        assert gate["gated"] is True and gate["passed"] is passed, gate["lines"]
        assert gate["lines"][0].startswith("gate: 40 extra example(s) added to training (--extra-data)")
    with pytest.raises(ValueError, match="extra-data"):
        gates.document(run, "x:1", "test", path=ROOT / "never-written.json")


def test_the_model_card_shows_the_extra_data_per_class_and_its_checksum():
    from training.model_card import render_model_card

    run = default_run("image", extra_data="/data/fb-images")
    run.provenance["extra_data"] = {
        "path": "/data/fb-images", "sha256": "ab" * 32, "added_to": "train", "read": 41, "added": 38,
        "by_label": {"Sandal": 30, "Bag": 8}, "dropped": {"copies_of_held_out": 2, "duplicates": 1},
        "feedback": {"model": "fashion-cnn", "model_tags": ["fashion-cnn:v1"], "exported_at": "2026-12-01T10:00:00"},
    }  # fmt: skip
    card = render_model_card(run)
    assert "### Extra data added to training" in card and "ab" * 32 in card
    assert "38 labelled example(s) added to the training split only" in card
    assert "of 41 read, 2 dropped as copies of held-out examples and 1 as repeats" in card
    assert "| Sandal | 30 |" in card and "| Bag | 8 |" in card and "`fashion-cnn:v1`" in card


# ---------------------------------------------------------------- --extra-data runs at the fixtures' sizes


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_image_training_adds_the_labelled_export_held_out_sets_untouched_gate_and_card(tmp_path, monkeypatch):
    """`--extra-data EXPORT` on the image pipeline at the image fixture's sizes: the export's images are added to
    the training split only (two copies of test images dropped), the held-out sets and the bundled splits'
    counts are those of the same run without it, the artifact and its card record the counts per class and the
    checksum, and the release gate holds the run to a documented figure like any run."""
    from servable.config import FASHION_MNIST_DIR, ImageTrainConfig
    from servable.idx import read_idx
    from servable.preprocessing import ImagePreprocessing
    from training.extra_data import checksum
    from training.image_pipeline import load_splits, train_image
    from training.model_card import MODEL_CARD

    cfg = ImageTrainConfig(
        runs_dir=tmp_path / "runs", limit=400, test_limit=300, image_size=32, epochs_head=1, epochs_finetune=1,
        batch_size=32, lr_finetune=1e-3, calibration_size=64, progress=False, version="x1",
    )  # fmt: skip  # the image fixture's sizes, one epoch fewer
    x = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    y = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    bundled = load_splits(cfg, ImagePreprocessing(size=32, color_mode="L"))
    store = FeedbackStore(FeedbackSettings(dir=tmp_path / "fb"))
    fresh = [i for i in range(1000, 1400) if int(y[i]) in (0, 8)][:30]  # beyond the 300 test images
    for i in [*fresh, 0, 1]:  # and copies of test images 0 and 1: never trained on
        item = store.add(model="fashion-cnn", model_tag="fashion-cnn:t1", kind="image",
                         content=png_from_image_bytes(_png(x[i])), predicted_label="Shirt", confidence=0.4,
                         reason="low-confidence")  # fmt: skip
        store.label(item.meta["id"], bundled.labels[int(y[i])])  # T-shirt/top: folder T-shirt_top
    export = tmp_path / "export"
    store.export("fashion-cnn", export)
    documented = tmp_path / "documented.json"  # a documented run on this recipe, its figure within reach
    entry = {"run": "fashion-cnn:documented", "machine": "test", "tolerance": 0.015, "int8_max_drop": 1.0,
             "figures": {"test_accuracy": 0.1}, "recipe": gates.recipe(cfg.model_dump(mode="json")),
             "data_counts": bundled.provenance["counts"]}  # fmt: skip
    documented.write_text(json.dumps({"models": {"image": entry}}))
    monkeypatch.setattr(gates, "DOCUMENTED", documented)
    run = train_image(cfg.model_copy(update={"extra_data": export}))
    s, n = run.splits, len(bundled.train_y)
    for name in ("val_x", "val_y", "test_x", "test_y"):
        assert np.array_equal(getattr(s, name), getattr(bundled, name)), name  # held-out sets untouched
    assert np.array_equal(s.train_x[:n], bundled.train_x) and len(s.train_y) == n + 30
    assert sorted(s.train_y[n:].tolist()) == sorted(int(y[i]) for i in fresh)
    held_out = {img.tobytes() for img in (*s.val_x, *s.test_x)}
    assert not any(img.tobytes() in held_out for img in s.train_x[n:])
    m = artifact.load(run.tag).manifest
    assert m.provenance["counts"] == bundled.provenance["counts"]  # the bundled splits, as without extra data
    extra = m.provenance["extra_data"]
    assert extra["added"] == 30 and extra["read"] == 32 and extra["dropped"]["copies_of_held_out"] == 2
    want = {bundled.labels[c]: sum(int(y[i]) == c for i in fresh) for c in (0, 8)}
    assert extra["by_label"] == want and extra["added_to"] == "train" and m.training_config["extra_data"] == str(export)
    assert extra["sha256"] == checksum(export, list(export.rglob("*.png"))) and len(extra["sha256"]) == 64
    assert extra["feedback"]["model_tags"] == ["fashion-cnn:t1"]
    gate = m.metrics["gate"]
    assert gate["gated"] is True and gate["passed"] is True and gate["extra_data_added"] == 30, gate["lines"]
    card = artifact.load(run.tag).file(MODEL_CARD).read_text()
    assert "### Extra data added to training" in card and extra["sha256"] in card
    assert "30 labelled example(s) added to the training split only" in card and "2 dropped as copies" in card
    for label, count in want.items():
        assert f"| {label} | {count} |" in card
    assert "- 30 extra example(s) added to training (--extra-data)" in card and f"--extra-data {export}" in card


def test_both_training_commands_take_extra_data_beside_their_replacing_data_option(capsys):
    from training.__main__ import main

    for kind, replaces in (("image", "--data-dir"), ("text", "--data-file")):
        with pytest.raises(SystemExit):
            main([kind, "--help"])
        usage = capsys.readouterr().out
        assert "--extra-data" in usage and replaces in usage and "ADDED to the training split" in usage


@pytest.mark.slow
def test_text_training_adds_the_labelled_export_and_keeps_held_out_sentences_out(tmp_path):
    """`--extra-data` on the text pipeline at the text fixture's sizes: the exported sentences join the
    training split; a sentence that is also a test or validation sentence is dropped (no leakage); the
    validation, test and out-of-domain splits are exactly those of the same run without extra data."""
    from servable.config import TextTrainConfig
    from training.data_text import normalise
    from training.model_card import MODEL_CARD
    from training.text_pipeline import load_splits, train_text

    cfg = TextTrainConfig(
        runs_dir=tmp_path / "runs", limit=600, test_limit=150, max_length=48, epochs_head=0, epochs_finetune=1,
        lr_finetune=1e-4, batch_size=32, progress=False, version="x1", datasets_dir=ROOT / ".cache" / "datasets",
    )  # fmt: skip  # the text fixture's sizes; one epoch: what is checked here is the data, not the accuracy
    bundled = load_splits(cfg)
    store = FeedbackStore(FeedbackSettings(dir=tmp_path / "fb"))
    new = [(f"The blender number {i} {'works wonderfully' if i % 3 else 'broke within a week'}.",
            "positive" if i % 3 else "negative") for i in range(24)]  # fmt: skip
    leaks = [(bundled.test[0][0], bundled.labels[bundled.test[0][1]]),
             (bundled.val[0][0], bundled.labels[bundled.val[0][1]])]  # fmt: skip
    for text, label in [*new, *leaks]:
        item = store.add(model="sentiment-bert", model_tag="sentiment-bert:t1", kind="text", content=text,
                         predicted_label="positive", confidence=0.55, reason="low-confidence")  # fmt: skip
        store.label(item.meta["id"], label)
    export = tmp_path / "export"
    store.export("sentiment-bert", export)
    run = train_text(cfg.model_copy(update={"extra_data": export}))
    s = run.splits
    for split in ("val", "test", "ood_test"):
        assert getattr(s, split) == getattr(bundled, split), split  # held-out sets untouched
    held_out = {normalise(t) for split in ("val", "test", "ood_test") for t, _ in getattr(s, split)}
    assert not held_out & {normalise(t) for t, _ in s.train}  # nothing held out is trained on
    assert s.train[: len(bundled.train)] == bundled.train and len(s.train) == len(bundled.train) + 24
    assert {t for t, _ in s.train[len(bundled.train) :]} == {t for t, _ in new}
    extra = run.splits.provenance["extra_data"]
    assert extra["added"] == 24 and extra["dropped"]["copies_of_held_out"] == 2
    assert extra["by_label"] == {"negative": 8, "positive": 16}
    raw = (export / "feedback.csv").read_bytes()
    want = hashlib.sha256(b"feedback.csv\0" + hashlib.sha256(raw).digest()).hexdigest()
    assert extra["sha256"] == want and extra["feedback"]["counts"]["by_reason"] == {"low-confidence": 26}
    m = artifact.load(run.tag).manifest
    assert m.provenance["counts"] == bundled.provenance["counts"] and m.provenance["extra_data"] == extra
    card = artifact.load(run.tag).file(MODEL_CARD).read_text()
    assert "### Extra data added to training" in card and "| negative | 8 |" in card and "| positive | 16 |" in card
    assert want in card and "feedback queue of `sentiment-bert`" in card


def test_extra_texts_join_the_training_split_only_and_copies_of_held_out_sentences_are_dropped(tmp_path):
    from training.data_text import TextSplits
    from training.extra_data import add_texts

    splits = TextSplits(labels=["negative", "positive"], train=[("good film", 1)], val=[("Bad acting.", 0)],
                        test=[("A dull plot", 0)], ood_test=[("Broke in a day", 0)],
                        domains={"train": ["m"], "val": ["m"], "test": ["m"], "ood_test": ["amazon"]})  # fmt: skip
    held_out = {k: list(getattr(splits, k)) for k in ("val", "test", "ood_test")}
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nWorks great,positive\nbad acting!,negative\na DULL plot,negative\n"
                     "broke in a day,negative\nWorks great,positive\nNot worth it,negative\n")  # fmt: skip
    record = add_texts(splits, extra)
    assert splits.train == [("good film", 1), ("Works great", 1), ("Not worth it", 0)]
    assert splits.domains["train"] == ["m", "extra data", "extra data"]
    assert {k: getattr(splits, k) for k in held_out} == held_out
    assert record["added"] == 2 and record["read"] == 6 and record["by_label"] == {"negative": 1, "positive": 1}
    assert record["dropped"] == {"copies_of_held_out": 3, "duplicates": 1}


def test_extra_images_join_the_training_split_only_and_copies_of_held_out_images_are_dropped(tmp_path):
    from servable.preprocessing import ImagePreprocessing, to_model_pixels
    from training.data_images import ImageSplits
    from training.extra_data import add_images

    prep = ImagePreprocessing(size=16, color_mode="L")
    rng = np.random.default_rng(0)
    raw = [(rng.random((16, 16)) * 255).astype(np.uint8) for _ in range(6)]
    px = np.stack([to_model_pixels(Image.fromarray(r), prep) for r in raw])
    splits = ImageSplits(labels=["T-shirt/top", "Bag"], train_x=px[:2], train_y=np.array([0, 1]), val_x=px[2:3],
                         val_y=np.array([0]), test_x=px[3:4], test_y=np.array([1]))  # fmt: skip
    for folder, picks in (("T-shirt_top", [2, 4]), ("Bag", [3, 5, 5])):  # 2: a val copy, 3: a test copy, 5 twice
        (tmp_path / folder).mkdir()
        for n, i in enumerate(picks):
            (tmp_path / folder / f"{n}.png").write_bytes(_png(raw[i]))
    record = add_images(splits, tmp_path, prep, progress=False)
    assert len(splits.train_x) == 4 and splits.train_y.tolist() == [0, 1, 1, 0]
    assert np.array_equal(splits.train_x[2:], px[[5, 4]]) and np.array_equal(splits.val_x, px[2:3])
    assert np.array_equal(splits.test_x, px[3:4]) and len(splits.val_y) == len(splits.test_y) == 1
    assert record["by_label"] == {"T-shirt/top": 1, "Bag": 1} and record["read"] == 5
    assert record["dropped"] == {"copies_of_held_out": 2, "duplicates": 1}
    (tmp_path / "Sock").mkdir()
    (tmp_path / "Sock" / "0.png").write_bytes(_png(raw[0]))
    with pytest.raises(DataError, match="class 'Sock' is not a label of this model"):
        add_images(splits, tmp_path, prep, progress=False)


def test_extra_data_with_a_label_the_model_does_not_have_is_a_clear_error(tmp_path):
    from training.data_text import TextSplits
    from training.extra_data import add_texts

    splits = TextSplits(labels=["negative", "positive"], train=[("good", 1)], val=[("bad", 0)], test=[("meh", 0)],
                        domains={"train": ["d"], "val": ["d"], "test": ["d"]})  # fmt: skip
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine product,neutral\n")
    with pytest.raises(DataError, match=r"label 'neutral' is not a label of this model; its labels: \['negative'"):
        add_texts(splits, bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("sentence,label\nfine,positive\n")
    with pytest.raises(DataError, match="lacks column"):
        add_texts(splits, nocol)
