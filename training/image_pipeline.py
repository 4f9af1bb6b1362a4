"""Image model end to end: data -> two-stage fine-tune -> ONNX -> int8 -> metrics -> model store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from servable import drift_reference
from servable.artifact import Artifact, ModelManifest
from servable.config import ImageTrainConfig
from servable.explain import Occlusion, background_fill, normalised_fill, probabilities
from servable.preprocessing import ImagePreprocessing, normalize, to_model_pixels
from training import calibration, onnx_tools
from training.data_images import ImageSplits, load_fashion_mnist, load_image_folder
from training.extra_data import add_images
from training.gallery import image_gallery
from training.image_model import (
    BackboneHead,
    ImageClassifier,
    build_augmentation,
    channels_last,
    normalize_batch,
    to_default_layout,
    to_training_layout,
)
from training.loop import EarlyStopping, EpochLog, keep_weight_average, run_stage, weight_averager
from training.metrics import classification_report
from training.run_dir import finish, make_run_dir, training_summary, write_outputs
from training.runtime import pick_device, prepare_process, seed_everything
from training.small_cnn import SmallCNN
from training.tasks import LabelledLogits


@dataclass
class ImageRun:
    tag: str | None
    staging: Path
    metrics: dict
    model: ImageClassifier
    splits: ImageSplits
    preprocessing: ImagePreprocessing


def batches(x: np.ndarray, y: np.ndarray, size: int, gen: torch.Generator | None = None) -> Iterator:
    """Mini-batches of uint8 pixels; shuffled when a generator is given."""
    order = torch.randperm(len(x), generator=gen).numpy() if gen is not None else np.arange(len(x))
    for i in range(0, len(x), size):
        idx = order[i : i + size]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def load_splits(cfg: ImageTrainConfig, prep: ImagePreprocessing) -> ImageSplits:
    common = dict(seed=cfg.seed, val_fraction=cfg.val_fraction, limit=cfg.limit, progress=cfg.progress)
    if cfg.data_dir is not None:
        return load_image_folder(cfg.data_dir, prep, **common)
    return load_fashion_mnist(cfg.fashion_mnist_dir, prep, test_limit=cfg.test_limit, **common)


def build_model(cfg: ImageTrainConfig, num_classes: int) -> BackboneHead:
    if cfg.architecture == "small-cnn":
        return SmallCNN(num_classes, cfg.dropout)
    return ImageClassifier(num_classes, cfg.dropout, cfg.pretrained)


def fine_tune(
    cfg: ImageTrainConfig, splits: ImageSplits, prep: ImagePreprocessing, init_state: dict | None = None,
    backbone_lr_factor: float = 1.0, frozen_bn: bool = False,
):  # fmt: skip
    """Stage 1: new head on a frozen backbone. Stage 2: everything, at a lower learning rate.

    From scratch, stage 1 is skipped (`epochs_head=0`): there is nothing worth keeping frozen.
    `init_state` starts from trained weights instead (a second round of training, e.g. self-training).
    `backbone_lr_factor` < 1 trains the backbone slower than the head in stage 2; `frozen_bn` keeps the
    backbone's BatchNorm statistics in stage 2 (a few hundred labels give batches too noisy to re-estimate them).
    """
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = build_model(cfg, len(splits.labels))
    if init_state is not None:
        model.load_state_dict(init_state)
    model = to_training_layout(model, device)
    augment = build_augmentation().to(device) if cfg.augment else None

    def forward(batch):
        x, y = batch
        x = normalize_batch(x.to(device, non_blocking=True), prep)
        if augment is not None and model.training:
            x = augment(x)
        return model(channels_last(x)), y.to(device)

    def val_batches():
        if not cfg.pretrained:  # every evaluation of a from-scratch network sees its current statistics
            recompute_batchnorm(model, splits.train_x, prep, device)
        return batches(splits.val_x, splits.val_y, 256)

    common = dict(
        cfg=cfg, forward=forward, device=device,
        train_batches=lambda: batches(splits.train_x, splits.train_y, cfg.batch_size, gen),
        n_train_batches=-(-len(splits.train_y) // cfg.batch_size),
        val_batches=val_batches,
        val_targets=torch.from_numpy(splits.val_y),
        l1_params=list(model.head.parameters()),
    )  # fmt: skip
    history: list[EpochLog] = []
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor)
    tqdm.write(f"training on {device}: {len(splits.train_y)} train / {len(splits.val_y)} val images")
    model.freeze_backbone(True)
    stopped = run_stage(model, stage="head", params=list(model.head.parameters()), epochs=cfg.epochs_head,
                        lr=cfg.lr_head, stopper=stopper, history=history,
                        on_train_start=model.hold_frozen_batchnorm, **common)  # fmt: skip
    model.freeze_backbone(False)
    if not stopped:
        averager = weight_averager(model, cfg)
        groups = (
            None
            if backbone_lr_factor == 1
            else [(model.head.parameters(), 1.0), (model.backbone.parameters(), backbone_lr_factor)]
        )
        stopped = run_stage(model, stage="finetune", params=list(model.parameters()),
                            epochs=cfg.epochs_finetune, lr=cfg.lr_finetune, stopper=stopper,
                            history=history, averager=averager, lr_groups=groups,
                            on_train_start=model.hold_batchnorm_statistics if frozen_bn else lambda: None,
                            **common)  # fmt: skip
        keep_weight_average(averager, model, stopper, **common)
    stopper.restore(model)  # the best epoch's weights with the BatchNorm statistics measured for them
    return to_default_layout(model.cpu()).eval(), history, stopper, stopped


PRECISE_BN_IMAGES = 1024


def recompute_batchnorm(model: BackboneHead, x: np.ndarray, prep: ImagePreprocessing, device: torch.device) -> None:
    """Precise BatchNorm: running statistics recomputed with the current weights on training images.

    A network trained from scratch changes fast; the moving averages of a short run still mix in the
    statistics of earlier weights, and in eval mode it can then score near chance while it learns
    (a thousand images give stable statistics: Wu & Johnson, "Rethinking 'Batch' in BatchNorm").
    """
    x = x[:PRECISE_BN_IMAGES]
    update_bn((normalize_batch(xb.to(device), prep) for xb, _ in batches(x, np.zeros(len(x)), 256)), model, device)


@torch.no_grad()
def predict_proba(model: BackboneHead, x: np.ndarray, prep: ImagePreprocessing, batch: int = 512) -> np.ndarray:
    """Softmax probabilities of an eval-mode model for uint8 pixels (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(normalize_batch(torch.from_numpy(x[i : i + batch]).to(device), prep)), 1).cpu()
           for i in range(0, len(x), batch)]  # fmt: skip
    return torch.cat(out).numpy() if out else np.empty((0, 0), dtype=np.float32)


