"""Active learning by uncertainty sampling: ask for labels where the model is least sure.

The score is the top-1 softmax probability, the signal the serving feedback loop uses to queue
low-confidence predictions for labelling (`serving/feedback`): lowest first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def least_confident(probs: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` rows with the lowest top-1 probability (ties broken by position)."""
    return np.argsort(probs.max(1), kind="stable")[:k]


def select_labels(
    candidates: np.ndarray, budget: int, initial: int, rounds: int, rng: np.random.Generator,
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:  # fmt: skip
    """Choose `budget` of the `candidates` (indices into the labelled pool) for labelling.

    `initial` are drawn at random (a model needs some labels to be uncertain about); the rest come
    in `rounds` equal rounds, each from `predict(labelled, unlabelled)`: the probabilities of a model
    trained on `labelled` for the still-unlabelled candidates.
    """
    order = rng.permutation(candidates)
    labelled, unlabelled = order[:initial], order[initial:]
    remaining = budget - initial
    for r in range(rounds):
        k = remaining // (rounds - r)
        if k <= 0:
            continue
        pick = least_confident(predict(labelled, unlabelled), k)
        labelled = np.concatenate([labelled, unlabelled[pick]])
        unlabelled = np.delete(unlabelled, pick)
        remaining -= k
    return labelled
