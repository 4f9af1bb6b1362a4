"""Text model: real fine-tune, export parity across lengths, int8, tokenizer parity, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from servable import artifact
from servable.preprocessing import encode_texts, load_tokenizer
from training import onnx_tools
from training.data_images import DataError
from training.data_text import load_user_file
from training.text_model import LogitsOnly, freeze_encoder, load_backbone
from training.text_pipeline import onnx_predict

SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "Dull.",
    "",
    "The plot is thin, the acting wooden and the two hours feel like four — avoid it at all costs!!!",
    "Ünïcödé façade, naïve café and emoji 🎬 in one review",
    "word " * 300,
]


def test_tiny_fine_tune_lowers_loss(text_run):
    history = json.loads((text_run.staging / "history.json").read_text())
    assert [h["stage"] for h in history] == ["head", "finetune", "finetune"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert text_run.metrics["test"]["fp32"]["accuracy"] > 0.6
    assert "out_of_domain" in text_run.metrics["test"]["fp32"]


def test_accuracy_and_errors_by_domain_are_what_the_models_do(text_run):
    """Every variant reports each in-domain test domain and Amazon (out-of-domain); the counts, accuracies and
    false positives/negatives are recomputed here from the ONNX files' predictions; the pooled in-domain
    accuracy stays `accuracy` and Amazon's stays `out_of_domain`."""
    prep, splits, m = text_run.preprocessing, text_run.splits, text_run.metrics
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    files = {"fp32": "model.onnx", "optimized": "model.optimized.onnx", "int8": "model.int8.onnx"}
    for variant, file in files.items():
        session = onnx_tools.cpu_session(text_run.staging / file)
        report = m["test"][variant]["by_domain"]
        assert set(report) == {"movies", "tweets", "editorials", "amazon"}, report
        for split, in_domain in (("test", True), ("ood_test", False)):
            rows = getattr(splits, split)
            y, pred = np.array([lab for _, lab in rows]), onnx_predict(session, tok, rows, prep).argmax(1)
            doms = np.array(splits.domains[split])
            for name in set(splits.domains[split]):
                t, p = y[doms == name], pred[doms == name]
                assert report[name] == {
                    "n": len(t), "accuracy": pytest.approx(float((t == p).mean()), abs=1e-12),
                    "false_positive": int(((t == 0) & (p == 1)).sum()),
                    "false_negative": int(((t == 1) & (p == 0)).sum()),
                    "in_domain": in_domain,
                }, (variant, name)  # fmt: skip
        inside = [d for d in report.values() if d["in_domain"]]
        assert sum(d["n"] for d in inside) == m["test"][variant]["n"] == len(splits.test)
        pooled = sum(d["accuracy"] * d["n"] for d in inside) / len(splits.test)
        assert m["test"][variant]["accuracy"] == pytest.approx(pooled, abs=1e-12)
        assert m["test"][variant]["out_of_domain"]["accuracy"] == report["amazon"]["accuracy"]


def test_the_encoder_starts_from_the_pretrained_checkpoint_and_frozen_embeddings_keep_it(text_run):
    """Transfer learning really starts from the bundled MiniLM: before training every encoder tensor equals
    the checkpoint's (model.safetensors); after the fixture's fine-tune the frozen embeddings still do,
    while the trained layers moved away from it."""
    from safetensors.torch import load_file

    from training.text_model import bundled_backbone

    checkpoint = {k: v for k, v in load_file(bundled_backbone() / "model.safetensors").items()
                  if not k.endswith("position_ids")}  # fmt: skip
    _, fresh, _ = load_backbone(None, ["negative", "positive"], 0.1)
    for model, trained in ((fresh, False), (text_run.model, True)):
        encoder = {k.removeprefix("bert."): v for k, v in model.state_dict().items() if k.startswith("bert.")}
        assert set(checkpoint) <= set(encoder) and len(checkpoint) > 90
        same = {k for k, v in checkpoint.items() if torch.equal(encoder[k].cpu(), v)}
        if not trained:
            assert same == set(checkpoint)
        else:  # embeddings frozen (freeze_embeddings=True), the transformer layers fine-tuned
            embeddings = {k for k in checkpoint if k.startswith("embeddings.")}
            assert embeddings and embeddings <= same
            assert any(k.startswith("encoder.layer.") for k in set(checkpoint) - same)