def onnx_predict(session, x: np.ndarray, prep: ImagePreprocessing, batch: int = 256) -> np.ndarray:
    """Logits for uint8 pixels through the shared numpy normalisation and ONNX Runtime."""
    out = [session.run(["logits"], {prep.input_name: normalize(x[i : i + batch], prep)})[0]
           for i in range(0, len(x), batch)]  # fmt: skip
    return np.concatenate(out)


def export_and_measure(cfg: ImageTrainConfig, model, splits: ImageSplits, prep, staging: Path) -> dict:
    fp32 = staging / "model.onnx"
    example = torch.from_numpy(normalize(splits.test_x[:2], prep))
    onnx_tools.export(model, (example,), fp32, [prep.input_name], {prep.input_name: {0: "batch"}})
    sess = onnx_tools.cpu_session(fp32)
    # Parity on real test images, at a batch of many and a batch of one (dynamic axis in use).
    diff = max(
        onnx_tools.parity(model, sess, {prep.input_name: normalize(splits.test_x[:64], prep)}, cfg.parity_tolerance),
        onnx_tools.parity(model, sess, {prep.input_name: normalize(splits.test_x[-1:], prep)}, cfg.parity_tolerance),
    )
    tqdm.write(f"ONNX export parity: max |diff| = {diff:.2e}")
    variants = {"fp32": fp32}
    if cfg.quantize:
        rng = np.random.default_rng(cfg.seed)
        calib_idx = rng.choice(len(splits.train_x), min(cfg.calibration_size, len(splits.train_x)), replace=False)
        calib = (normalize(splits.train_x[calib_idx[i : i + 32]], prep) for i in range(0, len(calib_idx), 32))
        tqdm.write(f"int8 static quantisation, calibrated on {len(calib_idx)} training images")
        variants["int8"] = onnx_tools.quantize_static_int8(fp32, staging / "model.int8.onnx", prep.input_name, calib)
    results, preds = {}, {}
    for name, path in variants.items():
        session = onnx_tools.cpu_session(path)
        start = time.perf_counter()
        logits = onnx_predict(session, splits.test_x, prep)
        preds[name] = logits.argmax(1)
        if name == "fp32":
            test_logits = logits
        ms = 1000 * (time.perf_counter() - start) / len(splits.test_x)
        results[name] = classification_report(splits.test_y, preds[name], splits.labels)
        results[name].update(bytes=path.stat().st_size, ms_per_image_batch256=round(ms, 3))
        tqdm.write(f"test accuracy {name}: {results[name]['accuracy']:.4f} on {len(splits.test_y)} images")
    metrics = {"test": results, "parity_max_abs_diff": diff, "predictions": preds, "test_logits": test_logits}
    if "int8" in results:  # judged against the documented claim by training/gates.py at registration
        metrics["int8_accuracy_drop"] = results["fp32"]["accuracy"] - results["int8"]["accuracy"]
        metrics["agreement_int8_fp32"] = float((preds["int8"] == preds["fp32"]).mean())
    return metrics


