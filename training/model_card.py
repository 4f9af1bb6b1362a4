"""The model card of an artifact: the facts a user checks before deploying it, rendered from what the
artifact records (its manifest, and the run's `history.json` and `gallery.json` beside it).

Written as `MODEL_CARD.md` into every run's artifact just before registration
(`training/run_dir.py::finish`), so `servable/artifact.py::register` checksums and stores it with the
model; `python -m training card --model-tag <tag>` renders a registered model's. Intended use, data
and provenance, metrics per split (and per domain when recorded), per class, fp32 vs int8 (vs
optimised), the release gate's verdict, error patterns found by the evaluation, the recipe and the
library versions. No torch. What differs between the trainable models (intended use, backbone, which
setting names the user's data) comes from their entries in training/tasks.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from servable.artifact import ModelManifest
from training.card_format import show as _show
from training.tasks import for_task

MODEL_CARD = "MODEL_CARD.md"
HISTORY = "history.json"
GALLERY = "gallery.json"
# Flags that only say where a run went or how it showed progress: left out of the reproduce command.
NOT_A_CHOICE = ("name", "version", "runs_dir", "progress", "register_model")
# The text domain-transfer study's results (`make domain-study`): its headline goes on the cards of bundled-data
# text models when the file is there.
DOMAIN_STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "domain_study" / "domain_study.json"


def render_model_card(manifest: ModelManifest, history: list[dict] | None = None,
                      mistakes: list[dict] | None = None) -> str:  # fmt: skip
    """The card as Markdown. `history`: the run's epochs; `mistakes`: its most confident test mistakes."""
    m = manifest
    sections = [
        _header(m), _intended_use(m), _data(m), _evaluation(m), _calibration(m), _variants(m),
        _error_patterns(m, mistakes or []), _explanations(m), _training(m, history or []), _versions(m),
    ]  # fmt: skip
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def write_model_card(manifest: ModelManifest, directory: Path) -> Path:
    """Render the card of the artifact staged in `directory` and write it there as MODEL_CARD.md."""
    path = directory / MODEL_CARD
    path.write_text(render_model_card(manifest, _read_json(directory / HISTORY), _read_json(directory / GALLERY)))
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- formatting


def _num(x: float | None, spec: str = ".4f") -> str:
    return "not recorded" if x is None else format(x, spec)


def _fp32(m: ModelManifest) -> dict:
    """The fp32 test report (an artifact registered by hand may record little of it)."""
    return m.metrics.get("test", {}).get("fp32", {})


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _points(x: float) -> str:
    return f"{100 * x:+.2f} points"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    if not rows:
        return "(not recorded)"
    align = align or "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", align]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _per_class(report: dict) -> str:
    rows = [[name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])]
            for name, c in report["per_class"].items()]  # fmt: skip
    return _table(["class", "precision", "recall", "F1", "support"], rows)


# ---------------------------------------------------------------- sections


def _header(m: ModelManifest) -> str:
    return (
        f"# Model card: `{m.name}:{m.version}`\n\n"
        f"{m.task}, {len(m.labels)} classes ({', '.join(m.labels)}); registered {m.created_at}. "
        "Generated at registration from the artifact's own records by `training/model_card.py` "
        "(every figure below is the artifact's, measured by the training run)."
    )


def _intended_use(m: ModelManifest) -> str:
    use, out = for_task(m.task).intended_use(m)
    return "## Intended use\n\n" + use + "\n\n**Out of scope:**\n\n" + "\n".join(f"- {o}" for o in out)


def _data(m: ModelManifest) -> str:
    p = dict(m.provenance)
    lines = ["## Training data and provenance", ""]
    lines.append(f"- source: {_show(p.pop('source', 'not recorded'))}")
    if "out_of_domain" in p:
        lines.append(f"- out-of-domain test set: {_show(p.pop('out_of_domain'))}")
    if for_task(m.task).bundled(m):
        lines.append("- licences, versions and checksums of the bundled data and weights: `docs/assets.md` in "
                     "the Servable repository")  # fmt: skip
    else:
        lines.append("- the data is the user's: its licence and consent are theirs to check")
    counts, extra = p.pop("counts", {}), p.pop("extra_data", None)
    for key in sorted(p):
        lines.append(f"- {key.replace('_', ' ')}: {_show(p[key])}")
    names = {"train": "training", "val": "validation", "test": "test", "ood_test": "out-of-domain test"}
    if counts:
        lines += ["", _table(["split", "examples"], [[names.get(k, k), f"{v:,}"] for k, v in counts.items()])]
    if extra:
        lines += ["", _extra_data(extra)]
    return "\n".join(lines)


