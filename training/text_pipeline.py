"""Text model end to end: data -> fine-tune -> ONNX -> ORT-optimised -> int8 -> metrics -> store."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from servable import drift_reference
from servable.artifact import Artifact, ModelManifest
from servable.config import TextTrainConfig
from servable.explain import Occlusion, probabilities
from servable.preprocessing import TextPreprocessing, encode_texts, load_tokenizer
from training import calibration, onnx_tools
from training.data_text import TextSplits, load_bundled, load_user_file
from training.extra_data import add_texts
from training.gallery import text_gallery
from training.loop import EarlyStopping, EpochLog, keep_weight_average, run_stage, weight_averager
from training.metrics import by_domain, classification_report, domain_table
from training.run_dir import finish, make_run_dir, training_summary, write_outputs
from training.runtime import pick_device, prepare_process, seed_everything
from training.tasks import LabelledLogits
from training.text_levers import loss_weights, threshold_report, write_report
from training.text_model import LogitsOnly, freeze_encoder, head_parameters, load_backbone

LATENCY_BATCHES = (1, 32)


@dataclass
class TextRun:
    tag: str | None
    staging: Path
    metrics: dict
    model: torch.nn.Module
    tokenizer: object
    splits: TextSplits
    preprocessing: TextPreprocessing


def load_splits(cfg: TextTrainConfig) -> TextSplits:
    if cfg.data_file is not None:
        splits = load_user_file(cfg.data_file, cfg.seed, cfg.val_fraction)
    else:
        splits = load_bundled(cfg.datasets_dir, cfg.seed, cfg.val_fraction, domains=cfg.domains, held_out=cfg.held_out)
    if cfg.limit:  # the splits are shuffled: a prefix keeps the mix of domains and labels
        splits.truncate("train", cfg.limit)
        splits.truncate("val", max(200, int(cfg.limit * cfg.val_fraction)))
    if cfg.test_limit:
        splits.truncate("test", cfg.test_limit)
        splits.truncate("ood_test", cfg.test_limit)
    splits.provenance["counts"] = {k: len(getattr(splits, k)) for k in ("train", "val", "test", "ood_test")}
    splits.provenance["counts_by_domain"] = splits.counts_by_domain()
    return splits


def text_batches(rows, tokenizer, max_length: int, size: int, gen: torch.Generator | None = None, weights=None):
    """Dynamic padding: each batch is padded only to its own longest text. With per-row loss `weights`, a
    batch is (encoding, labels, weights).

    When shuffling, texts are grouped by length inside windows of 50 batches (then the batches
    are shuffled), so little compute goes to padding while the order stays random.
    """
    if gen is None:
        order = list(range(len(rows)))
        groups = [order[i : i + size] for i in range(0, len(rows), size)]
    else:
        order = torch.randperm(len(rows), generator=gen).tolist()
        window = size * 50
        groups = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda j: len(rows[j][0]))
            groups += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
    for idx in groups:
        chunk = [rows[j] for j in idx]
        enc = tokenizer([t for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")  # fmt: skip
        y = torch.tensor([lab for _, lab in chunk])
        yield (dict(enc), y) if weights is None else (dict(enc), y, torch.tensor([weights[j] for j in idx]))


def fine_tune(cfg: TextTrainConfig, splits: TextSplits):
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tokenizer, model, source = load_backbone(cfg.backbone, splits.labels, cfg.dropout)
    model.to(device)

    def forward(batch):
        enc, y, *w = batch
        return model(**{k: v.to(device) for k, v in enc.items()}).logits, y.to(device), *(t.to(device) for t in w)

    weights = loss_weights([y for _, y in splits.train], splits.domains["train"], cfg.class_weights)
    common = dict(
        cfg=cfg, forward=forward, device=device,
        train_batches=lambda: text_batches(splits.train, tokenizer, cfg.max_length, cfg.batch_size, gen, weights),
        n_train_batches=-(-len(splits.train) // cfg.batch_size),
        val_batches=lambda: text_batches(splits.val, tokenizer, cfg.max_length, 128),
        val_targets=torch.tensor([lab for _, lab in splits.val]),
        l1_params=head_parameters(model),
    )  # fmt: skip
    history: list[EpochLog] = []
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor)
    per_domain = ", ".join(f"{d} {c['train']}" for d, c in splits.counts_by_domain().items() if "train" in c)
    weighed = "" if weights is None else f"; loss weights {weights.min():.2f}-{weights.max():.2f}"
    tqdm.write(f"training {source} on {device}: {len(splits.train)} train / {len(splits.val)} val texts ({per_domain})"
               + weighed)  # fmt: skip
    freeze_encoder(model, True)
    stopped = run_stage(model, stage="head", params=head_parameters(model), epochs=cfg.epochs_head,
                        lr=cfg.lr_head, stopper=stopper, history=history, **common)  # fmt: skip
    freeze_encoder(model, False, keep_embeddings=cfg.freeze_embeddings, keep_layers=cfg.freeze_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not stopped:
        averager = weight_averager(model, cfg)
        stopped = run_stage(model, stage="finetune", params=trainable, epochs=cfg.epochs_finetune,
                            lr=cfg.lr_finetune, stopper=stopper, history=history, averager=averager,
                            **common)  # fmt: skip
        keep_weight_average(averager, model, stopper, **common)
    stopper.restore(model)
    return tokenizer, model.cpu().eval(), history, stopper, stopped, source


def onnx_predict(session, tok, rows, prep: TextPreprocessing, batch: int = 64) -> np.ndarray:
    """Logits through the serving-side tokenizer (`tokenizers`) and ONNX Runtime."""
    texts = [t for t, _ in rows]
    return np.concatenate([session.run(["logits"], encode_texts(tok, texts[i : i + batch], prep))[0]
                           for i in range(0, len(texts), batch)])  # fmt: skip


def latency_ms(session, tok, texts: list[str], prep: TextPreprocessing, batch: int, repeats: int = 20) -> float:
    """Median wall time of one call at this batch size on real sentences."""
    feeds = encode_texts(tok, (texts * batch)[:batch], prep)
    session.run(["logits"], feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], feeds)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)


def export_and_measure(cfg: TextTrainConfig, model, tokenizer, splits: TextSplits, staging: Path) -> tuple[dict, dict]:
    tokenizer.save_pretrained(staging / "tokenizer")
    names = list(tokenizer.model_input_names)
    prep = TextPreprocessing(tokenizer_file="tokenizer/tokenizer.json", max_length=cfg.max_length,
                             input_names=names, pad_token_id=tokenizer.pad_token_id or 0)  # fmt: skip
    tok = load_tokenizer(staging / prep.tokenizer_file, prep)
    texts = [t for t, _ in splits.test]
    example = encode_texts(tok, texts[:2], prep)
    fp32 = staging / "model.onnx"
    onnx_tools.export(LogitsOnly(model, names), tuple(torch.from_numpy(example[n]) for n in names), fp32, names,
                      {n: {0: "batch", 1: "sequence"} for n in names})  # fmt: skip
    sess = onnx_tools.cpu_session(fp32)
    wrapped = LogitsOnly(model, names)
    longest = max(texts, key=len)
    # Parity across lengths: one token, a mixed-length batch, and a text truncated at max_length.
    cases = [[""], texts[:16], [longest * 20]]
    diff = max(onnx_tools.parity(wrapped, sess, encode_texts(tok, c, prep), cfg.parity_tolerance) for c in cases)
    tqdm.write(f"ONNX export parity: max |diff| = {diff:.2e}")
    variants = {"fp32": fp32}
    if cfg.optimize:
        variants["optimized"] = onnx_tools.optimize_bert(
            fp32, staging / "model.optimized.onnx", model.config.num_attention_heads, model.config.hidden_size
        )
    if cfg.quantize:
        source = variants.get("optimized", fp32)
        variants["int8"] = onnx_tools.quantize_dynamic_int8(source, staging / "model.int8.onnx")
    results: dict = {}
    preds = {}
    for name, path in variants.items():
        session = onnx_tools.cpu_session(path)
        logits = onnx_predict(session, tok, splits.test, prep)
        preds[name] = logits.argmax(1)
        if name == "fp32":
            test_logits = logits
        y = np.array([lab for _, lab in splits.test])
        results[name] = classification_report(y, preds[name], splits.labels)
        results[name]["by_domain"] = by_domain(y, preds[name], splits.domains["test"], splits.labels, in_domain=True)
        if splits.ood_test:
            yo = np.array([lab for _, lab in splits.ood_test])
            ood_pred = onnx_predict(session, tok, splits.ood_test, prep).argmax(1)
            results[name]["out_of_domain"] = classification_report(yo, ood_pred, splits.labels)
            results[name]["by_domain"] |= by_domain(yo, ood_pred, splits.domains["ood_test"], splits.labels, False)
        results[name]["bytes"] = path.stat().st_size
        results[name]["latency_ms"] = {f"batch_{b}": latency_ms(session, tok, texts, prep, b) for b in LATENCY_BATCHES}
        ood = results[name].get("out_of_domain", {}).get("accuracy")
        tqdm.write(f"test accuracy {name}: {results[name]['accuracy']:.4f} in-domain"
                   + (f", {ood:.4f} out-of-domain" if ood is not None else "")
                   + f" | latency {results[name]['latency_ms']}")  # fmt: skip
    metrics = {
        "test": results,
        "parity_max_abs_diff": diff,
        "predictions": preds,
        "test_logits": test_logits,
        "agreement_int8_fp32": float((preds["int8"] == preds["fp32"]).mean()) if "int8" in preds else None,
    }
    if "int8" in results:  # judged against the documented claim by training/gates.py at registration
        metrics["int8_accuracy_drop"] = results["fp32"]["accuracy"] - results["int8"]["accuracy"]
    return metrics, prep


def drift_reference_of(splits: TextSplits, session, tok, prep: TextPreprocessing, seed: int):
    """The training texts' reference distributions (servable/drift_reference.py): the statistics a replica
    computes of each text, from the served tokenizer's ids, and the exported model's predicted classes."""
    rows = [splits.train[i] for i in drift_reference.reference_sample(len(splits.train), seed)]
    texts = [t for t, _ in rows]
    ids = [e.ids for e in tok.encode_batch(texts)]
    stats = drift_reference.text_statistics(texts, ids, drift_reference.unk_id(tok))
    stats |= drift_reference.class_statistics(onnx_predict(session, tok, rows, prep))
    return drift_reference.reference(stats, splits.labels, "train")


def train_text(cfg: TextTrainConfig) -> TextRun:
    started = time.perf_counter()
    prepare_process(cfg.num_threads)
    seed_everything(cfg.seed)
    version, staging = make_run_dir(cfg)
    splits = load_splits(cfg)
    if cfg.extra_data is not None:  # training split only; the held-out ones stay the data's own
        extra = add_texts(splits, cfg.extra_data)
        tqdm.write(f"extra data: {extra['added']} text(s) added to training from {cfg.extra_data}")
    tokenizer, model, history, stopper, stopped, source = fine_tune(cfg, splits)
    metrics, prep = export_and_measure(cfg, model, tokenizer, splits, staging)
    preds, logits = metrics.pop("predictions"), metrics.pop("test_logits")
    metrics["training"] = training_summary(history, stopper, stopped)
    session, tok = onnx_tools.cpu_session(staging / "model.onnx"), load_tokenizer(staging / prep.tokenizer_file, prep)
    sets = calibration_sets(splits, session, tok, prep, logits)
    cal = calibration.calibrate(cfg, sets, metrics, staging)
    metrics["decision_threshold"] = decision_thresholds(cfg, splits, sets)
    write_outputs(staging, history, np.array([lab for _, lab in splits.test]), preds["fp32"], splits.labels, metrics)
    # a masked word is the tokenizer's mask token: a word-shaped gap, not a shorter sentence
    occlusion = Occlusion(token=tokenizer.mask_token or tokenizer.unk_token)
    text_gallery(session, tok, prep, splits.test, probabilities(logits), splits.labels, staging, occlusion=occlusion)
    splits.provenance["backbone"] = source
    manifest = ModelManifest(
        name=cfg.name, version=version, task="text-classification", labels=splits.labels,
        onnx={k: "model.onnx" if k == "fp32" else f"model.{k}.onnx" for k in metrics["test"]},
        text_preprocessing=prep, training_config=cfg.model_dump(mode="json"), metrics=metrics,
        provenance=splits.provenance, versions={"transformers": __import__("transformers").__version__},
        calibration=cal, occlusion=occlusion, drift_reference=drift_reference_of(splits, session, tok, prep, cfg.seed),
    )  # fmt: skip
    # PyTorch weights beside the artifact (serving is torch-free); the benchmark's eager peer loads them.
    model.save_pretrained(staging.parent / "pytorch_model")
    tokenizer.save_pretrained(staging.parent / "pytorch_model")
    tag = finish(cfg, manifest, staging)
    tqdm.write("test accuracy and errors by domain (FP: negative called positive, FN: positive called negative)")
    for line in domain_table({v: r["by_domain"] for v, r in metrics["test"].items()}):
        tqdm.write(line)
    held = (metrics["decision_threshold"] or {}).get("held_out")
    if held:
        tqdm.write(f"held-out {held['domain']}: cut {held['threshold']:.3f} fitted on {held['fitted_on']} labelled "
                   f"sentences; on the other {held['argmax']['n']}: top class {held['argmax']['accuracy']:.4f}, "
                   f"own cut {held['fitted']['accuracy']:.4f} (reported, not served)")  # fmt: skip
    if cfg.report_json is not None:
        write_report(cfg.report_json, cfg, splits, metrics, [asdict(h) for h in history], time.perf_counter() - started)
        tqdm.write(f"report: {cfg.report_json}")
    return TextRun(tag, staging, metrics, model, tokenizer, splits, prep)


def decision_thresholds(cfg: TextTrainConfig, splits: TextSplits, sets: dict[str, LabelledLogits]) -> dict | None:
    """training/text_levers.py::threshold_report on the fp32 logits of validation, test and the held-out set."""
    by_split = {"val": ("validation", "val"), "test": ("test", "test")}
    rows = {k: (sets[name].logits, sets[name].y, splits.domains[split]) for k, (name, split) in by_split.items()}
    held = [k for k in sets if k.endswith("(held out)")]
    if held:  # one held-out domain: the bundled data's
        rows["ood"] = (sets[held[0]].logits, sets[held[0]].y, splits.domains["ood_test"])
    return threshold_report(rows, splits.labels, cfg.threshold_sample, cfg.seed)


def calibration_sets(
    splits: TextSplits, session, tok, prep: TextPreprocessing, test_logits: np.ndarray | None = None
) -> dict[str, LabelledLogits]:
    """Validation, in-domain test (`test_logits` where the run has them) and (bundled data) each held-out
    domain's test texts, scored by `session`."""

    def scored(rows, in_domain: bool) -> LabelledLogits:
        return LabelledLogits(onnx_predict(session, tok, rows, prep), np.array([y for _, y in rows]), in_domain)

    sets = {"validation": scored(splits.val, True)}
    sets["test"] = (
        scored(splits.test, True)
        if test_logits is None
        else LabelledLogits(test_logits, np.array([y for _, y in splits.test]), True)
    )
    for domain in dict.fromkeys(splits.domains.get("ood_test", [])):
        rows = [r for r, d in zip(splits.ood_test, splits.domains["ood_test"], strict=True) if d == domain]
        sets[f"{domain} (held out)"] = scored(rows, False)
    return sets


