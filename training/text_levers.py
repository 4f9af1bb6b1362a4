"""Text robustness levers against the out-of-domain negative bias: class-balanced loss weights, decision
thresholds fitted on labelled sentences (the validation split, or a few labelled sentences of a new domain),
and the run report that measures them (`--report-json`; docs/training.md, leave one domain out).

`python -m training.text_levers OUT.json REPORT.json ...` gathers run reports into one results file and prints
their comparison table; `python -m training.text_levers balance OUT.json` writes the default split's class
balance (no training).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from servable.explain import probabilities
from servable.machine import describe_machine


def loss_weights(labels: list[int], domains: list[str], mode: str) -> np.ndarray | None:
    """Per-example loss weights (mean 1): `class` by inverse label frequency, `domain-class` by inverse
    frequency of the (domain, label) pair, so every pair carries the same total weight; None for `none`."""
    if mode == "none":
        return None
    keys = list(labels) if mode == "class" else list(zip(domains, labels, strict=True))
    counts = Counter(keys)
    return np.array([len(keys) / (len(counts) * counts[k]) for k in keys], dtype=np.float32)


def polar(labels: list[str]) -> tuple[int, int] | None:
    """(negative id, positive id) for a negative/positive label set, else None."""
    names = [lab.lower() for lab in labels]
    return (names.index("negative"), names.index("positive")) if {"negative", "positive"} <= set(names) else None


def fit_threshold(p_pos: np.ndarray, y_pos: np.ndarray) -> float:
    """The P(positive) cut that maximises accuracy on these labelled examples (ties: the cut nearest 0.5,
    so that too few labels leave the plain top-class answer)."""
    cuts = np.unique(np.concatenate([[0.5], (np.sort(p_pos)[1:] + np.sort(p_pos)[:-1]) / 2]))
    acc = np.array([((p_pos > c) == y_pos).mean() for c in cuts])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def scores(p_pos: np.ndarray, y_pos: np.ndarray, cut: float) -> dict:
    """n, accuracy and the two kinds of error at a cut: false_positive = negative called positive."""
    pred = p_pos > cut
    return {"n": len(y_pos), "accuracy": float((pred == y_pos).mean()) if len(y_pos) else None,
            "false_positive": int((pred & ~y_pos).sum()), "false_negative": int((~pred & y_pos).sum())}  # fmt: skip


def threshold_report(sets: dict, labels: list[str], sample: int, seed: int) -> dict | None:
    """Decision thresholds and what they do, on sentiment labels (None otherwise). `sets`: split -> (logits,
    label ids, domains) for `val`, `test` and (bundled data) `ood`.

    - `validation`: one cut fitted on the pooled in-domain validation split, applied to every test domain;
    - `per_domain`: each in-domain domain's cut fitted on its own validation sentences, applied to its test;
    - `held_out`: the held-out domain's cut fitted on `sample` of its labelled sentences (a seeded draw: a
      user with a few labels), scored on the rest, beside the top-class answer on the same rest."""
    ids = polar(labels)
    if ids is None:
        return None
    pos = ids[1]

    def parts(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, y, doms = sets[name]
        return probabilities(np.asarray(logits))[:, pos], np.asarray(y) == pos, np.asarray(doms)

    vp, vy, vd = parts("val")
    cut = fit_threshold(vp, vy)
    out: dict = {"validation": {"threshold": cut, "domains": {}}, "per_domain": {}}
    for name in [n for n in ("test", "ood") if n in sets and len(sets[n][1])]:
        p, y, d = parts(name)
        for dom in sorted(set(d)):
            m = d == dom
            out["validation"]["domains"][dom] = {"in_domain": name == "test", "argmax": scores(p[m], y[m], 0.5),
                                                 "threshold": scores(p[m], y[m], cut)}  # fmt: skip
            if name == "test" and (vd == dom).any():
                own = fit_threshold(vp[vd == dom], vy[vd == dom])
                out["per_domain"][dom] = {"threshold": own, "fitted_on": int((vd == dom).sum()),
                                          "argmax": scores(p[m], y[m], 0.5),
                                          "fitted": scores(p[m], y[m], own)}  # fmt: skip
    if "ood" in sets and sample and len(sets["ood"][1]) > sample:
        p, y, d = parts("ood")
        pick = np.zeros(len(y), dtype=bool)
        pick[np.random.default_rng(seed).choice(len(y), sample, replace=False)] = True
        own = fit_threshold(p[pick], y[pick])
        rest = ~pick
        out["held_out"] = {"domain": str(d[0]), "threshold": own, "fitted_on": sample,
                           "positive_share_of_sample": float(y[pick].mean()),
                           "argmax": scores(p[rest], y[rest], 0.5), "fitted": scores(p[rest], y[rest], own),
                           "validation_cut": scores(p[rest], y[rest], cut)}  # fmt: skip
    return out


def class_balance(splits) -> dict:
    """domain -> split -> {n, positive_share} (the share of each label id 1 where labels are not polar)."""
    ids = polar(splits.labels)
    pos = ids[1] if ids else 1
    out: dict = {}
    for split in ("train", "val", "test", "ood_test"):
        by: dict[str, list[int]] = {}
        for (_, y), dom in zip(getattr(splits, split), splits.domains[split], strict=True):
            by.setdefault(dom, []).append(y)
        for dom, ys in sorted(by.items()):
            share = round(float(np.mean(np.array(ys) == pos)), 4)
            out.setdefault(dom, {})[split] = {"n": len(ys), "positive_share": share}
    return out


def write_report(path: Path, cfg, splits, metrics: dict, history: list, seconds: float) -> dict:
    """The run's figures for comparing recipes, with the command and machine they come from."""
    fp32 = metrics["test"]["fp32"]
    report = {
        "command": "python -m training text " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["text"] else sys.argv[1:]),
        "machine": describe_machine(),
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "held_out": cfg.held_out if cfg.data_file is None else None,
        "class_weights": cfg.class_weights,
        "seed": cfg.seed,
        "train_seconds": round(sum(h["seconds"] for h in history), 1),
        "seconds": round(seconds, 1),
        "epochs": [{k: h[k] for k in ("stage", "epoch", "train_loss", "val_loss", "val_acc")} for h in history],
        "accuracy_in_domain": fp32["accuracy"],
        "accuracy_out_of_domain": fp32.get("out_of_domain", {}).get("accuracy"),
        "by_domain": fp32["by_domain"],
        "decision_threshold": metrics.get("decision_threshold"),
        "class_balance": class_balance(splits),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(reports: list[dict]) -> str:
    """Markdown: per run, held-out accuracy and errors (top class; the cut fitted on the held-out sample),
    pooled in-domain accuracy."""
    lines = ["| held out | loss weights | held-out accuracy (FP / FN) | in domain | held-out rest: top class "
             "(FP / FN) | held-out rest: own cut (FP / FN) |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(reports, key=lambda r: (r["held_out"], r["class_weights"])):
        d = r["by_domain"][r["held_out"]]
        h = (r.get("decision_threshold") or {}).get("held_out")
        cell = lambda s: f"{s['accuracy']:.3f} ({s['false_positive']} / {s['false_negative']})"  # noqa: E731
        rest = (cell(h["argmax"]), f"{cell(h['fitted'])}, cut {h['threshold']:.2f}") if h else ("-", "-")
        lines.append(f"| {r['held_out']} | {r['class_weights']} | {cell(d)} | {r['accuracy_in_domain']:.3f} | "
                     f"{rest[0]} | {rest[1]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def held_out_means(reports: list[dict]) -> str:
    """The held-out accuracy averaged over the domains run, per loss weighting: top class on the whole held-out
    set, and (on the rest after the sample) top class vs the cut fitted on the sample."""
    parts = []
    for mode in sorted({r["class_weights"] for r in reports}):
        runs = [r for r in reports if r["class_weights"] == mode]
        whole = np.mean([r["by_domain"][r["held_out"]]["accuracy"] for r in runs])
        held = [(r.get("decision_threshold") or {}).get("held_out") for r in runs]
        top, own = (np.mean([h[key]["accuracy"] for h in held]) if all(held) else 0.0 for key in ("argmax", "fitted"))
        rest = f"; on the rest, top class {top:.3f}, own cut {own:.3f}" if all(held) else ""
        names = ", ".join(sorted(r["held_out"] for r in runs))
        parts.append(f"loss weights {mode}, mean over {len(runs)} held-out domains ({names}): {whole:.3f}{rest}")
    return "; ".join(parts)


def balance_table(report: dict) -> str:
    """Markdown: a run's sentences per domain and split, with the positive share."""
    splits = {"train": "train", "val": "validation", "test": "test", "ood_test": "held out (test only)"}
    lines = ["| domain | " + " | ".join(splits.values()) + " |", "|---|" + "---:|" * len(splits)]
    for dom, by in report["class_balance"].items():
        cells = [f"{by[s]['n']:,} ({100 * by[s]['positive_share']:.1f} % positive)" if s in by else "-" for s in splits]
        lines.append(f"| {dom} | " + " | ".join(cells) + " |")
    pooled = []
    for s in splits:
        parts = [by[s] for by in report["class_balance"].values() if s in by]
        n = sum(p["n"] for p in parts)
        share = sum(p["n"] * p["positive_share"] for p in parts) / n if s != "ood_test" and n else None
        pooled.append("-" if share is None else f"{n:,} ({100 * share:.1f} % positive)")
    return "\n".join([*lines, "| trained domains, pooled | " + " | ".join(pooled) + " |"]) + "\n"


def collect(paths: list[Path], out: Path) -> dict:
    """The run reports in one results file (docs/results/training/text_levers.json): runs by file name."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(paths)}
    reports = list(runs.values())
    data = {"what": "leave one domain out: default recipe vs class-balanced loss, and decision thresholds",
            "runs": runs, "table": table(reports), "means": held_out_means(reports)}  # fmt: skip
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def balance_report(out: Path, datasets_dir: Path = Path(".cache/datasets"), seed: int = 42) -> dict:
    """The default split's class balance by domain and split, from the data code alone (no training)."""
    from training.data_text import load_bundled

    splits = load_bundled(datasets_dir, seed, val_fraction=0.1)
    data = {"command": f"python -m training.text_levers balance {out}", "seed": seed,
            "held_out": splits.provenance["ood_domain"], "class_balance": class_balance(splits)}  # fmt: skip
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.text_levers",
                                 description="Gather leave-one-domain-out runs' reports into tables, or print the "
                                 "class balance by domain and split.")  # fmt: skip
    sub = ap.add_subparsers(dest="what", required=True)
    gather = sub.add_parser("gather", help="OUT.json REPORT.json ...: the runs' tables, written to OUT.json")
    gather.add_argument("out", type=Path)
    gather.add_argument("reports", type=Path, nargs="+")
    balance = sub.add_parser("balance", help="OUT.json: the class balance by domain and split (no training)")
    balance.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.what == "balance":
        print(balance_table(balance_report(args.out)), end="")
    else:
        data = collect(args.reports, args.out)
        print(data["table"] + data["means"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
