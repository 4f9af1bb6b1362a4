"""Limited-data study: the from-scratch baselines learn, the selection and pseudo-label parts do what
they say, and the whole study runs end to end at tiny sizes (real data, real training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from servable.config import LimitedDataConfig
from servable.preprocessing import ImagePreprocessing
from training.active_learning import least_confident, select_labels
from training.data_images import load_fashion_mnist
from training.image_pipeline import fine_tune, predict_proba
from training.limited_data import MODELS, SCRATCH, progress_path, run_experiment


@pytest.mark.parametrize("arm", SCRATCH)
def test_from_scratch_baseline_learns(arm, tmp_path):
    """A few hundred images, seconds: training loss falls, and the network scores far above chance in eval
    mode (where a BatchNorm whose running statistics never left their initial values scores chance)."""
    cfg = LimitedDataConfig(**MODELS[arm], epochs_finetune=4, lr_finetune=3e-3, patience=4, progress=False,
                            runs_dir=tmp_path)  # fmt: skip
    prep = ImagePreprocessing(size=cfg.image_size, color_mode="L")
    splits = load_fashion_mnist(cfg.fashion_mnist_dir, prep, seed=0, val_fraction=0.1, limit=400, test_limit=300,
                                progress=False)  # fmt: skip
    model, history, _, _ = fine_tune(cfg, splits, prep)
    assert history[-1].train_loss < 0.8 * history[0].train_loss
    assert history[-1].train_acc > 0.3, "10 classes: chance is 0.1"
    accuracy = (predict_proba(model, splits.test_x, prep).argmax(1) == splits.test_y).mean()
    assert accuracy > 0.3, f"{arm} does not learn: test accuracy {accuracy:.3f}"


def test_least_confident_picks_lowest_top1():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.55, 0.45]])
    assert least_confident(probs, 2).tolist() == [1, 3]


def test_active_selection_spends_the_budget_on_uncertain_candidates():
    candidates = np.arange(100, 200)
    uncertain = set(range(150, 200))  # the "model" is unsure about the upper half

    def predict(labelled, unlabelled):
        assert not set(labelled) & set(unlabelled)
        top = np.where(np.isin(unlabelled, list(uncertain)), 0.4, 0.99)
        return np.stack([top, 1 - top], 1)

    chosen = select_labels(candidates, budget=40, initial=10, rounds=3, rng=np.random.default_rng(0), predict=predict)
    assert len(chosen) == 40 == len(set(chosen)) and set(chosen) <= set(candidates)
    assert set(chosen[10:]) <= uncertain  # all 30 asked-for labels are uncertain ones


def test_quick_study_end_to_end(tmp_path):
    """Every arm at tiny sizes, one seed, one epoch: the JSON, table and plot come out complete."""
    cfg = LimitedDataConfig(
        sizes=[60, 120], seeds=[0], test_limit=100, tune_size=60, tune_lrs=[1e-3, 3e-3], scratch_max_epochs=1,
        tune_lrs_pretrained=[1e-3], pretrained_max_epochs=1,
        small_cnn_max_epochs=2, epochs_finetune=1, unlabelled_pool=100, pseudo_epochs=1, pseudo_threshold=0.2,
        progress=False, output=tmp_path / "out", runs_dir=tmp_path / "runs",
    )  # fmt: skip
    run_experiment(cfg)
    results = json.loads((cfg.output / "limited_data.json").read_text())
    assert set(results["tuned"]) == set(MODELS)
    for arm, tuned in results["tuned"].items():
        assert tuned["lr"] in cfg.tune_lrs + cfg.tune_lrs_pretrained and 1 <= tuned["epochs"] <= 2, arm
    arms = {*MODELS, "no-augmentation", "pseudo-label", "active"}
    assert set(results["runs"]) == arms == set(results["summary"])
    for arm in arms:
        for size in ("60", "120"):
            (run,) = results["runs"][arm][size]
            assert 0 <= run["accuracy"] <= 1 and run["epochs_run"] >= 1 and len(run["train_loss"]) == 2
    pseudo = results["runs"]["pseudo-label"]["120"][0]
    assert pseudo["pseudo_labels"] > 0  # a 0.2 cut keeps some of the 100 unlabelled images
    text = (cfg.output / "limited_data.md").read_text()
    for arm in ("from-scratch runs", "pseudo-labels", "active learning", "without augmentation", "cross"):
        assert arm in text
    assert (cfg.output / "limited_data.png").stat().st_size > 10_000


def test_a_stopped_study_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """Stopped at its second size, the study keeps tuning and the first size's runs; started again with
    the same settings it trains only what is missing, and the report holds both parts."""
    import training.limited_data as ld

    cfg = LimitedDataConfig(
        sizes=[60, 120], seeds=[0], test_limit=100, tune_size=60, tune_lrs=[1e-3], scratch_max_epochs=1,
        tune_lrs_pretrained=[1e-3], pretrained_max_epochs=1, small_cnn_max_epochs=1, epochs_finetune=1,
        unlabelled_pool=100, pseudo_epochs=1, pseudo_threshold=0.2, progress=False,
        output=tmp_path / "out", runs_dir=tmp_path / "runs",
    )  # fmt: skip
    real_methods = ld.run_methods

    def stop_at_120(cfg_, pool, d, size, *rest):
        if size == 120:
            raise KeyboardInterrupt  # as Ctrl-C (or the end of a session) would
        return real_methods(cfg_, pool, d, size, *rest)

    monkeypatch.setattr(ld, "run_methods", stop_at_120)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    saved = json.loads(progress_path(cfg).read_text())
    assert all(len(by["60"]) == 1 and not by["120"] for by in saved["runs"].values())

    monkeypatch.setattr(ld, "run_methods", real_methods)
    monkeypatch.setattr(ld, "tune", lambda *a: pytest.fail("tuning ran again"))
    results = run_experiment(cfg.model_copy(update={"num_threads": 1}))  # a setting that changes no result
    assert results["resumed"] and not progress_path(cfg).exists()
    for arm, by_size in results["runs"].items():
        assert by_size[60] == saved["runs"][arm]["60"], arm  # kept, not trained again
        assert len(by_size[120]) == 1, arm