def _extra_data(e: dict) -> str:
    """What `--extra-data` added to the training split (training/extra_data.py)."""
    fb = e.get("feedback")
    lines = ["### Extra data added to training", "",
             f"{e['added']:,} labelled example(s) added to the training split only (validation and test are the "
             f"data's own, as in the table above), from `{e['path']}` (sha256 `{e['sha256']}`); of "
             f"{e['read']:,} read, {e['dropped']['copies_of_held_out']} dropped as copies of held-out examples and "
             f"{e['dropped']['duplicates']} as repeats."]  # fmt: skip
    if fb:
        tags = ", ".join(f"`{t}`" for t in fb.get("model_tags", []))
        lines.append(f"Source: the feedback queue of `{fb.get('model')}` (predictions of {tags}), exported "
                     f"{fb.get('exported_at')}.")  # fmt: skip
    lines += ["", _table(["class", "examples added"], [[k, f"{v:,}"] for k, v in e["by_label"].items()])]
    return "\n".join(lines)


def _evaluation(m: ModelManifest) -> str:
    test = _fp32(m)
    training = m.metrics.get("training", {})
    lines = ["## Metrics per split (fp32)", ""]
    if training.get("best_value") is not None:
        lines.append(f"- validation: best {training['monitor']} {training['best_value']:.4f} at epoch "
                     f"{_epoch(training.get('best_epoch'))}, whose weights were kept (every epoch: How it was "
                     "trained)")  # fmt: skip
    lines.append(f"- test: accuracy **{_num(test.get('accuracy'))}**, macro F1 {_num(test.get('macro_f1'))}, on "
                 f"{_num(test.get('n'), ',')} examples")  # fmt: skip
    ood = test.get("out_of_domain")
    if ood:
        gap = ood["accuracy"] - test["accuracy"]
        lines.append(f"- out-of-domain test: accuracy **{ood['accuracy']:.4f}** ({_points(gap)} against the "
                     f"test split), macro F1 {_num(ood.get('macro_f1'))}, on {_num(ood.get('n'), ',')} "
                     "examples")  # fmt: skip
    domains = test.get("by_domain")
    if domains:
        rows = [[d, "yes" if r.get("in_domain") else "no", f"{r['n']:,}", f"{r['accuracy']:.4f}",
                 str(r.get("false_positive", "")), str(r.get("false_negative", ""))]
                for d, r in domains.items()]  # fmt: skip
        lines += ["", "Per domain (false positive: a negative text called positive):", "",
                  _table(["domain", "in training domain", "n", "accuracy", "false positives", "false negatives"],
                         rows)]  # fmt: skip
    if "per_class" in test:
        lines += ["", "Per class, test split:", "", _per_class(test)]
    if ood and "per_class" in ood:
        lines += ["", "Per class, out-of-domain test:", "", _per_class(ood)]
    return "\n".join(lines)


def _calibration(m: ModelManifest) -> str:
    """How far its probabilities can be trusted: the temperature serving applies, the abstention threshold,
    and ECE and selective accuracy per set, in and out of domain (training/calibration.py)."""
    from training.calibration import markdown_table

    lines = ["## Probabilities: calibration and abstention", ""]
    c = m.calibration
    if c is None:
        lines.append("Not calibrated: served with temperature 1 (the softmax as trained) and no abstention "
                     "threshold (`below_threshold` is always false).")  # fmt: skip
        return "\n".join(lines)
    lines.append(f"Served probabilities are softmax(logits / **{c.temperature:g}**), the temperature fitted on the "
                 f"{c.fitted_on} split ({c.n:,} examples) by negative log-likelihood; answers under a top-1 "
                 f"probability of **{c.abstain_below:.3f}** carry `below_threshold: true` (that threshold keeps "
                 f"{_pct(c.coverage or 0)} of validation answers above it). Treat those as \"not sure\".")  # fmt: skip
    report = m.metrics.get("calibration")
    if report:
        lines += ["", "Expected calibration error (ECE, 15 bins) before and after the temperature, selective accuracy "
                  "(the most confident share of answers), and the share of answers below the threshold, per set "
                  "(out of domain: unlike the training data); the reliability diagram is "
                  "`calibration.png` in the artifact:", "", markdown_table(report)]  # fmt: skip
    return "\n".join(lines)


