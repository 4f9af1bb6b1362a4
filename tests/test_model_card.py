"""The model card: generated at registration, stored and checksummed in the artifact, with the model's real
figures and the error patterns its evaluation found; the CLI renders the same card for a registered model."""

from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import confusion_matrix

from servable import artifact
from servable.artifact import ModelManifest
from servable.preprocessing import load_tokenizer
from training import onnx_tools
from training.image_pipeline import onnx_predict as image_predict
from training.model_card import MODEL_CARD, for_registered, render_model_card
from training.text_pipeline import onnx_predict as text_predict

SECTIONS = ("## Intended use", "**Out of scope:**", "## Training data and provenance", "## Metrics per split (fp32)",
            "## fp32, int8", "**Release gate**", "## Known limitations and error patterns", "## How it was trained",
            "## Versions")  # fmt: skip


def stored_card(tag: str) -> str:
    art = artifact.load(tag)  # verifies every file against the manifest, the card included
    entry = art.manifest.files[MODEL_CARD]
    assert entry.sha256 == artifact.sha256_file(art.file(MODEL_CARD)) and entry.bytes > 2000
    return art.file(MODEL_CARD).read_text()


def common_checks(card: str, run) -> None:
    for section in SECTIONS:
        assert section in card, section
    assert not re.search(r"\bNone\b|\bnan\b|\{[a-z_]+\}|TODO", card), "a placeholder or missing value in the card"
    m = artifact.load(run.tag).manifest
    test = m.metrics["test"]
    assert f"accuracy **{test['fp32']['accuracy']:.4f}**" in card
    int8 = test["int8"]
    assert f"| int8 | `model.int8.onnx` | {int8['bytes'] / 1e6:.1f} MB | {int8['accuracy']:.4f} |" in card
    for name, c in test["fp32"]["per_class"].items():
        assert f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |" in card
    for split, n in m.provenance["counts"].items():
        if n:
            assert f"| {n:,} |" in card, split
    assert f"`{m.name}:{m.version}`" in card and m.versions["onnxruntime"] in card
    assert f"| lr_finetune | {m.training_config['lr_finetune']} |" in card
    assert "not gated" in card  # the fixtures are not the default run


def test_image_card_is_stored_with_its_checksum_and_names_the_real_confusions(image_run):
    card = stored_card(image_run.tag)
    common_checks(card, image_run)
    # The error pattern is what the stored fp32 model does on the test split, measured again here.
    splits, prep = image_run.splits, image_run.preprocessing
    pred = image_predict(onnx_tools.cpu_session(image_run.staging / "model.onnx"), splits.test_x, prep).argmax(1)
    cm = confusion_matrix(splits.test_y, pred, labels=range(len(splits.labels)))
    np.fill_diagonal(cm, 0)
    i, j = np.unravel_index(cm.argmax(), cm.shape)
    top = f"{splits.labels[i]} called {splits.labels[j]} {cm[i, j]} times"
    assert f"most frequent mistakes: {top}" in card
    assert "ImageNet weights" in card and "Fashion-MNIST" in card and "`docs/assets.md`" in card


def test_text_card_gives_the_false_positive_and_negative_balance(text_run):
    card = stored_card(text_run.tag)
    common_checks(card, text_run)
    prep, rows = text_run.preprocessing, text_run.splits.test
    tok = load_tokenizer(text_run.staging / prep.tokenizer_file, prep)
    pred = text_predict(onnx_tools.cpu_session(text_run.staging / "model.onnx"), tok, rows, prep).argmax(1)
    y = np.array([label for _, label in rows])
    fp, fn = int(((y == 0) & (pred == 1)).sum()), int(((y == 1) & (pred == 0)).sum())
    negatives, positives = int((y == 0).sum()), int((y == 1).sum())
    said = (f"test split: {fp} of {negatives:,} negative examples called positive (false positives, "
            f"{100 * fp / negatives:.1f} %) and {fn} of {positives:,} positive examples called negative")  # fmt: skip
    assert said in card
    assert "out-of-domain:" in card and "outside its training domain accuracy moves by" in card
    domains = artifact.load(text_run.tag).manifest.metrics["test"]["fp32"].get("by_domain")
    if domains:  # recorded by runs on the multi-domain data
        worst = min(domains, key=lambda d: domains[d]["accuracy"])
        assert f"weakest domain: {worst}," in card
    assert re.search(r'called \w+ at 0\.\d\d: ".+"', card), "the most confident mistakes are quoted"


def test_card_cli_renders_the_stored_card_of_a_registered_model(image_run, tmp_path, capsys):
    from training.__main__ import main

    out = tmp_path / "cards" / "fashion.md"
    assert main(["card", "--model-tag", image_run.tag, "--out", str(out)]) == 0
    assert out.read_text() == stored_card(image_run.tag) == for_registered(image_run.tag)


def test_a_hand_registered_artifact_with_few_records_gets_a_card_that_says_what_is_missing():
    """A card renders for any manifest, e.g. one built by hand with only an accuracy recorded."""
    sparse = ModelManifest(name="hand-made", version="v1", task="text-classification",
                           labels=["negative", "positive"], onnx={"fp32": "model.onnx"}, training_config={},
                           metrics={"test": {"fp32": {"accuracy": 0.9}}}, provenance={}, versions={})  # fmt: skip
    card = render_model_card(sparse)
    assert all(section in card for section in SECTIONS) and not re.search(r"\bNone\b", card)
    assert "accuracy **0.9000**, macro F1 not recorded" in card and "confusions are not recorded" in card
    assert "not recorded: this artifact was registered before the gate existed" in card
