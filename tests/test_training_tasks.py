"""The trainable models are one registry (training/tasks.py::TASKS): the CLI, the configuration reference,
the model card, the gate, the gallery and the summary take them from it and never name one. Only the last
test trains (the session's `<kind>_run` fixtures, shared with the other training tests)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from servable import config_docs
from servable.artifact import ModelManifest
from training import tasks
from training.model_card import render_model_card
from training.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
# The modules that loop over or look up TASKS: none may name a kind or a task in its code.
GENERIC = ("training/model_card.py", "training/gates.py", "training/review.py", "training/summary.py",
           "training/__main__.py", "servable/config_docs.py")  # fmt: skip


def test_every_training_config_is_a_task_under_its_documented_kind():
    """docs/configuration.md has a section per class deriving from TrainCommon (servable/ cannot import
    training/): the registry trains exactly those, under the same kinds."""
    assert {kind: t.config for kind, t in TASKS.items()} == config_docs.train_configs()
    reference = config_docs.render()
    for kind in TASKS:
        assert f"`python -m training {kind} --help`" in reference


def test_tasks_are_found_by_their_manifest_task_and_an_unknown_one_is_refused():
    assert len({t.task for t in TASKS.values()}) == len(TASKS)
    for kind, entry in TASKS.items():
        assert entry.kind == kind and tasks.for_task(entry.task) is entry
        assert entry.data_key in entry.config.model_fields
        assert entry.default_name == entry.config.model_construct().name
    with pytest.raises(tasks.UnknownTask, match="'tabular-regression'"):
        tasks.for_task("tabular-regression")


def test_the_pipeline_entry_points_exist():
    for entry in TASKS.values():
        for ref in (entry.train_entry, entry.review_entry, entry.calibration_entry, entry.faithfulness_entry):
            module, _, name = ref.partition(":")
            tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
            assert any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body), ref


def test_the_cli_has_one_training_subcommand_per_task_with_its_flags():
    from training.__main__ import Train

    commands = list(Train.model_fields)
    assert commands[: len(TASKS)] == list(TASKS)
    for kind, entry in TASKS.items():
        command = Train.model_fields[kind].annotation.__args__[0]
        assert issubclass(command, entry.config) and command.__doc__ == entry.help


def test_a_card_asks_the_task_for_what_differs():
    """The same records under each task: the card's model-specific lines are the entry's own."""
    for kind, entry in TASKS.items():
        m = ModelManifest(name="m", version="v1", task=entry.task, labels=["a", "b"], onnx={"fp32": "model.onnx"},
                          training_config={entry.data_key: None}, metrics={}, provenance={}, versions={})  # fmt: skip
        card = render_model_card(m)
        use, out = entry.intended_use(m)
        assert use in card and all(f"- {o}" in card for o in out)
        assert f"- backbone: {entry.backbone(m)}" in card and f"`python -m training {kind}`" in card


@pytest.mark.parametrize("path", GENERIC)
def test_generic_modules_name_no_kind_or_task(path):
    names = set(TASKS) | {t.task for t in TASKS.values()}
    tree = ast.parse((ROOT / path).read_text())
    found = [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    assert not found, f"{path} names {found}: look the entry up in training/tasks.py::TASKS instead"


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_a_registered_models_gallery_is_rebuilt_through_its_task(kind, request, tmp_path):
    """`python -m training gallery` for each kind: its pipeline rebuilds the same test split (same accuracy)."""
    from training.review import for_registered

    run = request.getfixturevalue(f"{kind}_run")
    summary = for_registered(run.tag, tmp_path, n=2)
    assert summary["accuracy"] == summary["recorded_accuracy"] and summary["mistakes_shown"] == 2
    assert {"confusion.png", "per_class.md", "gallery.json", "summary.json"} <= {p.name for p in tmp_path.iterdir()}