def _explanations(m: ModelManifest) -> str:
    """What a masked part is in its explanations, and how faithful they were measured to be."""
    lines = ["## Explanations", ""]
    o = m.occlusion
    if o is None:
        lines.append("Occlusion masks a patch with the image's mean, or cuts a word out (an artifact recorded "
                     "before the mask was chosen from the training data).")  # fmt: skip
    elif o.pixel_fill is not None:
        lines.append(f"Occlusion masks a patch with the training images' background, pixel value "
                     f"{_show(o.pixel_fill)} (the median of their border): a masked patch shows nothing, rather than "
                     "a new grey shape.")  # fmt: skip
    else:
        lines.append(f"Occlusion replaces a word with the tokenizer's `{o.token}` token: a gap of one word, rather "
                     "than a shorter sentence.")  # fmt: skip
    lines += ["", f"How faithful such explanations are (deletion and insertion curves against random and centre-bias "
              f"orders): `python -m training faithfulness --model-tag {m.name}:{m.version}`; the default run's "
              "figures are in docs/training.md."]  # fmt: skip
    return "\n".join(lines)


def _epoch(best: Any) -> str:
    return f"{best[1]} of stage {best[0]}" if isinstance(best, list | tuple) and len(best) == 2 else str(best)


def _latency(r: dict) -> str:
    if "latency_ms" in r:
        return ", ".join(f"{k.replace('_', ' ')}: {v:.1f} ms" for k, v in r["latency_ms"].items())
    if "ms_per_image_batch256" in r:
        return f"{r['ms_per_image_batch256']:.2f} ms per image (batch 256)"
    return "not measured"


def _variants(m: ModelManifest) -> str:
    test, base = m.metrics.get("test", {}), _fp32(m).get("accuracy")
    rows = []
    for variant, r in test.items():
        ood, acc, size = r.get("out_of_domain", {}).get("accuracy"), r.get("accuracy"), r.get("bytes")
        against = "" if variant == "fp32" or None in (acc, base) else _points(acc - base)
        rows.append([variant, f"`{m.onnx.get(variant, '?')}`", "" if size is None else f"{size / 1e6:.1f} MB",
                     _num(acc), against, "" if ood is None else f"{ood:.4f}", _latency(r)])  # fmt: skip
    header = ["variant", "file", "size", "test accuracy", "against fp32", "out-of-domain", "latency"]
    lines = ["## fp32, int8" + (" and optimised" if "optimized" in test else ""), "", _table(header, rows)]
    lines.append("")
    lines.append("Latency is one measurement in the training process on the training machine; the serving "
                 "benchmark is the reference for speed.")  # fmt: skip
    if m.metrics.get("agreement_int8_fp32") is not None:
        lines.append(f"int8 gives the same answer as fp32 on {_pct(m.metrics['agreement_int8_fp32'])} of the test "
                     "examples.")  # fmt: skip
    if m.metrics.get("parity_max_abs_diff") is not None:
        lines.append(f"ONNX export parity with PyTorch: max |logit difference| {m.metrics['parity_max_abs_diff']:.1e}.")
    gate = m.metrics.get("gate")
    lines += ["", "**Release gate** (the default run against the figures its documentation states, "
              "`training/gates.py`):", ""]  # fmt: skip
    if gate is None:
        lines.append("- not recorded: this artifact was registered before the gate existed")
    else:
        lines += [f"- {line.removeprefix('gate: ')}" for line in gate.get("lines", [])]
    return "\n".join(lines)


def _confusions(report: dict, labels: list[str]) -> list[dict] | None:
    """The recorded most frequent mistakes; for two classes they follow from per-class recall if not recorded."""
    if "confusions" in report:
        return report["confusions"]
    if len(labels) != 2 or "per_class" not in report:
        return None
    pc = report["per_class"]
    out = []
    for true, pred in ((labels[0], labels[1]), (labels[1], labels[0])):
        n = round(pc[true]["support"] * (1 - pc[true]["recall"]))
        if n:
            out.append({"true": true, "predicted": pred, "count": n, "share_of_true": n / pc[true]["support"]})
    return sorted(out, key=lambda c: -c["count"])


