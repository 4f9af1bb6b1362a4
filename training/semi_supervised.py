"""Semi-supervised learning by pseudo-labelling (self-training) on unlabelled images.

Round 1 trains on the labelled images alone (the supervised baseline). Its confident predictions
on the unlabelled images become labels; round 2 continues training from the round-1 weights on
labelled + pseudo-labelled images (with the same augmentation, which keeps the student from simply
copying its teacher). The confidence cut is FixMatch's 0.95 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from servable.config import ImageTrainConfig
from servable.preprocessing import ImagePreprocessing
from training.data_images import ImageSplits
from training.image_model import BackboneHead
from training.image_pipeline import fine_tune, predict_proba


@dataclass
class PseudoLabels:
    index: np.ndarray  # positions in the unlabelled array
    labels: np.ndarray  # the teacher's predicted class for each

    def accuracy(self, true_labels: np.ndarray) -> float:
        """How many pseudo-labels are right (known in a study on a labelled data set, never used to train)."""
        return float((true_labels[self.index] == self.labels).mean()) if len(self.index) else float("nan")


def pseudo_label(
    model: BackboneHead, unlabelled_x: np.ndarray, prep: ImagePreprocessing, threshold: float
) -> PseudoLabels:
    """The teacher's predictions whose top-1 probability reaches `threshold`."""
    probs = predict_proba(model, unlabelled_x, prep)
    keep = np.flatnonzero(probs.max(1) >= threshold)
    return PseudoLabels(keep, probs[keep].argmax(1).astype(np.int64))


def self_train(
    cfg: ImageTrainConfig, splits: ImageSplits, prep: ImagePreprocessing, teacher: BackboneHead,
    unlabelled_x: np.ndarray, threshold: float,
):  # fmt: skip
    """Round 2 of self-training: returns (student, history, pseudo-labels used)."""
    pseudo = pseudo_label(teacher, unlabelled_x, prep, threshold)
    union = replace(
        splits,
        train_x=np.concatenate([splits.train_x, unlabelled_x[pseudo.index]]),
        train_y=np.concatenate([splits.train_y, pseudo.labels]),
    )
    student, history, _, _ = fine_tune(cfg, union, prep, init_state=teacher.state_dict())
    return student, history, pseudo
