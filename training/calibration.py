"""Whether a classifier's probabilities mean what they say, and a temperature that makes them closer.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017): one scalar T divides
the logits before the softmax, fitted by the negative log-likelihood of the validation split; the answer
(the top label) never changes, only how sure it says it is. The abstention threshold is the calibrated
top-1 probability under which `1 - coverage` of the validation answers fall: serving flags answers below
it (`below_threshold`). Measured per set of examples: expected calibration error (ECE, 15 equal-width
bins), negative log-likelihood, and selective accuracy (the accuracy of the most confident answers at a
given coverage), before and after the temperature, with reliability diagrams.

`python -m training calibration --model-tag <tag>` measures a registered model (its splits rebuilt from
its recorded config, the temperature fitted again on its validation split); the pipelines fit and store
the temperature at training time (`fit`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from servable import artifact
from servable.artifact import Calibration
from servable.config import TrainCommon
from servable.explain import probabilities
from training.tasks import LabelledLogits, for_task

BINS = 15
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T) (one-dimensional, bounded)."""
    found = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=LOG_T_BOUNDS, method="bounded")
    return float(np.exp(found.x))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: examples, mean confidence and accuracy of the top-1 answers."""
    conf, right = probs.max(1), probs.argmax(1) == y
    index = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "n": int(sel.sum()),
                        "confidence": float(conf[sel].mean()), "accuracy": float(right[sel].mean())})  # fmt: skip
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per bin, weighted by the bin's share of examples."""
    rows = reliability(probs, y, bins)
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(len(y), 1))


def selective_accuracy(probs: np.ndarray, y: np.ndarray, coverage: float) -> float:
    """Accuracy of the `coverage` share of answers the model is surest of."""
    keep = max(1, round(coverage * len(y)))
    order = np.argsort(-probs.max(1), kind="stable")[:keep]
    return float((probs.argmax(1)[order] == y[order]).mean())


def threshold_for(probs: np.ndarray, coverage: float) -> float:
    """The top-1 probability at or above which `coverage` of these answers lie."""
    return float(np.quantile(probs.max(1), 1 - coverage))


def fit(val_logits: np.ndarray, val_y: np.ndarray, coverage: float) -> Calibration:
    """Temperature and abstention threshold from the validation split's logits."""
    t = fit_temperature(val_logits, val_y)
    probs = probabilities(val_logits / t)
    threshold = threshold_for(probs, coverage)
    return Calibration(temperature=round(t, 4), abstain_below=round(threshold, 6),
                       coverage=round(float((probs.max(1) >= threshold).mean()), 4), n=len(val_y))  # fmt: skip


def measure(cal: Calibration, sets: dict[str, LabelledLogits], coverage: float) -> dict:
    """Each set's calibration before and after the temperature, and its answers at the threshold."""
    out = {"temperature": cal.temperature, "abstain_below": cal.abstain_below, "coverage_target": coverage,
           "bins": BINS, "sets": {}}  # fmt: skip
    for name, s in sets.items():
        raw, scaled = probabilities(s.logits), probabilities(s.logits / cal.temperature)
        below = scaled.max(1) < (cal.abstain_below if cal.abstain_below is not None else 0.0)
        row: dict = {"n": len(s.logits), "in_domain": s.in_domain,
                     "below_threshold_share": round(float(below.mean()), 4),
                     "mean_confidence": {"raw": round(float(raw.max(1).mean()), 4),
                                         "calibrated": round(float(scaled.max(1).mean()), 4)}}  # fmt: skip
        if s.y is not None:
            right = scaled.argmax(1) == s.y
            row |= {
                "accuracy": round(float(right.mean()), 4),
                "ece": {"raw": round(ece(raw, s.y), 4), "calibrated": round(ece(scaled, s.y), 4)},
                "nll": {"raw": round(nll(s.logits, s.y), 4),
                        "calibrated": round(nll(s.logits, s.y, cal.temperature), 4)},
                f"selective_accuracy_at_{round(100 * coverage)}pct":
                    round(selective_accuracy(scaled, s.y, coverage), 4),
                "accuracy_above_threshold": round(float(right[~below].mean()), 4) if (~below).any() else None,
                "accuracy_below_threshold": round(float(right[below].mean()), 4) if below.any() else None,
                "reliability": {"raw": reliability(raw, s.y), "calibrated": reliability(scaled, s.y)},
            }  # fmt: skip
        out["sets"][name] = row
    return out