def _balance(report: dict, labels: list[str], where: str) -> str | None:
    """Two classes: the false positives and negatives, and which way the model errs (by rate, so that a
    larger class does not look worse for being larger)."""
    if len(labels) != 2 or "per_class" not in report:
        return None
    confusions = {(c["true"], c["predicted"]): c["count"] for c in _confusions(report, labels) or []}
    neg, pos = ("negative", "positive") if set(labels) == {"negative", "positive"} else labels
    n_neg, n_pos = report["per_class"][neg]["support"], report["per_class"][pos]["support"]
    fp, fn = confusions.get((neg, pos), 0), confusions.get((pos, neg), 0)
    fpr, fnr = fp / max(n_neg, 1), fn / max(n_pos, 1)
    lean = "about evenly" if abs(fpr - fnr) < 0.02 else f"towards {pos}" if fpr > fnr else f"towards {neg}"
    return (f"{where}: {fp} of {n_neg:,} {neg} examples called {pos} (false positives, {_pct(fpr)}) and {fn} of "
            f"{n_pos:,} {pos} examples called {neg} (false negatives, {_pct(fnr)}): it errs {lean}")  # fmt: skip


def _error_patterns(m: ModelManifest, mistakes: list[dict]) -> str:
    test = _fp32(m)
    lines = ["## Known limitations and error patterns", "",
             "Found by the evaluation of the fp32 model on the test split (and the out-of-domain test set, if "
             "any):", ""]  # fmt: skip
    confusions = _confusions(test, m.labels)
    if len(m.labels) > 2 and confusions:  # (with two classes, the balance below says it with rates)
        lines.append("- most frequent mistakes: " + "; ".join(
            f"{c['true']} called {c['predicted']} {c['count']} times ({_pct(c['share_of_true'])} of {c['true']})"
            for c in confusions))  # fmt: skip
    elif confusions is None:
        lines.append("- the most frequent confusions are not recorded in this artifact")
    balance = _balance(test, m.labels, "test split")
    if balance:
        lines.append(f"- {balance}")
    if test.get("out_of_domain"):
        ood = _balance(test["out_of_domain"], m.labels, "out-of-domain")
        if ood:
            lines.append(f"- {ood}")
    ranked = sorted(test.get("per_class", {}).items(), key=lambda kv: kv[1]["f1"])
    if ranked:
        lines.append("- weakest classes (F1): " + ", ".join(
            f"{name} {c['f1']:.3f} (precision {c['precision']:.3f}, recall {c['recall']:.3f})"
            for name, c in ranked[: min(3, len(ranked) - 1)]))  # fmt: skip
    domains = test.get("by_domain")
    if domains:
        name, worst = min(domains.items(), key=lambda kv: kv[1]["accuracy"])
        lines.append(f"- weakest domain: {name}, accuracy {worst['accuracy']:.4f} on {worst['n']:,} examples"
                     + ("" if worst.get("in_domain") else " (not in the training data)"))  # fmt: skip
    if test.get("out_of_domain"):
        gap = test["out_of_domain"]["accuracy"] - test["accuracy"]
        lines.append(f"- outside its training domain accuracy moves by {_points(gap)}")
    if m.metrics.get("int8_accuracy_drop") is not None:
        lines.append(f"- int8 against fp32: {_points(-m.metrics['int8_accuracy_drop'])} of test accuracy")
    study = _domain_study(m)
    if study:
        lines.append(f"- {study}")
    if mistakes:
        lines += ["", "The most confident test mistakes (with their explanations in the artifact's gallery "
                  "files):", ""]  # fmt: skip
        task = for_task(m.task)
        for e in mistakes[:5]:
            what = f"{e['true']} called {e['predicted']} at {e['confidence']:.2f}"
            lines.append(f"- {task.mistake(e, what)}")
    return "\n".join(lines)