def registered_calibration_sets(cfg: TextTrainConfig, art: Artifact, session) -> dict:
    """A registered model's calibration sets, its splits rebuilt from its recorded config."""
    prep = art.manifest.text_preprocessing
    return calibration_sets(load_splits(cfg), session, load_tokenizer(art.file(prep.tokenizer_file), prep), prep)


def faithfulness_sample(cfg: TextTrainConfig, art: Artifact, session, n: int):
    """`n` test texts drawn with the run's seed, the served probabilities (the stored temperature applied), and
    the notions of absence to compare: the model's (its tokenizer's mask token) and the older one (the word
    cut out) (training/faithfulness.py)."""
    from transformers import AutoTokenizer

    from servable.config import TextServeSettings
    from training.faithfulness import WordParts

    m, prep = art.manifest, art.manifest.text_preprocessing
    splits = load_splits(cfg)
    pick = np.random.default_rng(cfg.seed).choice(len(splits.test), min(n, len(splits.test)), replace=False)
    tok, t = load_tokenizer(art.file(prep.tokenizer_file), prep), m.calibration.temperature if m.calibration else 1.0

    def score(texts: list) -> np.ndarray:
        return probabilities(onnx_predict(session, tok, [(x, 0) for x in texts], prep) / t)

    if m.occlusion is None:
        hf = AutoTokenizer.from_pretrained(art.file("tokenizer"))
        occlusion = Occlusion(token=hf.mask_token or hf.unk_token)
    else:
        occlusion = m.occlusion
    most = TextServeSettings().explain_max_words()
    absences = {f"token {occlusion.token}": lambda x: WordParts(x, occlusion.token, most),
                "word cut out (older)": lambda x: WordParts(x, None, most)}  # fmt: skip
    return [splits.test[i][0] for i in pick], score, absences


def review_test_split(
    cfg: TextTrainConfig, art: Artifact, session, out: Path, n: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A registered model's test split rebuilt from its recorded config and scored by `session`, with the
    gallery of its `n` most confident mistakes in `out` (training/review.py)."""
    m, prep = art.manifest, art.manifest.text_preprocessing
    splits = load_splits(cfg)
    tok = load_tokenizer(art.file(prep.tokenizer_file), prep)
    probs = probabilities(onnx_predict(session, tok, splits.test, prep))
    entries = text_gallery(session, tok, prep, splits.test, probs, m.labels, out, n=n, occlusion=m.occlusion)
    return np.array([label for _, label in splits.test]), probs, entries