def drift_reference_of(splits: ImageSplits, prep: ImagePreprocessing, session, seed: int, batch: int = 256):
    """The training images' reference distributions (servable/drift_reference.py): the statistics a replica
    computes of each upload, from the same normalised rows, and the exported model's predicted classes."""
    idx = drift_reference.reference_sample(len(splits.train_x), seed)
    parts = []
    for i in range(0, len(idx), batch):
        part = idx[i : i + batch]
        x = splits.train_x[part]
        sizes = None if splits.train_sizes is None else splits.train_sizes[part]
        parts.append(drift_reference.image_statistics(normalize(x, prep), sizes, prep)
                     | drift_reference.class_statistics(onnx_predict(session, x, prep)))  # fmt: skip
    stats = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return drift_reference.reference(stats, splits.labels, "train")


def train_image(cfg: ImageTrainConfig) -> ImageRun:
    prepare_process(cfg.num_threads)
    seed_everything(cfg.seed)
    version, staging = make_run_dir(cfg)
    prep = ImagePreprocessing(size=cfg.image_size, color_mode="RGB" if cfg.data_dir else "L")
    splits = load_splits(cfg, prep)
    if cfg.extra_data is not None:  # training split only; the held-out ones stay the data's own
        extra = add_images(splits, cfg.extra_data, prep, cfg.progress)
        tqdm.write(f"extra data: {extra['added']} image(s) added to training from {cfg.extra_data}")
    model, history, stopper, stopped = fine_tune(cfg, splits, prep)
    metrics = export_and_measure(cfg, model, splits, prep, staging)
    preds, logits = metrics.pop("predictions"), metrics.pop("test_logits")
    metrics["training"] = training_summary(history, stopper, stopped)
    fp32 = onnx_tools.cpu_session(staging / "model.onnx")
    cal = calibration.calibrate(cfg, calibration_sets(splits, fp32, prep, logits), metrics, staging)
    write_outputs(staging, history, splits.test_y, preds["fp32"], splits.labels, metrics)
    occlusion = Occlusion(pixel_fill=background_fill(splits.train_x))  # what "nothing here" looks like to it
    image_gallery(fp32, prep, splits.test_x, splits.test_y, probabilities(logits), splits.labels, staging,
                  occlusion=occlusion)  # fmt: skip
    manifest = ModelManifest(
        name=cfg.name, version=version, task="image-classification", labels=splits.labels,
        onnx={k: f"model.{k}.onnx" if k != "fp32" else "model.onnx" for k in metrics["test"]},
        image_preprocessing=prep, training_config=cfg.model_dump(mode="json"), metrics=metrics,
        provenance=splits.provenance, versions={}, calibration=cal, occlusion=occlusion,
        drift_reference=drift_reference_of(splits, prep, fp32, cfg.seed),
    )  # fmt: skip
    # The PyTorch weights stay beside the artifact (not in it: serving is torch-free); the
    # benchmark's PyTorch-eager peer loads them.
    torch.save({"state_dict": model.state_dict(), "num_classes": len(splits.labels), "dropout": cfg.dropout},
               staging.parent / "pytorch_model.pt")  # fmt: skip
    tag = finish(cfg, manifest, staging)
    return ImageRun(tag, staging, metrics, model, splits, prep)


SHIFT_DEGREES, SHIFT_NOISE = 25, 10.0