def _domain_study(m: ModelManifest) -> str | None:
    """The headline of the text domain-transfer study, for a text model on the bundled data, if it was run."""
    task = for_task(m.task)
    if not task.domain_study or not task.bundled(m) or not DOMAIN_STUDY.is_file():
        return None
    return domain_study_headline(json.loads(DOMAIN_STUDY.read_text()))


def domain_study_headline(results: dict) -> str:
    """Test accuracy on each bundled domain held out of a base model, with k of its labelled sentences added at
    random or as the labelling loop chooses them: means over the seeds measured."""
    parts = []
    for domain, arms in results["summary"].items():
        ks = sorted({int(k) for cells in arms.values() for k in cells})
        steps = []
        for k in ks:
            got = {arm: arms.get(arm, {}).get(str(k)) for arm in ("random", "active")}
            if k == 0:
                steps.append(f"{next(c for c in got.values() if c)['mean']:.3f} with none")
            else:
                said = [f"{c['mean']:.3f} {'at random' if arm == 'random' else 'by the loop'}"
                        for arm, c in got.items() if c]  # fmt: skip
                steps.append(f"{k:,}: " + ", ".join(said))
        parts.append(f"{domain} " + "; ".join(steps))
    missing = f", {len(results['missing'])} cells not yet run" if results["missing"] else ""
    seeds = len(results["config"]["seeds"])
    return (f"a new domain (`make domain-study`: each domain held out of a base model trained on the others, then "
            f"k of its labelled sentences added, chosen at random or by the labelling loop; test accuracy, mean of "
            f"up to {seeds} seeds{missing}; docs/results/domain_study/domain_study.json, {results['machine']}): "
            + " | ".join(parts))  # fmt: skip


def _reproduce(m: ModelManifest) -> str:
    task = for_task(m.task)
    defaults = task.config.model_construct().model_dump(mode="json")
    flags = [f"--{k.replace('_', '-')} {_flag(v)}" for k, v in m.training_config.items()
             if k not in NOT_A_CHOICE and k in defaults and defaults[k] != v]  # fmt: skip
    return " ".join(["python -m training", task.kind, *flags])


def _flag(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _training(m: ModelManifest, history: list[dict]) -> str:
    c, t, task = m.training_config, m.metrics.get("training", {}), for_task(m.task)
    lines = ["## How it was trained", "", f"- backbone: {task.backbone(m)}",
             f"- command (flags that differ from the defaults): `{_reproduce(m)}`"]  # fmt: skip
    if t:
        lines.append(f"- {t.get('epochs_run')} epochs run in {t.get('seconds')} s; early stopping on "
                     f"{t.get('monitor')} kept epoch {_epoch(t.get('best_epoch'))}"
                     + ("; stopped early" if t.get("stopped_early") else ""))  # fmt: skip
        if t.get("weight_average"):
            lines.append(f"- weight averaging: {_show(t['weight_average'])}")
    lines += ["", "Recipe (every training setting as run, `python -m training "
              f"{task.kind} --help` explains each):", "",
              _table(["setting", "value"], [[k, _show(v)] for k, v in c.items()], "|---|---|")]  # fmt: skip
    if history:
        rows = [[h["stage"], str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}",
                 f"{h['train_acc']:.4f}", f"{h['val_acc']:.4f}", _clipped(h, c.get("clip_norm", 0)),
                 f"{h['seconds']:.0f}"] for h in history]  # fmt: skip
        lines += ["", "By epoch (clipped: the share of steps whose gradient norm exceeded the clipping threshold):", "",
                  _table(["stage", "epoch", "train loss", "val loss", "train acc", "val acc", "clipped", "s"], rows,
                         "|---|---:|---:|---:|---:|---:|---:|---:|")]  # fmt: skip
    return "\n".join(lines)


def _clipped(h: dict, clip_norm: float) -> str:
    return "off" if not clip_norm else f"{100 * h.get('clipped_fraction', 0.0):.1f} %"


def _versions(m: ModelManifest) -> str:
    rows = [[k, v] for k, v in sorted(m.versions.items())]
    return "## Versions\n\n" + _table(["library", "version"], rows, "|---|---|")


def for_registered(tag: str) -> str:
    """The card of a model in the store, rendered from its verified artifact."""
    from servable import artifact

    art = artifact.load(tag)
    return render_model_card(art.manifest, _read_json(art.file(HISTORY)), _read_json(art.file(GALLERY)))
