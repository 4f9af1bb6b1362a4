"""The release gate: a default run below the figures the docs state fails the main job; other runs are not
gated; the documented figures live in one place that docs/training.md and the defaults are checked against."""

from __future__ import annotations

import json
import re

import pytest

from servable import artifact
from servable.artifact import ModelManifest
from servable.config import ImageTrainConfig
from tests.conftest import ROOT
from training import gates
from training.tasks import TASKS

DOCUMENTED = gates.load_documented()


def default_run(kind: str, shift: float = 0.0, int8_drop: float = 0.0, **config) -> ModelManifest:
    """The records of a run on the documented recipe and data (on a GPU, under another name: not recipe),
    its figures `shift` away from the documented ones and int8 `int8_drop` below fp32."""
    entry = DOCUMENTED[kind]
    figures = {k: v + shift for k, v in entry["figures"].items()}
    fp32 = {"accuracy": figures["test_accuracy"]}
    if "out_of_domain_accuracy" in figures:
        fp32["out_of_domain"] = {"accuracy": figures["out_of_domain_accuracy"]}
    metrics = {"test": {"fp32": fp32, "int8": {"accuracy": fp32["accuracy"] - int8_drop}}}
    if "int8_agreement" in figures:
        metrics["agreement_int8_fp32"] = figures["int8_agreement"]
    training_config = entry["recipe"] | {"name": "my-model", "device": "cuda", "num_threads": 8, "runs_dir": "/x"}
    return ModelManifest(name="my-model", version="v1", task=TASKS[kind].task, labels=["a", "b"], onnx={},
                         training_config=training_config | config, metrics=metrics,
                         provenance={"counts": entry["data_counts"]}, versions={})  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DOCUMENTED))
def test_gate_fails_a_default_run_below_its_documented_figures(kind):
    entry, tol = DOCUMENTED[kind], DOCUMENTED[kind]["tolerance"]
    gate = gates.check(default_run(kind, shift=-tol - 0.002))
    assert gate["gated"] is True and gate["passed"] is False
    failed = {c["figure"] for c in gate["checks"] if not c["passed"]}
    assert failed == set(entry["figures"])  # every figure below its floor; int8 within its claim
    message = gates.failure_message(gate)
    value = entry["figures"]["test_accuracy"]
    assert f"fp32 test accuracy {value - tol - 0.002:.4f} (documented {value:.4f} - {100 * tol:.1f} points" in message
    assert entry["run"] in message and "docs/training.md" in message
    # int8 alone over the documented claim fails too, whatever fp32 does
    gate = gates.check(default_run(kind, int8_drop=entry["int8_max_drop"] + 0.002))
    assert gate["passed"] is False
    assert [c["figure"] for c in gate["checks"] if not c["passed"]] == ["int8_accuracy_drop"]
    claim = f"documented claim: at most {100 * entry['int8_max_drop']:.1f} point(s)): FAIL"
    assert claim in gates.failure_message(gate)


@pytest.mark.parametrize("kind", sorted(DOCUMENTED))
def test_gate_passes_a_default_run_within_the_tolerance(kind):
    entry = DOCUMENTED[kind]
    gate = gates.check(default_run(kind, shift=-entry["tolerance"] + 0.001, int8_drop=entry["int8_max_drop"] - 0.001))
    assert gate["gated"] is True and gate["passed"] is True, gate["lines"]
    assert len(gate["lines"]) == len(entry["figures"]) + 1 and all(line.endswith(": pass") for line in gate["lines"])


@pytest.mark.parametrize(
    ("kind", "change", "why"),
    [
        ("image", {"limit": 400}, "in: limit"),
        ("image", {"data_dir": "/data/my-photos"}, "in: data_dir"),
        ("text", {"data_file": "my.csv", "epochs_finetune": 1}, "in: data_file, epochs_finetune"),
        ("text", {"new_flag": True}, "in: new_flag"),
    ],
)
def test_a_users_data_or_flags_are_not_gated(kind, change, why):
    gate = gates.check(default_run(kind, shift=-0.5, int8_drop=0.2, **change))
    assert gate["gated"] is False and "passed" not in gate
    assert gates.NOT_GATED in gate["reason"] and why in gate["reason"]
    assert gate["lines"] == [f"gate: int8 loses 20.00 points of test accuracy; {gate['reason']}"]


