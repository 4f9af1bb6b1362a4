"""Classification metrics and plots written next to the model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

TOP_CONFUSIONS = 5


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the most frequent confusions."""
    idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(f.mean()),
        "n": len(y_true),
        "per_class": {
            labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in idx
        },
        "confusions": top_confusions(y_true, y_pred, labels),
    }


def by_domain(y_true: np.ndarray, y_pred: np.ndarray, domains: list[str], labels: list[str], in_domain: bool) -> dict:
    """Per domain: n, accuracy and the error balance as counts. false_positive = a "negative" text called
    "positive", false_negative = a "positive" text called "negative" (None for label sets without both)."""
    names = [lab.lower() for lab in labels]
    polar = {"positive", "negative"} <= set(names)
    pos, neg = (names.index("positive"), names.index("negative")) if polar else (None, None)
    y_true, y_pred, doms = np.asarray(y_true), np.asarray(y_pred), np.asarray(domains)
    out = {}
    for name in sorted(set(domains)):
        t, p = y_true[doms == name], y_pred[doms == name]
        out[name] = {
            "n": len(t),
            "accuracy": float((t == p).mean()),
            "false_positive": None if pos is None else int(((t == neg) & (p == pos)).sum()),
            "false_negative": None if pos is None else int(((t == pos) & (p == neg)).sum()),
            "in_domain": in_domain,
        }
    return out


def domain_table(by_variant: dict[str, dict]) -> list[str]:
    """Log lines, one per variant and domain: n, accuracy, false positives, false negatives."""
    lines = [f"{'variant':<10} {'domain':<12} {'set':<13} {'n':>6} {'accuracy':>8} {'FP':>5} {'FN':>5}"]
    for variant, domains in by_variant.items():
        for name, m in domains.items():
            fp, fn = ("-" if m[k] is None else m[k] for k in ("false_positive", "false_negative"))
            where = "in-domain" if m["in_domain"] else "out-of-domain"
            lines.append(f"{variant:<10} {name:<12} {where:<13} {m['n']:>6} {m['accuracy']:>8.4f} {fp:>5} {fn:>5}")
    return lines


def top_confusions(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], k: int = TOP_CONFUSIONS) -> list[dict]:
    """The `k` most frequent (true, predicted) mistakes, with their share of the true class: what the
    model card reports as the error pattern (for two classes: the false positives and negatives)."""
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    np.fill_diagonal(cm, 0)
    support = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=len(labels))
    pairs = sorted(((int(cm[i, j]), i, j) for i in range(len(labels)) for j in range(len(labels)) if cm[i, j]),
                   key=lambda c: (-c[0], c[1], c[2]))[:k]  # fmt: skip
    return [{"true": labels[i], "predicted": labels[j], "count": n, "share_of_true": n / int(support[i])}
            for n, i, j in pairs]  # fmt: skip


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and gradient health (global norm before clipping, share of clipped steps) by epoch."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(1, len(history) + 1)
    a1.plot(x, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(x, [h["val_loss"] for h in history], "o-", label="val")
    a2.plot(x, [h["train_acc"] for h in history], "o-", label="train")
    a2.plot(x, [h["val_acc"] for h in history], "o-", label="val")
    a3.plot(x, [h.get("grad_norm", np.nan) for h in history], "o-", label="mean")
    a3.plot(x, [h.get("grad_norm_max", np.nan) for h in history], "o--", label="max")
    for xi, h in zip(x, history, strict=True):
        if h.get("clipped_fraction"):
            a3.annotate(f"{100 * h['clipped_fraction']:.0f}% clipped", (xi, h["grad_norm"]), fontsize=7,
                        textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
    stages = [h["stage"] for h in history]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for a in (a1, a2, a3):
                a.axvline(i + 0.5, color="grey", ls="--", lw=1)
    a1.set(title="loss", xlabel="epoch")
    a2.set(title="accuracy", xlabel="epoch")
    a3.set(title="gradient norm before clipping", xlabel="epoch", yscale="log")
    for a in (a1, a2, a3):
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], path: Path) -> None:
    """The confusion matrix, with each class's precision, recall, F1 and support beside it."""
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    per_class = classification_report(y_true, y_pred, labels)["per_class"]
    side = 1.0 + 0.6 * len(labels)
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(side + 4.2, side), gridspec_kw={"width_ratios": [side, 4.2]})
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")  # fmt: skip
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    rows = [[f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])]
            for m in per_class.values()]  # fmt: skip
    tab.axis("off")
    table = tab.table(cellText=rows, rowLabels=list(per_class), colLabels=["precision", "recall", "F1", "n"],
                      loc="center", cellLoc="right")  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    tab.set_title("per class (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_class_markdown(report: dict) -> str:
    """The per-class precision / recall / F1 / support of `classification_report` as a Markdown table."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in report["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    return "\n".join(lines) + "\n"