def rotated(x: np.ndarray) -> np.ndarray:
    """The images turned by ±SHIFT_DEGREES (alternately): the same classes in a pose the training data
    never shows (a Fashion-MNIST-C-like shift, made offline)."""
    turn = [SHIFT_DEGREES if i % 2 else -SHIFT_DEGREES for i in range(len(x))]
    return np.stack(
        [np.asarray(Image.fromarray(img).rotate(t, Image.Resampling.BILINEAR)) for img, t in zip(x, turn, strict=True)]
    )


def noisy(x: np.ndarray, seed: int) -> np.ndarray:
    """The images with Gaussian pixel noise (sigma SHIFT_NOISE of 255): a plain background no longer plain."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, SHIFT_NOISE, x.shape), 0, 255).astype(np.uint8)


def digits(prep: ImagePreprocessing) -> np.ndarray:
    """scikit-learn's bundled 8x8 handwritten digits (1,797, UCI), white on black like Fashion-MNIST and at
    the model's size: pictures none of the clothing classes is right for."""
    from sklearn.datasets import load_digits

    images = (load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack([to_model_pixels(Image.fromarray(img), prep) for img in images])


def calibration_sets(
    splits: ImageSplits, session, prep: ImagePreprocessing, test_logits: np.ndarray | None = None
) -> dict[str, LabelledLogits]:
    """Validation, test (`test_logits` where the run has them), the test images rotated and noisy, and
    (grey-level models) digits, scored by `session`."""
    sets = {
        "validation": LabelledLogits(onnx_predict(session, splits.val_x, prep), splits.val_y, True),
        "test": LabelledLogits(
            onnx_predict(session, splits.test_x, prep) if test_logits is None else test_logits, splits.test_y, True
        ),
        f"test rotated ±{SHIFT_DEGREES}°": LabelledLogits(
            onnx_predict(session, rotated(splits.test_x), prep), splits.test_y, False
        ),
        f"test with noise σ {SHIFT_NOISE:g}": LabelledLogits(
            onnx_predict(session, noisy(splits.test_x, 0), prep), splits.test_y, False
        ),
    }
    if prep.color_mode == "L":
        sets["digits"] = LabelledLogits(onnx_predict(session, digits(prep), prep), None, False)
    return sets


def registered_calibration_sets(cfg: ImageTrainConfig, art: Artifact, session) -> dict:
    """A registered model's calibration sets, its splits rebuilt from its recorded config."""
    prep = art.manifest.image_preprocessing
    return calibration_sets(load_splits(cfg, prep), session, prep)


def faithfulness_sample(cfg: ImageTrainConfig, art: Artifact, session, n: int):
    """`n` test images drawn with the run's seed, the served probabilities (the stored temperature applied),
    and the notions of absence to compare: the model's (the training images' background) and the older one
    (the image's mean), each at the served explanations' default grid (training/faithfulness.py)."""
    from servable.config import ImageServeSettings
    from training.faithfulness import GridParts

    m, prep = art.manifest, art.manifest.image_preprocessing
    splits = load_splits(cfg, prep)
    pick = np.random.default_rng(cfg.seed).choice(len(splits.test_x), min(n, len(splits.test_x)), replace=False)
    t = m.calibration.temperature if m.calibration else 1.0

    def score(rows: list) -> np.ndarray:
        x = np.stack(rows)
        return probabilities(np.concatenate([session.run(["logits"], {prep.input_name: x[i : i + 256]})[0]
                                             for i in range(0, len(x), 256)]) / t)  # fmt: skip

    occlusion = m.occlusion or Occlusion(pixel_fill=background_fill(splits.train_x))
    fill, grid = (
        normalised_fill(occlusion, prep),
        ImageServeSettings.model_fields["explain_grid"].default,
    )
    absences = {f"background {occlusion.pixel_fill}": lambda x: GridParts(x, grid, fill),
                "image mean (older)": lambda x: GridParts(x, grid, None)}  # fmt: skip
    return list(normalize(splits.test_x[pick], prep)), score, absences


def review_test_split(
    cfg: ImageTrainConfig, art: Artifact, session, out: Path, n: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A registered model's test split rebuilt from its recorded config and scored by `session`, with the
    gallery of its `n` most confident mistakes in `out` (training/review.py)."""
    m = art.manifest
    splits = load_splits(cfg, m.image_preprocessing)
    probs = probabilities(onnx_predict(session, splits.test_x, m.image_preprocessing))
    entries = image_gallery(session, m.image_preprocessing, splits.test_x, splits.test_y, probs, m.labels, out, n=n,
                            occlusion=m.occlusion)  # fmt: skip
    return splits.test_y, probs, entries
