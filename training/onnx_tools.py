"""ONNX export with dynamic axes, parity against PyTorch, optimisation and int8 quantisation."""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

OPSET = 17


class ParityError(RuntimeError):
    """The exported ONNX model does not compute what the PyTorch model computes."""


def export(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """TorchScript-based export (opset 17), then `onnx.checker` on the written file."""
    model.eval()
    torch.onnx.export(
        model, example, str(path), opset_version=OPSET, dynamo=False,
        input_names=list(input_names), output_names=["logits"],
        dynamic_axes={**dynamic_axes, "logits": {0: "batch"}}, do_constant_folding=True,
    )  # fmt: skip
    onnx.checker.check_model(str(path), full_check=True)
    return path


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(
    model: torch.nn.Module, session: ort.InferenceSession, feeds: dict[str, np.ndarray], tolerance: float
) -> float:
    """Max |logit difference| between PyTorch and ONNX Runtime on the same real inputs (fails above tolerance)."""
    model.eval()
    with torch.no_grad():
        ref = model(*[torch.from_numpy(feeds[i.name]) for i in session.get_inputs()]).numpy()
    got = session.run(["logits"], feeds)[0]
    diff = float(np.abs(ref - got).max())
    # Float32 error grows with the logits' magnitude: the tolerance holds for logits up to 1 and scales above.
    allowed = tolerance * max(1.0, float(np.abs(ref).max()))
    if not np.isfinite(diff) or diff > allowed:
        raise ParityError(f"ONNX output differs from PyTorch by {diff:.3g} (allowed {allowed:.1g})")
    return diff


class _ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, batches: Iterator[np.ndarray]) -> None:
        self.name, self.batches = name, batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


def quantize_static_int8(fp32: Path, out: Path, input_name: str, calibration: Iterator[np.ndarray]) -> Path:
    """Static int8 (QDQ, per-channel weights) calibrated on real training inputs (CNNs)."""
    prepped = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
    # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's u8 x s8 kernels add pairs of
    # products in int16 and saturate; full-range weights then cost far more accuracy there than on a VNNI CPU
    # (measured: docs/results/training/int8-reduce-range.json). ONNX Runtime's quantisation guide advises it.
    quantize_static(
        str(prepped), str(out), _ArrayReader(input_name, calibration),
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    prepped.unlink()
    return out


def quantize_dynamic_int8(fp32: Path, out: Path) -> Path:
    """Dynamic int8 (weights int8, activations quantised on the fly): the transformer recipe."""
    # The fused graph has com.microsoft ops that ONNX shape inference cannot type: say they are float.
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=False,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
    return out


def optimize_bert(fp32: Path, out: Path, num_heads: int, hidden_size: int) -> Path:
    """ONNX Runtime's transformer optimiser: fused attention, LayerNorm, GELU, bias adds."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                         opt_level=1, use_gpu=False)  # fmt: skip
    opt.save_model_to_file(str(out))
    return out


def library_versions() -> dict[str, str]:
    import bentoml
    import PIL
    import tokenizers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "bentoml": bentoml.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "opset": str(OPSET),
    }
