"""Input drift: statistics of a model's inputs and answers, binned on fixed edges, and the population-stability
index (PSI) of live traffic against the reference distributions recorded at training.

The same functions run on both sides. Training computes the statistics of its training inputs, after the shared
pre-processing (servable/preprocessing.py), and stores their histograms in the artifact's manifest
(`ModelManifest.drift_reference`); a replica computes them for each request from the rows its decode already
made, keeps a rolling window and exports the PSI of each feature (serving/drift.py). The edges are fixed, not
quantiles of the data: a shifted input lands in bins of its own, however far off the reference it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from servable.preprocessing import ImagePreprocessing

# Inner bin edges of each numeric feature (a value v falls in bin i when edges[i-1] <= v < edges[i]; the two
# outer bins are open): len(edges) + 1 bins.
EDGES: dict[str, tuple[float, ...]] = {
    # image, on the model's input grid in 0..255 pixel units: mean and standard deviation of its pixels
    "brightness": tuple(range(16, 256, 16)),
    "contrast": tuple(range(8, 128, 8)),
    # image, as uploaded: width x height, and width / height
    "pixels": (32**2, 64**2, 128**2, 256**2, 512**2, 1024**2, 2048**2, 4096**2),
    "aspect": (0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0),
    # text: characters, and the share of its tokens the tokenizer could not place (its unknown token)
    "length": (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048),
    "oov": (0.001, 0.02, 0.05, 0.1, 0.2, 0.5),
}
PREDICTED_CLASS = "predicted_class"  # categorical: one bin per label
# Stands in for an empty bin's share on either side (log(0) is undefined); the usual choice.
EPSILON = 1e-4
# Training inputs the reference is computed on, at most (a random sample beyond): ample for these bin counts.
REFERENCE_MAX = 5000


class FeatureReference(BaseModel):
    """One feature's reference histogram."""

    edges: list[float] | None = Field(None, description="inner bin edges; None: categorical, one bin per label")
    counts: list[int] = Field(description="reference items per bin")


class DriftReference(BaseModel):
    """The training inputs' distributions a replica compares its live traffic with (docs/serving.md#drift)."""

    split: str = Field(description="the inputs they were computed on")
    n: int = Field(ge=1, description="items")
    features: dict[str, FeatureReference]


# ---------------------------------------------------------------- the statistics (training and serving)


def image_statistics(
    rows: np.ndarray | Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None, prep: ImagePreprocessing
) -> dict[str, np.ndarray]:
    """Per image: brightness and contrast of its normalised rows (3, H, W) (the model's input, undone to 0..255
    pixels per channel) and, where `sizes` (width, height as uploaded) are known, its pixel count and aspect."""
    x = np.asarray(rows, dtype=np.float32)
    x = x.reshape(len(x), x.shape[1], -1)
    std = np.asarray(prep.std, np.float64) * 255
    mean = np.asarray(prep.mean, np.float64) * 255
    # one pass for the sums and one for the squares (no temporary copies): a tenth of np.var's time
    channels, positions = x.shape[1:]
    m = x.sum(-1) / positions
    channel_mean = m * std + mean  # (N, 3), pixel units
    channel_var = (np.einsum("ncp,ncp->nc", x, x) / positions - m * m) * std**2
    brightness = channel_mean.sum(1) / channels
    # the variance of all pixels: each channel's own plus its mean's distance from the image's
    spread = (channel_var + (channel_mean - brightness[:, None]) ** 2).sum(1) / channels
    contrast = np.sqrt(np.maximum(spread, 0))
    out = {"brightness": brightness, "contrast": contrast}
    return out | size_statistics(sizes) if sizes is not None else out


def size_statistics(sizes: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per upload (width, height): its pixel count and aspect."""
    wh = np.asarray(sizes, np.float64).reshape(-1, 2)
    return {"pixels": wh[:, 0] * wh[:, 1], "aspect": wh[:, 0] / wh[:, 1]}


def text_statistics(texts: Sequence[str], ids: Sequence[Sequence[int]], unk_id: int | None) -> dict[str, np.ndarray]:
    """Per text: its length in characters and the share of its token ids that are the unknown token (0 for a
    tokenizer without one)."""
    length = np.fromiter((len(t) for t in texts), np.float64, len(texts))
    if unk_id is None:
        return {"length": length, "oov": np.zeros(len(texts))}
    oov = np.fromiter((list(row).count(unk_id) / max(len(row), 1) for row in ids), np.float64, len(texts))
    return {"length": length, "oov": oov}


def image_chunk_statistics(inputs: Sequence[tuple[Sequence[np.ndarray], Sequence[tuple[int, int]] | None]],
                           prep: ImagePreprocessing) -> dict[str, np.ndarray]:  # fmt: skip
    """`image_statistics` of many requests' (rows, upload sizes) in one pass; a request without sizes (a
    pre-processed tensor) adds brightness and contrast only."""
    out = image_statistics([r for rows, _ in inputs for r in rows], None, prep)
    sizes = [size for _, sizes in inputs if sizes is not None for size in sizes]
    return out | size_statistics(sizes) if sizes else out


def text_chunk_statistics(inputs: Sequence[tuple[Sequence[str], Sequence[Sequence[int]]]],
                          unk: int | None) -> dict[str, np.ndarray]:  # fmt: skip
    """`text_statistics` of many requests' (texts, token ids) in one pass."""
    return text_statistics([t for texts, _ in inputs for t in texts], [i for _, ids in inputs for i in ids], unk)


def class_statistics(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of a classifier's prediction: the index of its top class."""
    return {PREDICTED_CLASS: np.asarray(probabilities).argmax(1)}


def unk_id(tokenizer) -> int | None:
    """The id of a `tokenizers.Tokenizer`'s unknown token; None for a model without one (byte-level BPE)."""
    token = getattr(tokenizer.model, "unk_token", None)
    return None if token is None else tokenizer.token_to_id(token)


# ---------------------------------------------------------------- histograms and PSI


def bin_index(edges: Sequence[float] | np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """Each value's bin on a feature's inner `edges` (int64); with None (categorical), the values are the bins."""
    if edges is None:
        return np.asarray(values, np.int64)
    return np.searchsorted(edges, values, side="right")


def reference_sample(n: int, seed: int) -> np.ndarray:
    """Which of n training inputs the reference is computed on: all, or REFERENCE_MAX drawn at random, in order."""
    return np.arange(n) if n <= REFERENCE_MAX else np.sort(np.random.default_rng(seed).choice(n, REFERENCE_MAX, False))


def reference(stats: dict[str, np.ndarray], labels: Sequence[str] | None, split: str) -> DriftReference:
    """The reference of these statistics: each feature's counts on its fixed edges (EDGES), the predicted class
    on one bin per label."""
    features = {}
    for name, values in stats.items():
        edges = None if name == PREDICTED_CLASS else [float(e) for e in EDGES[name]]
        size = len(labels or ()) if edges is None else len(edges) + 1
        idx = bin_index(edges, values)
        features[name] = FeatureReference(edges=edges, counts=np.bincount(idx, minlength=size).tolist())
    n = max((sum(f.counts) for f in features.values()), default=0)
    return DriftReference(split=split, n=n, features=features)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population-stability index of `actual` counts against `expected` counts on the same bins:
    sum over bins of (a - e) * ln(a / e), with each share at least EPSILON."""
    e = np.maximum(expected / max(expected.sum(), 1), EPSILON)
    a = np.maximum(actual / max(actual.sum(), 1), EPSILON)
    return float(((a - e) * np.log(a / e)).sum())