def test_the_pipelines_head_stage_leaves_the_encoder_as_pretrained(text_run):
    """The pipeline's own stage 1 (`fine_tune` with no stage 2): every tensor of the embeddings and the
    transformer layers is still the checkpoint's, and the head (the pooler and the classifier) trained."""
    from servable.config import TextTrainConfig
    from training.text_pipeline import fine_tune

    cfg = TextTrainConfig(max_length=48, epochs_head=1, epochs_finetune=0, batch_size=32, progress=False)
    _, model, history, _, _, _ = fine_tune(cfg, text_run.splits)
    _, pretrained, _ = load_backbone(None, text_run.splits.labels, cfg.dropout)
    assert [h.stage for h in history] == ["head"]
    tuned = model.state_dict()
    encoder = ("bert.embeddings.", "bert.encoder.")
    for k, v in pretrained.state_dict().items():
        if k.startswith(encoder):
            assert torch.equal(tuned[k], v), k
    assert any(not torch.equal(tuned[k], v) for k, v in pretrained.state_dict().items() if not k.startswith(encoder))


def test_unfreezing_keeps_the_bottom_frozen(text_run):
    """The run's default keeps the embeddings pretrained; layers above and the head were trained."""
    _, pretrained, _ = load_backbone(None, text_run.splits.labels, 0.1)
    tuned, base = text_run.model.bert, pretrained.bert
    assert artifact.load(text_run.tag).manifest.training_config["freeze_embeddings"] is True
    assert torch.equal(tuned.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    query = [m.encoder.layer[0].attention.self.query.weight for m in (tuned, base)]
    assert not torch.equal(*query)
    freeze_encoder(pretrained, False, keep_embeddings=True, keep_layers=2)
    trainable = {_module_of(n) for n, p in pretrained.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4", "layer5", "pooler", "classifier"}


def _module_of(name: str) -> str:
    """bert.encoder.layer.3.x -> layer3, bert.pooler.x -> pooler, classifier.x -> classifier."""
    parts = name.split(".")
    return f"layer{parts[3]}" if ".layer." in name else parts[1] if parts[0] == "bert" else parts[0]


def test_serving_tokenizer_matches_training_tokenizer(text_run):
    prep = text_run.preprocessing
    served = encode_texts(load_tokenizer(text_run.staging / prep.tokenizer_file, prep), SENTENCES, prep)
    trained = text_run.tokenizer(SENTENCES, truncation=True, max_length=prep.max_length, padding=True,
                                 return_tensors="np")  # fmt: skip
    assert set(served) == set(prep.input_names) == {"input_ids", "attention_mask", "token_type_ids"}
    for name in prep.input_names:
        np.testing.assert_array_equal(served[name], trained[name])
    assert served["input_ids"].shape[1] == prep.max_length  # the long one was truncated


def test_export_parity_across_sequence_lengths(text_run):
    prep = text_run.preprocessing
    sess = onnx_tools.cpu_session(text_run.staging / "model.onnx")
    wrapped = LogitsOnly(text_run.model, prep.input_names)
    one_token = {n: np.array([[101 if n == "input_ids" else (1 if n == "attention_mask" else 0)]], dtype=np.int64)
                 for n in prep.input_names}  # fmt: skip
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    for feeds in (one_token, encode_texts(tok, SENTENCES, prep), encode_texts(tok, [SENTENCES[-1]], prep)):
        assert onnx_tools.parity(wrapped, sess, feeds, tolerance=1e-3) < 1e-3


def test_optimized_and_int8_agree_with_fp32(text_run):
    """The optimised graph computes what fp32 does; int8 is smaller and its cost is measured on the test set
    (the recorded accuracies and agreement are what the files do, measured again here) and reported, never
    hidden. The documented agreement and int8 claim gate the default run (tests/test_training_gates.py)."""
    prep, rows, m = text_run.preprocessing, text_run.splits.test, text_run.metrics
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    files = {"fp32": "model.onnx", "optimized": "model.optimized.onnx", "int8": "model.int8.onnx"}
    probs = {v: onnx_predict(onnx_tools.cpu_session(text_run.staging / f), tok, rows, prep) for v, f in files.items()}
    preds = {v: p.argmax(1) for v, p in probs.items()}
    labels = np.array([label for _, label in rows])
    for v in files:
        assert m["test"][v]["accuracy"] == pytest.approx(float((preds[v] == labels).mean()), abs=1e-12), v
        assert m["test"][v]["bytes"] == (text_run.staging / files[v]).stat().st_size
    np.testing.assert_allclose(probs["optimized"], probs["fp32"], atol=1e-4)  # the same function, fused
    agreement = float((preds["int8"] == preds["fp32"]).mean())
    assert m["agreement_int8_fp32"] == pytest.approx(agreement, abs=1e-12)
    assert agreement >= 0.9, agreement  # the tiny fixture's floor (it measures 0.95): a broken graph falls far below
    drop = m["test"]["fp32"]["accuracy"] - m["test"]["int8"]["accuracy"]
    assert m["int8_accuracy_drop"] == pytest.approx(drop, abs=1e-12)
    gate = artifact.load(text_run.tag).manifest.metrics["gate"]
    assert gate["lines"][0].startswith(f"gate: int8 loses {100 * drop:.2f} points of test accuracy; no ")
    sizes = {v: m["test"][v]["bytes"] for v in files}
    assert sizes["int8"] < 0.3 * sizes["fp32"]  # the default run: 23.0 of 91.0 MB
    assert set(m["test"]["int8"]["latency_ms"]) == {"batch_1", "batch_32"}


def test_artifact_round_trip_shares_the_schema(text_run, image_run):
    art = artifact.load(text_run.tag)
    man = art.manifest
    assert man.task == "text-classification" and man.labels == ["negative", "positive"]
    assert man.text_preprocessing == text_run.preprocessing and man.image_preprocessing is None
    assert "tokenizer/tokenizer.json" in man.files and set(man.onnx) == {"fp32", "optimized", "int8"}
    assert man.provenance["counts"]["train"] == 600 and "rating_threshold" in man.provenance
    by_domain = man.provenance["counts_by_domain"]
    assert set(by_domain) == {"movies", "tweets", "editorials", "amazon"} and by_domain["amazon"] == {"ood_test": 150}
    assert sum(c.get("train", 0) for c in by_domain.values()) == 600
    assert all(by_domain[d]["train"] and by_domain[d]["test"] for d in ("movies", "tweets", "editorials"))
    assert man.provenance["counts_by_source"]["hutto_tweets"]["domain"] == "tweets"
    assert man.provenance["dedup"]["in_domain"]["kept"] < man.provenance["dedup"]["in_domain"]["input"]
    image_keys = set(artifact.load(image_run.tag).manifest.model_dump())
    assert set(man.model_dump()) == image_keys


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", "sentence,label\nnice,pos\nbad,neg\n", r"lacks column\(s\) \['text'\]"),
        ("empty.csv", "", "is empty"),
        ("blank.csv", "text,label\n,\n , \n", "no row with both"),
        ("one.csv", "text,label\ngreat,pos\nfine,pos\n", "single class"),
        ("latin1.csv", "text,label\ncaf\xe9,pos\nbad,neg\n".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", '{"text": "ok", "label": "a"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        ("data.xlsx", "text,label\n", "unsupported file type"),
    ],
)
def test_bad_data_files_are_rejected_clearly(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        load_user_file(path, seed=0, val_fraction=0.1)


def test_user_csv_and_jsonl_load(tmp_path):
    rows = [("loved it", "happy"), ("hated it", "sad"), ("so good", "happy"), ("so bad", "sad")] * 5
    rows = [(f"{t} {i}", lab) for i, (t, lab) in enumerate(rows)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows))
    splits = load_user_file(tmp_path / "d.jsonl", seed=1, val_fraction=0.2)
    assert splits.labels == ["happy", "sad"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20


def _three_way_reviews(path, per_class: int = 40) -> None:
    """Real Hutto & Gilbert movie sentences in three free-named bands of their human rating."""
    import csv
    import io
    import tarfile

    from tests.conftest import ROOT
    from training.data_text import HUTTO_ARCHIVE, VADER_SDIST

    with tarfile.open(ROOT / ".cache" / "datasets" / VADER_SDIST) as outer:
        archive = io.BytesIO(outer.extractfile(HUTTO_ARCHIVE).read())
    with tarfile.open(fileobj=archive) as inner:
        raw = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode()
    bands = {"thumbs down": [], "so-so": [], "thumbs up": []}
    for line in raw.splitlines():
        _, rating, text = line.split("\t")
        r = float(rating)
        band = "thumbs up" if r >= 1.5 else "thumbs down" if r <= -1.5 else "so-so" if abs(r) < 0.3 else None
        if band and len(bands[band]) < per_class:
            bands[band].append(text.strip())
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, lab) for lab, texts in bands.items() for t in texts)


