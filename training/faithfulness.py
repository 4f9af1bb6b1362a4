"""Whether the occlusion explanations point at what the model uses: deletion and insertion curves.

For each input of a held-out sample, its parts (the image's grid patches, the text's words) are put in an
order: the explanation's (servable/explain.py, highest score first), a random one, or a centre-bias one
(nearest the middle first: where a Fashion-MNIST item, or a sentence's core, usually is). Deletion masks
the parts one after the other in that order and follows the explained class's probability; insertion
starts from everything masked and restores them in that order (Petsiuk et al., "RISE", 2018). The area
under each curve (x from 0 to 1: the share of parts) sums it up: a faithful explanation has a lower
deletion area and a higher insertion area than both baselines.

Masking follows a notion of absence: the model's (its manifest's `occlusion`: the training images'
background, the mask token) or the older one (the image's mean, the word cut out). Each is measured with
its own explanation and baselines, so the two notions can be compared.

`python -m training faithfulness --model-tag <tag>` writes docs/results/faithfulness/<name>.json and .md.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from servable import artifact, explain

RANDOM_ORDERS = 2


class Parts(ABC):
    """One input cut into parts that can be masked; `inputs(masks)` are the model inputs for a batch of masks."""

    n: int

    @abstractmethod
    def inputs(self, masks: np.ndarray) -> list:
        """One model input per row of `masks` ((rows, n) bool: True = that part masked)."""

    @abstractmethod
    def centre_order(self) -> np.ndarray:
        """Parts nearest the middle first."""


class GridParts(Parts):
    """An image's grid x grid patches, masked with `fill` ((C, 1, 1) in the model's units, or None: the mean)."""

    def __init__(self, pixels: np.ndarray, grid: int, fill: np.ndarray | None) -> None:
        self.pixels, self.grid, self.n = pixels, grid, grid * grid
        self.fill = pixels.mean(axis=(1, 2), keepdims=True) if fill is None else fill
        _, h, w = pixels.shape
        self.ys, self.xs = explain.grid_edges(h, grid), explain.grid_edges(w, grid)

    def inputs(self, masks: np.ndarray) -> list:
        out = np.repeat(self.pixels[None], len(masks), axis=0)
        for r, mask in enumerate(masks):
            for cell in np.flatnonzero(mask):
                i, j = divmod(int(cell), self.grid)
                out[r, :, self.ys[i] : self.ys[i + 1], self.xs[j] : self.xs[j + 1]] = self.fill
        return list(out)

    def centre_order(self) -> np.ndarray:
        i, j = np.divmod(np.arange(self.n), self.grid)
        mid = (self.grid - 1) / 2
        return np.argsort((i - mid) ** 2 + (j - mid) ** 2, kind="stable")


class WordParts(Parts):
    """A text's words, masked with `token` (None: cut out)."""

    def __init__(self, text: str, token: str | None, max_words: int) -> None:
        self.text, self.token = text, token
        self.words = explain.words(text)[:max_words]
        self.n = len(self.words)

    def inputs(self, masks: np.ndarray) -> list:
        return [explain.masked_text(self.text, [w for w, m in zip(self.words, mask, strict=True) if m], self.token)
                for mask in masks]  # fmt: skip

    def centre_order(self) -> np.ndarray:
        return np.argsort(np.abs(np.arange(self.n) - (self.n - 1) / 2), kind="stable")


def _steps(n: int, points: int) -> np.ndarray:
    """How many parts are masked (deletion) or restored (insertion) at each point of a curve: 0 .. n."""
    return np.unique(np.round(np.linspace(0, n, min(n, points - 1) + 1)).astype(int))


def curves(parts: Parts, order: np.ndarray, target: int, score: Callable[[list], np.ndarray], points: int):
    """(deletion AUC, insertion AUC) of one order: the target's probability as parts go (come back)."""
    steps = _steps(parts.n, points)
    rank = np.empty(parts.n, int)
    rank[order] = np.arange(parts.n)
    deletion = np.array([rank < k for k in steps])  # the first k of the order masked
    insertion = ~deletion  # everything masked but the first k of the order
    probs = score(parts.inputs(np.concatenate([deletion, insertion])))[:, target]
    x = steps / parts.n
    d, i = probs[: len(steps)], probs[len(steps) :]
    return float(np.trapezoid(d, x)), float(np.trapezoid(i, x))


def measure(items: list[Parts], score: Callable[[list], np.ndarray], seed: int, points: int) -> dict:
    """Mean deletion and insertion AUCs of the explanation's order, random orders and the centre-bias order."""
    rng = np.random.default_rng(seed)
    found: dict[str, list[tuple[float, float]]] = {"explanation": [], "random": [], "centre": []}
    wins = 0
    for parts in items:
        if parts.n < 2:
            continue
        base = score(parts.inputs(np.eye(parts.n + 1, parts.n, k=-1, dtype=bool)))  # row 0: nothing masked
        target = int(base[0].argmax())
        scores = explain.occlusion_scores(base, target)  # the explanation, as serving computes it
        orders = {"explanation": np.argsort(-scores, kind="stable"), "centre": parts.centre_order()}
        for name, order in orders.items():
            found[name].append(curves(parts, order, target, score, points))
        randoms = [curves(parts, rng.permutation(parts.n), target, score, points) for _ in range(RANDOM_ORDERS)]
        found["random"].append(tuple(np.mean(randoms, axis=0)))
        e, r, c = found["explanation"][-1], found["random"][-1], found["centre"][-1]
        wins += (e[0] < min(r[0], c[0])) and (e[1] > max(r[1], c[1]))
    n = len(found["explanation"])
    return {
        "n": n,
        "orders": {k: {"deletion_auc": round(float(np.mean([d for d, _ in v])), 4),
                       "insertion_auc": round(float(np.mean([i for _, i in v])), 4)} for k, v in found.items()},
        "explanation_beats_both_baselines_share": round(wins / max(n, 1), 3),
    }  # fmt: skip


def markdown_table(report: dict) -> str:
    lines = ["| masked as | order | deletion AUC (lower: faithful) | insertion AUC (higher: faithful) |",
             "|---|---|---|---|"]  # fmt: skip
    for absence, r in report["absence"].items():
        for order, v in r["orders"].items():
            lines.append(f"| {absence} | {order} | {v['deletion_auc']:.3f} | {v['insertion_auc']:.3f} |")
    return "\n".join(lines)


def for_registered(tag: str, out: Path, n: int, points: int, machine: str) -> dict:
    """Deletion and insertion AUCs of a registered model's explanations on `n` held-out test inputs, under the
    model's notion of absence and the older one."""
    from training.onnx_tools import cpu_session
    from training.tasks import for_task

    art = artifact.load(tag)
    m = art.manifest
    task = for_task(m.task)
    fields = {k: v for k, v in m.training_config.items() if k not in ("version", "runs_dir")}
    cfg = task.config(**{**fields, "progress": False})
    sample, score, absences = task.faithfulness_sample(cfg, art, cpu_session(art.onnx_path("fp32")), n)
    report = {"model": art.tag, "machine": machine, "sample": f"{n} test inputs, a fixed-seed draw",
              "curve_points": points, "random_orders": RANDOM_ORDERS,
              "command": f"python -m training faithfulness --model-tag {tag} --samples {n} --out {out}",
              "absence": {name: measure([make(x) for x in sample], score, cfg.seed, points)
                          for name, make in absences.items()}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{m.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{m.name}.md").write_text(markdown_table(report) + "\n")
    return report