def plot_reliability(report: dict, title: str, path: Path) -> None:
    """One reliability diagram per labelled set: accuracy against confidence per bin, raw and calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {k: v for k, v in report["sets"].items() if "reliability" in v}
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], sets.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect")
        for kind, style in (("raw", "o--"), ("calibrated", "s-")):
            rows = s["reliability"][kind]
            t = 1.0 if kind == "raw" else report["temperature"]
            ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], style, ms=4,
                    label=f"T={t:g}: ECE {s['ece'][kind]:.3f}")  # fmt: skip
        ax.set(title=f"{name} (n={s['n']}, acc {s['accuracy']:.3f})", xlabel="confidence (top-1 probability)",
               ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))  # fmt: skip
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    """The report's figures as a table for docs and the model card."""
    cov = round(100 * report["coverage_target"])
    lines = [f"| set | in domain | n | accuracy | ECE raw | ECE at T={report['temperature']:g} | selective accuracy at "
             f"{cov} % | share below threshold |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in report["sets"].items():
        where = "yes" if s["in_domain"] else "no"
        if "ece" in s:
            lines.append(f"| {name} | {where} | {s['n']} | {s['accuracy']:.3f} | {s['ece']['raw']:.3f} | "
                         f"{s['ece']['calibrated']:.3f} | {s[f'selective_accuracy_at_{cov}pct']:.3f} | "
                         f"{s['below_threshold_share']:.2f} |")  # fmt: skip
        else:
            lines.append(f"| {name} (no right answer) | {where} | {s['n']} | – | – | – | – | "
                         f"{s['below_threshold_share']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def calibrate(cfg: TrainCommon, sets: dict[str, LabelledLogits], metrics: dict, staging: Path) -> Calibration | None:
    """At training time: fit the temperature and threshold on validation, measure every set into
    `metrics["calibration"]`, draw `calibration.png` in the artifact; None with --calibrate false."""
    if not cfg.calibrate:
        return None
    val = sets["validation"]
    cal = fit(val.logits, val.y, cfg.abstain_coverage)
    report = measure(cal, sets, cfg.abstain_coverage)
    plot_reliability(report, f"{cfg.name}: reliability before and after temperature scaling",
                     staging / "calibration.png")  # fmt: skip
    for s in report["sets"].values():
        s.pop("reliability", None)  # the diagram has them; the manifest keeps the figures
    metrics["calibration"] = report
    tqdm.write(f"temperature {cal.temperature:g} (validation); abstain below {cal.abstain_below:.3f}: "
               + "; ".join(f"{k} ECE {v['ece']['raw']:.3f} -> {v['ece']['calibrated']:.3f}"
                           for k, v in report["sets"].items() if "ece" in v))  # fmt: skip
    return cal


def for_registered(tag: str, out: Path, coverage: float, machine: str) -> dict:
    """Calibration of a registered model without retraining: its validation and test sets (and the
    out-of-domain ones its task has) rebuilt from the recorded config and scored by its fp32 ONNX file; the
    temperature fitted again on validation (the stored one, where the artifact has it, is reported too)."""
    from training.onnx_tools import cpu_session

    art = artifact.load(tag)
    m = art.manifest
    task = for_task(m.task)
    fields = {k: v for k, v in m.training_config.items() if k not in ("version", "runs_dir")}
    cfg = task.config(**{**fields, "progress": False})
    sets = task.calibration_sets(cfg, art, cpu_session(art.onnx_path("fp32")))
    val = sets.pop("validation")
    cal = fit(val.logits, val.y, coverage)
    report = {"model": art.tag, "machine": machine, "stored_calibration": m.calibration.model_dump() if m.calibration
              else None, "command": f"python -m training calibration --model-tag {tag} --out {out}",
              **measure(cal, {"validation": val, **sets}, coverage)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{m.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_reliability(report, f"{art.tag}: reliability before and after temperature scaling", out / f"{m.name}.png")
    (out / f"{m.name}.md").write_text(markdown_table(report) + "\n")
    return report