@pytest.mark.slow
def test_user_csv_and_local_backbone_through_the_cli(tmp_path, capsys):
    """A user's 3-class CSV and a backbone directory, as the README's CLI takes them, end to end to the store."""
    from training.__main__ import main
    from training.text_model import bundled_backbone

    _three_way_reviews(tmp_path / "reviews.csv")
    backbone = str(bundled_backbone())
    flags = ["--data-file", str(tmp_path / "reviews.csv"), "--backbone", backbone, "--runs-dir", str(tmp_path),
             "--name", "reviews-3way", "--version", "u1", "--epochs-head", "1", "--epochs-finetune", "1",
             "--max-length", "32", "--batch-size", "16", "--optimize", "false", "--progress", "false"]  # fmt: skip
    assert main(["text", *flags]) == 0
    man = artifact.load("reviews-3way:u1").manifest
    assert man.labels == ["so-so", "thumbs down", "thumbs up"] and set(man.onnx) == {"fp32", "int8"}
    assert man.provenance["source"] == "user file" and man.provenance["backbone"] == backbone
    assert man.training_config["data_file"].endswith("reviews.csv")
    counts = man.provenance["counts"]
    assert counts["train"] + counts["val"] + counts["test"] == 120 and counts["ood_test"] == 0
    prep = man.text_preprocessing
    tok = load_tokenizer(tmp_path / "reviews-3way" / "u1" / "artifact" / prep.tokenizer_file, prep)
    sess = onnx_tools.cpu_session(tmp_path / "reviews-3way" / "u1" / "artifact" / "model.onnx")
    assert sess.run(["logits"], encode_texts(tok, SENTENCES[:3], prep))[0].shape == (3, 3)