def test_other_data_under_the_default_flags_is_not_gated():
    run = default_run("text", shift=-0.5)
    run.provenance["counts"] = {"train": 5, "val": 1, "test": 1, "ood_test": 0}
    gate = gates.check(run)
    assert gate["gated"] is False and "data counts" in gate["reason"]
    assert gates.check(default_run("text"), documented={})["gated"] is False  # no documented figures at all


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_documented_run_is_the_current_default(kind):
    """When the defaults change, the documented figures are stale: re-run the default training, then
    `python -m training document --model-tag <tag>` and paste the table it prints into docs/training.md."""
    defaults = gates.recipe(TASKS[kind].config.model_construct().model_dump(mode="json"))
    documented = DOCUMENTED[kind]["recipe"]
    differ = sorted(k for k in defaults.keys() | documented.keys() if defaults.get(k, "-") != documented.get(k, "-"))
    assert not differ, f"the {kind} defaults differ from the documented run {DOCUMENTED[kind]['run']} in {differ}"


def test_docs_training_md_states_the_documented_figures():
    """docs/training.md's gate table is the one place's, and each gated figure is one its results report."""
    text = (ROOT / "docs" / "training.md").read_text()
    table = gates.markdown_table(DOCUMENTED)
    assert table in text, "docs/training.md's gate table is stale: paste gates.markdown_table's output"
    results = text.replace(table, "")
    for kind, entry in DOCUMENTED.items():
        assert entry["run"] in results, kind
        for name, value in entry["figures"].items():
            shown = f"{100 * value:.1f} %" if name == "int8_agreement" else f"{value:.4f}"
            assert shown in results, f"{kind} {name} {shown} is gated but not among docs/training.md's results"
        assert 0 < entry["tolerance"] <= 0.03 and entry["int8_max_drop"] == 0.01
    tolerance = {f"{100 * e['tolerance']:.1f} points" for e in DOCUMENTED.values()}
    assert all(t in text for t in tolerance) and "at most one point" in text


def test_a_default_run_that_misses_its_figures_fails_the_main_job(tmp_path, monkeypatch, capsys):
    """Through the CLI `make all` runs: a run on the documented recipe scoring below the documented figure
    exits non-zero with a message naming the figure, and is not registered (its card stays in the run folder)."""
    from training.__main__ import main

    flags = dict(runs_dir=tmp_path, version="gate1", limit=120, test_limit=60, image_size=32, epochs_head=0,
                 epochs_finetune=1, batch_size=32, calibration_size=16, progress=False)  # fmt: skip
    cfg = ImageTrainConfig(**flags)
    documented = tmp_path / "documented.json"
    entry = {"run": "fashion-cnn:documented", "machine": "test", "tolerance": 0.015, "int8_max_drop": 0.01,
             "figures": {"test_accuracy": 0.999}, "recipe": gates.recipe(cfg.model_dump(mode="json")),
             "data_counts": None}  # fmt: skip
    documented.write_text(json.dumps({"models": {"image": entry}}))
    monkeypatch.setattr(gates, "DOCUMENTED", documented)
    argv = [
        "image",
        *(f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "missed the figures docs/training.md documents for fashion-cnn:documented" in err
    assert re.search(r"fp32 test accuracy 0\.\d{4} \(documented 0\.9990 - 1\.5 points = 0\.9840\): FAIL", err), err
    assert "not registered" in err and "Traceback" not in err
    with pytest.raises(artifact.ArtifactError, match="not in the BentoML model store"):
        artifact.load("fashion-cnn:gate1")
    card = (tmp_path / "fashion-cnn" / "gate1" / "artifact" / "MODEL_CARD.md").read_text()
    assert "(documented 0.9990 - 1.5 points = 0.9840): FAIL" in card


def test_the_test_fixtures_are_not_the_default_run_and_are_reported_not_gated(image_run, text_run):
    for run in (image_run, text_run):
        gate = artifact.load(run.tag).manifest.metrics["gate"]
        assert gate["gated"] is False and "limit" in gate["reason"]
        drop = run.metrics["test"]["fp32"]["accuracy"] - run.metrics["test"]["int8"]["accuracy"]
        assert gate["lines"][0].startswith(f"gate: int8 loses {100 * drop:.2f} points of test accuracy; ")
