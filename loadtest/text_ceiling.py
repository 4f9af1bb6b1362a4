"""What one text costs the model alone: the ceiling of the text model's ratio to the FastAPI + ORT peer.

Times the artifact's ONNX variants on the benchmark's review sentences, tokenised beforehand, split
into length buckets as the served adapter splits a batch (`TextServeSettings.bucket_waste`), in the
session a served CPU worker builds (`serving.onnx_runtime.create_session`: one intra-op thread), at
several batch sizes: milliseconds of one core per text, best of `--repeats`. Beside them, the peer's
own session (fp32, ONNX Runtime's default options, one text at a time, as `loadtest/ort_peer.py` runs it).

If both servers spent nothing outside the model and kept every core busy, the served default's
throughput over the peer's would be the peer model's cost per text over the served one's: the
fp32 model at one thread (the least CPU a text can cost the peer) over int8 at its best batch size.
A measured ratio above that comes from what the peer loses elsewhere, not from the model.

    python -m loadtest.text_ceiling --out docs/results/benchmark/text-ceiling/text_ceiling.json
    python -m loadtest.text_ceiling --extra fused=/tmp/model.int8.onnx   # any other ONNX file of the model

An `--extra` file of another BERT-family model (e.g. the opt-in MPNet backbone's) is timed on the served
model's token ids: a text's cost depends on its length, not on which ids it holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from loadtest import cli
from loadtest.inputs import review_sentences
from servable import artifact
from servable.config import TextServeSettings
from servable.preprocessing import load_tokenizer, pad_encodings
from serving.adapters.text import length_buckets
from serving.onnx_runtime import create_session

BATCHES = (1, 2, 4, 8, 16, 32)


def batches(encodings, batch: int, waste: float, prep) -> list[dict[str, np.ndarray]]:
    """The model inputs a served worker would run for these texts in batches of `batch`: each batch split into
    length buckets, each bucket padded to its longest text."""
    out = []
    for i in range(0, len(encodings) - batch + 1, batch):
        chunk = encodings[i : i + batch]
        for bucket in length_buckets([len(e.ids) for e in chunk], waste):
            out.append(pad_encodings([chunk[j].ids for j in bucket], [chunk[j].type_ids for j in bucket], prep))
    return out


def ms_per_text(sess: ort.InferenceSession, inputs: list[dict[str, np.ndarray]], repeats: int) -> dict[str, float]:
    """Wall-clock and this process's CPU milliseconds per text, the repeat with the least wall time. Each
    session gets the inputs it declares (a model without token types, such as MPNet, takes two of three)."""
    names = {i.name for i in sess.get_inputs()}
    inputs = [{k: v for k, v in x.items() if k in names} for x in inputs]
    texts = sum(len(next(iter(x.values()))) for x in inputs)
    sess.run(None, inputs[0])  # first-run allocations out of the timing
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for x in inputs:
            sess.run(None, x)
        timed = ((time.perf_counter() - wall) * 1000 / texts, (time.process_time() - cpu) * 1000 / texts)
        best = timed if best is None or timed[0] < best[0] else best
    return {"wall_ms": round(best[0], 3), "cpu_ms": round(best[1], 3)}


def fused_attention_nodes(path: Path) -> int:
    """Attention kernels ONNX Runtime's transformer optimiser fused into the graph (0: attention left as matmuls)."""
    import onnx

    return sum(n.op_type in ("Attention", "QAttention", "MultiHeadAttention") for n in onnx.load(str(path)).graph.node)


def main(argv: list[str] | None = None) -> int:
    from servable.machine import describe_machine, int8_instructions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default=cli.default_tag("text"), help="the text model's store tag")
    ap.add_argument("--texts", type=int, default=512, help="review sentences timed (the benchmark's set)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH", help="another ONNX file to time")
    ap.add_argument("--out", type=Path, default=Path("docs/results/benchmark/text-ceiling/text_ceiling.json"))
    args = ap.parse_args(argv)
    art = artifact.load(args.tag)
    prep = art.manifest.text_preprocessing
    tok = load_tokenizer(art.file(prep.tokenizer_file), prep)
    encodings = tok.encode_batch(review_sentences(args.texts))
    settings = TextServeSettings(device="cpu")  # a served CPU worker's: one intra-op thread, its length buckets
    waste = settings.bucket_waste
    files = {name: art.onnx_path(name) for name in art.manifest.onnx}
    files.update(dict(e.split("=", 1) for e in args.extra))
    sizes = [b for b in BATCHES if b <= args.texts]  # a batch size needs that many texts
    variants, attention = {}, {}
    for name, path in files.items():
        sess, _ = create_session(Path(path), settings)
        variants[name] = {str(b): ms_per_text(sess, batches(encodings, b, waste, prep), args.repeats) for b in sizes}
        attention[name] = fused_attention_nodes(Path(path))
        print(name, "  ".join(f"batch {b}: {v['wall_ms']:.2f} ms" for b, v in variants[name].items()))
    peer_session = ort.InferenceSession(str(art.onnx_path("fp32")), providers=["CPUExecutionProvider"])  # as ort_peer
    peer = ms_per_text(peer_session, batches(encodings, 1, waste, prep), args.repeats)
    print(f"peer's session (fp32, default options, one text at a time): {peer['wall_ms']:.2f} ms wall, "
          f"{peer['cpu_ms']:.2f} ms CPU per text")  # fmt: skip
    served = min(v["wall_ms"] for v in variants["int8"].values()) if "int8" in variants else None
    ceiling = round(variants["fp32"]["1"]["wall_ms"] / served, 2) if served else None
    print(f"model-only ceiling of the served int8 over the peer's fp32: {ceiling}")
    command = "python -m loadtest.text_ceiling " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": describe_machine(), "int8_instructions": int8_instructions(),
              "tag": str(art.tag), "texts": args.texts,
              "mean_tokens": round(float(np.mean([len(e.ids) for e in encodings])), 1), "bucket_waste": waste,
              "one_thread": variants, "fused_attention_nodes": attention, "peer_session": peer,
              "model_only_ceiling": ceiling}  # fmt: skip
    return cli.write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