@pytest.mark.parametrize(
    ("backbone", "message"),
    [("/nonexistent/bert-dir", "backbone directory /nonexistent/bert-dir does not exist"),
     ("no-such-org/no-such-model", "backbone 'no-such-org/no-such-model' could not be loaded")],
)  # fmt: skip
def test_unloadable_backbone_is_a_clear_error(tmp_path, capsys, backbone, message):
    """Neither a directory nor a cached hub name: exit 2 with one line that says what to pass, no traceback."""
    from training.__main__ import main

    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(10)))
    argv = ["text", "--data-file", str(tmp_path / "d.csv"), "--backbone", backbone, "--runs-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(("setting", "local_only"), [(None, True), ("1", True), ("0", False), ("false", False)])
def test_a_hub_backbone_is_fetched_only_when_hf_hub_offline_allows_it(monkeypatch, setting, local_only):
    """The README's own-backbone example: a hub name loads from the local cache unless HF_HUB_OFFLINE=0, whatever
    imported huggingface_hub first (it reads the variable once, at import)."""
    import transformers

    seen = {}

    def from_pretrained(source, **kw):
        seen.update(kw)
        raise OSError("not cached")

    if setting is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", setting)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=0"):
        load_backbone("bert-base-uncased", ["negative", "positive"], 0.1)
    assert seen["local_files_only"] is local_only


@pytest.mark.parametrize("mode", ["none", "domain-class"])
def test_class_weights_reach_the_training_loss(mode, monkeypatch):
    """--class-weights: every training step's loss gets the weights of its own sentences (by domain and label),
    and weighs them; `none` trains unweighted. Fails if the weights are computed but not passed on."""
    from servable.config import TextTrainConfig
    from tests.conftest import ROOT
    from training import loop
    from training.text_levers import loss_weights
    from training.text_pipeline import fine_tune, load_splits

    seen, real = [], loop.weighted_cross_entropy

    def spy(logits, y, weights):
        seen.append(None if weights is None else weights.clone())
        loss = real(logits, y, weights)
        if weights is not None:  # a weighted mean of the per-sentence losses, not the plain mean
            per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            assert loss.item() == pytest.approx(((weights * per).sum() / weights.sum()).item(), rel=1e-5)
        return loss

    monkeypatch.setattr(loop, "weighted_cross_entropy", spy)
    cfg = TextTrainConfig(limit=48, max_length=16, epochs_finetune=1, batch_size=8, class_weights=mode,
                          progress=False, datasets_dir=ROOT / ".cache" / "datasets")  # fmt: skip
    splits = load_splits(cfg)
    fine_tune(cfg, splits)
    assert len(seen) == 6
    expected = loss_weights([y for _, y in splits.train], splits.domains["train"], mode)
    if mode == "none":
        assert expected is None and all(w is None for w in seen)
    else:
        got = np.sort(torch.cat(seen).numpy())
        np.testing.assert_allclose(got, np.sort(expected), rtol=1e-6)
        assert got.min() < 0.9 and got.max() > 1.1  # the 48 sentences are not balanced: weights differ


def test_the_run_reports_decision_thresholds_and_writes_its_figures(text_run, tmp_path):
    """Every text run records the decision thresholds beside its figures (reported, not served): at the top
    class they are the run's own by-domain errors; --report-json writes them with the command and machine."""
    from servable.config import TextTrainConfig
    from training.text_levers import write_report

    report = text_run.metrics["decision_threshold"]
    by_domain = text_run.metrics["test"]["fp32"]["by_domain"]
    assert 0 < report["validation"]["threshold"] < 1
    for name, d in report["validation"]["domains"].items():
        assert d["argmax"] == {k: by_domain[name][k] for k in ("n", "accuracy", "false_positive", "false_negative")}
    assert set(report["per_domain"]) == {"movies", "tweets", "editorials"}
    path = tmp_path / "report.json"
    written = write_report(path, TextTrainConfig(), text_run.splits, text_run.metrics, [], 1.0)
    assert json.loads(path.read_text()) == written
    assert written["machine"] and written["command"].startswith("python -m training text")
    assert written["by_domain"] == by_domain and written["held_out"] == "amazon"
    assert written["class_balance"]["amazon"]["ood_test"]["n"] == len(text_run.splits.ood_test)
