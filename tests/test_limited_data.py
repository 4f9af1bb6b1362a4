"""Limited-data study: the from-scratch baseline learns, each arm is wired as it says (the probe leaves the
backbone alone, the slower backbone is slower, FixMatch learns from the unlabelled pool, rotation pre-training
hands its backbone on), the selection and pseudo-label parts do what they say, and the whole study runs end
to end at tiny sizes (real data, real training), report and resume included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from servable.config import LimitedDataConfig
from servable.preprocessing import ImagePreprocessing
from training.active_learning import least_confident, select_labels
from training.data_images import ImageSplits, load_fashion_mnist
from training.fixmatch import augment, fixmatch, unit
from training.image_pipeline import build_model, fine_tune, predict_proba
from training.limited_data import ARMS, MODELS, SCRATCH, TUNED, progress_path, run_experiment
from training.linear_probe import features, probe_proba, train_probe
from training.self_supervised import ROTATIONS, pretrain_rotation, rotated_set, with_backbone

PRETRAINED_32 = dict(MODELS["pretrained"], image_size=32)


def tiny(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random grey-level images (three equal channels) and labels: enough to check wiring in seconds."""
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), 3, axis=3)
    return x, rng.integers(0, 10, n).astype(np.int64)


def tiny_splits(n: int, size: int) -> ImageSplits:
    x, y = tiny(n, size)
    vx, vy = tiny(32, size, seed=1)
    return ImageSplits([str(i) for i in range(10)], x, y, vx, vy, vx, vy)


def params(model, part: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(model, part).named_parameters()}


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


def test_linear_probe_trains_the_head_and_leaves_the_backbone_unchanged():
    """The probe's backbone is the ImageNet one, weights and BatchNorm statistics, to the bit; its head moved;
    and the cached-feature path gives what the whole model gives on the same pixels."""
    cfg = LimitedDataConfig(**{**PRETRAINED_32, "epochs_head": 3}, lr_head=1e-2, patience=3, progress=False)
    prep = ImagePreprocessing(size=32, color_mode="L")
    x, y = tiny(48, 32)
    model = build_model(cfg, 10)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = params(model, "head")
    f = features(model, x, prep)
    history = train_probe(cfg, model, f[:32], y[:32], f[32:], y[32:])
    assert len(history) >= 1 and all(h.stage == "head" for h in history)
    after = model.backbone.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in after), "the probe changed the backbone"
    assert any(not torch.equal(head_before[k], v) for k, v in params(model, "head").items()), "the head did not train"
    np.testing.assert_allclose(probe_proba(model, f), predict_proba(model, x, prep), atol=1e-5)


def mean_move(model, start: dict, part: str) -> float:
    return float(np.mean([(v - start[f"{part}.{k}"]).abs().mean().item() for k, v in params(model, part).items()]))


def test_slower_backbone_rate_moves_the_backbone_less():
    """Same start, same batches: with backbone_lr_factor 0.1 the backbone's weights move about a tenth as far
    (AdamW's step scales with the rate) while the head moves as far as with one rate."""
    cfg = LimitedDataConfig(**PRETRAINED_32, epochs_finetune=1, lr_finetune=1e-3, batch_size=32, progress=False)
    prep = ImagePreprocessing(size=32, color_mode="L")
    splits = tiny_splits(32, 32)
    start = build_model(cfg, 10).state_dict()
    moved = {}
    for factor in (1.0, 0.1):
        model, *_ = fine_tune(cfg, splits, prep, init_state=start, backbone_lr_factor=factor)
        moved[factor] = {part: mean_move(model, start, part) for part in ("backbone", "head")}
    assert moved[0.1]["backbone"] < 0.3 * moved[1.0]["backbone"], moved
    assert moved[0.1]["head"] > 0.5 * moved[1.0]["head"], moved


def bn_statistics(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}


def test_frozen_batchnorm_fine_tune_keeps_the_imagenet_statistics():
    """With frozen_bn the backbone's BatchNorm running statistics leave fine-tuning bit-identical while its
    weights move; without it they follow the few-label batches."""
    cfg = LimitedDataConfig(**{**PRETRAINED_32, "epochs_head": 0}, epochs_finetune=1, lr_finetune=1e-3, batch_size=16,
                            progress=False)  # fmt: skip
    prep = ImagePreprocessing(size=32, color_mode="L")
    splits = tiny_splits(32, 32)
    start = build_model(cfg, 10).state_dict()
    before = {k.removeprefix("backbone."): v for k, v in start.items() if k.startswith("backbone.") and "running_" in k}
    for frozen, same in ((True, True), (False, False)):
        model, *_ = fine_tune(cfg, splits, prep, init_state=start, frozen_bn=frozen)
        after = bn_statistics(model)
        assert before.keys() == after.keys() and before
        assert all(torch.equal(before[k], after[k]) for k in after) is same, f"frozen_bn={frozen}"
        assert mean_move(model, start, "backbone") > 0, "the backbone's weights did not train"


def test_fixmatch_learns_from_the_unlabelled_pool():
    """The unlabelled images are drawn and, above the threshold, teach: at threshold 0 every weak view is
    confident and the unlabelled loss is positive; above 1 none is, the unlabelled loss is 0 and the weights
    come out different (the unlabelled term is what moved them)."""
    cfg = LimitedDataConfig(**MODELS["small-cnn"], lr_finetune=3e-3, batch_size=16, patience=5, progress=False)
    prep = ImagePreprocessing(size=28, color_mode="L")
    splits = tiny_splits(32, 28)
    unlabelled_x, unlabelled_y = tiny(96, 28, seed=2)
    init = build_model(cfg, 10).state_dict()
    runs = {
        t: fixmatch(
            cfg,
            splits,
            prep,
            init,
            unlabelled_x,
            threshold=t,
            steps=4,
            mu=2,
            weight=1.0,
            eval_every=2,
            unlabelled_y=unlabelled_y,
        )
        for t in (0.0, 1.01)
    }
    (_, history, used), (_, _, unused) = runs[0.0], runs[1.01]
    assert used["unlabelled_images_drawn"] == 96 and used["confident_share"] == 1.0
    assert used["unlabelled_loss_mean"] > 0 and 0 <= used["pseudo_label_accuracy"] <= 1
    assert unused["confident_share"] == 0 and unused["unlabelled_loss_mean"] == 0
    assert len(history) == 2 and all(h.stage == "fixmatch" for h in history)
    a, b = runs[0.0][0].state_dict(), runs[1.01][0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_strong_augmentation_differs_from_weak_and_stays_an_image():
    x = unit(tiny(8, 28)[0])
    gen = torch.Generator().manual_seed(0)
    weak, strong = augment(x, gen, False), augment(x, gen, True)
    assert weak.shape == strong.shape == x.shape and strong.min() >= 0 and strong.max() <= 1
    assert (strong - weak).abs().mean() > 0.05


def test_rotation_pretraining_hands_its_backbone_to_the_classifier():
    """Each image appears at the four rotations with the right label; the pre-trained backbone comes back
    (backbone weights only, changed by training) and the classifier starts from it under a fresh head."""
    x, _ = tiny(20, 28)
    rx, ry = rotated_set(x, seed=0)
    assert len(rx) == 4 * len(x) and np.bincount(ry).tolist() == [len(x)] * len(ROTATIONS)
    i = int(np.flatnonzero(ry == 1)[0])
    assert any(np.array_equal(rx[i], np.rot90(img, 1, axes=(0, 1))) for img in x)
    cfg = LimitedDataConfig(**MODELS["small-cnn"], epochs_finetune=1, lr_finetune=3e-3, batch_size=16,
                            progress=False)  # fmt: skip
    prep = ImagePreprocessing(size=28, color_mode="L")
    fresh = build_model(cfg, len(ROTATIONS)).state_dict()
    backbone, history = pretrain_rotation(cfg, x, prep, val_images=4)
    assert backbone and all(k.startswith("backbone.") for k in backbone) and len(history) == 1
    assert any(not torch.equal(v, fresh[k]) for k, v in backbone.items() if v.is_floating_point())
    state = with_backbone(cfg, backbone, 10)
    assert all(torch.equal(state[k], v) for k, v in backbone.items()) and state["head.1.weight"].shape[0] == 10


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


def quick_config(tmp_path) -> LimitedDataConfig:
    """Every arm at tiny sizes, one seed, one or two epochs (EfficientNet at 32 px: the wiring, not the figures)."""
    return LimitedDataConfig(
        sizes=[60, 120], seeds=[0], test_limit=100, image_size=32, tune_size=60, tune_lrs=[1e-3, 3e-3],
        tune_lrs_probe=[3e-3], tune_lrs_pretrained=[1e-3], tune_lrs_slow_backbone=[3e-3], probe_max_epochs=2,
        pretrained_max_epochs=1, small_cnn_max_epochs=2, unlabelled_pool=100, pseudo_epochs=1, pseudo_threshold=0.2,
        fixmatch_steps=2, fixmatch_eval_every=1, ssl_epochs=1, progress=False, output=tmp_path / "out",
        runs_dir=tmp_path / "runs", jobs=1,
    )  # fmt: skip


def test_quick_study_end_to_end(tmp_path):
    """The JSON, table and plot come out complete, each tuned arm with its own settings."""
    cfg = quick_config(tmp_path)
    run_experiment(cfg)
    results = json.loads((cfg.output / "limited_data.json").read_text())
    assert set(results["tuned"]) == set(TUNED) and not results["missing"]
    for arm, tuned in results["tuned"].items():
        grid = {"probe": cfg.tune_lrs_probe, "pretrained": cfg.tune_lrs_pretrained,
                "slow-backbone": cfg.tune_lrs_slow_backbone}.get(arm, cfg.tune_lrs)  # fmt: skip
        assert tuned["lr"] in grid and 1 <= tuned["epochs"] <= 2, arm
    assert set(results["runs"]) == set(ARMS) == set(results["summary"])
    for arm in ARMS:
        for size in ("60", "120"):
            (run,) = results["runs"][arm][size]
            assert 0 <= run["accuracy"] <= 1 and run["epochs_run"] >= 1 and len(run["train_loss"]) == 2, arm
            assert run["cpu_seconds"] >= 0
    assert results["runs"]["pseudo-label"]["120"][0]["pseudo_labels"] > 0  # a 0.2 cut keeps some of 100 images
    assert results["runs"]["fixmatch"]["120"][0]["unlabelled_images_drawn"] > 0
    assert results["runs"]["rotation-ssl"]["120"][0]["pretext"]["epochs"] == 1
    text = (cfg.output / "limited_data.md").read_text()
    for words in ("All cells ran", "Headline", "linear probe", "backbone at lr/10", "FixMatch", "rotation pre-training",
                  "from-scratch runs", "pseudo-labels", "active learning", "without", "not measured"):  # fmt: skip
        assert words in text, words
    assert (cfg.output / "limited_data.png").stat().st_size > 10_000


def test_a_stopped_study_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """Stopped in its second size, the study keeps its tuning and every finished cell, and the report written so
    far names the missing cells; started again with the same settings it trains only what is missing."""
    import training.limited_data as ld

    cfg = quick_config(tmp_path).model_copy(update={"tune_lrs": [3e-3]})
    real_cell = ld.run_cell

    def stop_at(study, arm, size, seed):
        if size == 120 and arm == "fixmatch":
            raise KeyboardInterrupt  # as Ctrl-C (or the end of a sitting) would
        return real_cell(study, arm, size, seed)

    monkeypatch.setattr(ld, "run_cell", stop_at)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    saved = json.loads(progress_path(cfg).read_text())
    done_120 = ARMS[: ARMS.index("fixmatch")]
    assert all(len(by["60"]) == 1 for by in saved["runs"].values())
    assert all(bool(saved["runs"][arm]["120"]) == (arm in done_120) for arm in ARMS)
    partial = json.loads((cfg.output / "limited_data.json").read_text())
    assert partial["missing"] == [f"{arm} 120 seed 0" for arm in ARMS if arm not in done_120]
    assert "Partial" in (cfg.output / "limited_data.md").read_text()

    monkeypatch.setattr(ld, "run_cell", real_cell)
    monkeypatch.setattr(ld, "tuning_run", lambda *a: pytest.fail("tuning ran again"))
    results = run_experiment(cfg.model_copy(update={"num_threads": 1}))  # a setting that changes no result
    assert results["resumed"] and not results["missing"] and not progress_path(cfg).exists()
    for arm, by_size in results["runs"].items():
        assert by_size[60] == saved["runs"][arm]["60"], arm  # kept, not trained again
        assert len(by_size[120]) == 1, arm


def test_cells_run_in_parallel_processes_after_the_cells_they_read(tmp_path):
    """`python -m training limited-data` with two jobs, as a user runs it: the cells run in worker processes
    (two at most), pseudo-labels and FixMatch start only after the small CNN they start from has finished, and
    every cell is recorded with its CPU time counted in the study's."""
    cfg = quick_config(tmp_path).model_copy(update={"jobs": 2, "num_threads": 1, "tune_lrs": [3e-3]})
    default = LimitedDataConfig().model_dump(mode="json")
    env = {**os.environ, **{f"SERVABLE_LIMITED_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                            for k, v in cfg.model_dump(mode="json").items() if v != default[k]}}  # fmt: skip
    with subprocess.Popen([sys.executable, "-m", "training", "limited-data"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads((cfg.output / "limited_data.json").read_text())
    assert not results["missing"] and all(len(by[size]) == 1 for by in results["runs"].values() for size in by)
    log = stdout.splitlines()
    started = {line[3:].split(" labelled")[0]: i for i, line in enumerate(log) if line.startswith("== ")}
    ended = {line[5:].split(" labelled")[0]: i for i, line in enumerate(log) if line.startswith("done ")}
    assert len(ended) == len(ARMS) * 2
    # worker processes, not the command's own; not always both: one can take every quick cell while the other starts
    workers = {line.rsplit("process ", 1)[1].rstrip(")") for line in log if line.startswith("done ")}
    assert 1 <= len(workers) <= 2 and str(proc.pid) not in workers
    for size in (60, 120):
        for arm in ("pseudo-label", "fixmatch"):
            assert started[f"{arm}, {size}"] > ended[f"small-cnn, {size}"], (arm, size)
    records = [r for by in results["runs"].values() for rs in by.values() for r in rs]
    assert all(r["threads"] == 1 for r in records)  # two jobs share two threads
    assert results["cpu_minutes"] >= round(sum(r["cpu_seconds"] for r in records) / 60, 1) - 0.1


def test_a_cell_waits_for_the_small_cnn_and_the_rotation_backbone_it_reads(tmp_path):
    """Pseudo-labels and FixMatch wait for their size and seed's small CNN; while a seed's first rotation cell
    pre-trains the backbone, its other rotation cells wait; once the backbone is cached they need not."""
    from training.limited_data import Study, empty_runs, ready

    cfg = quick_config(tmp_path)
    study, runs = Study(cfg, {}), empty_runs(cfg)
    for arm in ("pseudo-label", "fixmatch"):
        assert not ready((arm, 60, 0), runs, [], study)
    assert ready(("small-cnn", 60, 0), runs, [], study) and ready(("no-augmentation", 60, 0), runs, [], study)
    runs["small-cnn"][60].append({"seed": 0})
    assert ready(("pseudo-label", 60, 0), runs, [], study) and not ready(("fixmatch", 120, 0), runs, [], study)
    assert not ready(("fixmatch", 60, 1), runs, [], study)  # another seed's small CNN
    first = ("rotation-ssl", 60, 0)
    assert ready(first, runs, [], study)
    assert not ready(("rotation-ssl", 120, 0), runs, [first], study)
    assert ready(("rotation-ssl", 120, 1), runs, [first], study)  # another seed's backbone
    study.cache("rotation-seed0.pt").write_bytes(b"cached")
    assert ready(("rotation-ssl", 120, 0), runs, [first], study)


def test_workers_take_the_largest_labelled_sets_first_and_the_small_cnn_before_its_methods(tmp_path):
    """The costly cells start first, so the study does not end on one long cell with the other workers idle;
    within a size the study's order stays, so a seed's small CNN is handed out before the methods that read it."""
    from training.limited_data import cells_to_run, empty_runs, largest_first

    cfg = quick_config(tmp_path)
    order = largest_first(cells_to_run(cfg, empty_runs(cfg)))
    sizes = [size for _, size, _ in order]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for size in cfg.sizes:
        for seed in cfg.seeds:
            arms = [arm for arm, s, sd in order if (s, sd) == (size, seed)]
            assert arms.index("small-cnn") < min(arms.index("pseudo-label"), arms.index("fixmatch"))
