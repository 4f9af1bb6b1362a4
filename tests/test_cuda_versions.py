"""The CUDA and cuDNN versions the docs name are those of the locked `onnxruntime-gpu` wheel, read from the wheel
itself: its build info (`onnxruntime/capi/build_and_package_info.py`), its METADATA's `cuda` and `cudnn` extras
(`nvidia-cuda-runtime~=13.0`, `nvidia-cudnn-cu13~=9.0`) and the CUDA libraries its CUDA provider is linked
against. A lock refresh that moves ONNX Runtime to another CUDA major fails here until the docs and the GPU base
image follow."""

from __future__ import annotations

import mmap
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "onnxruntime-gpu"


def flat(path: str) -> str:
    return re.sub(r"\s+", " ", (ROOT / path).read_text())


def locked_version() -> str:
    return re.search(r"^onnxruntime-gpu==([\d.]+)", (ROOT / "requirements/serve.txt").read_text(), re.M)[1]


def extra_major(dist: metadata.Distribution, package: str) -> int:
    """The major version an extra of the wheel asks for (`nvidia-cudnn-cu13~=9.0; extra == "cudnn"`: 9)."""
    found = [re.match(rf"{package}\s*~=\s*(\d+)\.", r) for r in dist.requires or []]
    return int(next(m[1] for m in found if m))


@pytest.fixture(scope="module")
def wheel() -> dict:
    dist = metadata.distribution(WHEEL)
    assert dist.version == locked_version(), "the venv's onnxruntime-gpu is not the locked one: make setup"
    info = Path(dist.locate_file("onnxruntime/capi/build_and_package_info.py")).read_text()
    provider = Path(dist.locate_file("onnxruntime/capi/libonnxruntime_providers_cuda.so"))
    with provider.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        linked = {m.decode() for m in re.findall(rb"lib(?:cudart|cublas|cublasLt)\.so\.\d+(?=\x00)", data)}
    cuda = extra_major(dist, "nvidia-cuda-runtime")
    return {
        "minor": ".".join(dist.version.split(".")[:2]),
        "build_cuda": re.search(r"^cuda_version = '([\d.]+)'", info, re.M)[1],
        "cuda": cuda,
        "cudnn": extra_major(dist, f"nvidia-cudnn-cu{cuda}"),
        "linked": linked,
    }


def test_the_wheel_agrees_with_itself(wheel):
    """Its build info, its `cuda` extra and its CUDA provider's libraries name one CUDA major."""
    assert int(wheel["build_cuda"].split(".")[0]) == wheel["cuda"], wheel
    assert {f"lib{name}.so.{wheel['cuda']}" for name in ("cudart", "cublas", "cublasLt")} <= wheel["linked"], wheel


def test_docs_name_the_wheels_cuda_and_cudnn(wheel):
    cuda, cudnn, minor = wheel["cuda"], wheel["cudnn"], wheel["minor"]
    quoted = {
        "README.md": [f"when the CUDA {cuda} runtime and cuDNN {cudnn} are present"],
        "docs/deploy.md": [
            f"`onnxruntime-gpu` {minor} from PyPI is built for **CUDA {cuda} and cuDNN {cudnn}**",
            f"says `cuda_version = '{wheel['build_cuda']}'`",
            f"`nvidia-cuda-runtime~={wheel['build_cuda']}` and `nvidia-cudnn-cu{cuda}~={cudnn}.0`",
            f"`libcudart.so.{cuda}`, `libcublas.so.{cuda}`, `libcublasLt.so.{cuda}`",
            f"# GPU (CUDA {cuda} + cuDNN {cudnn} runtime)",
            f"an NVIDIA driver that supports CUDA {cuda}",
        ],
        "docs/troubleshooting.md": [
            f"`onnxruntime-gpu` {minor} needs the CUDA {cuda} runtime (`libcudart.so.{cuda}`, cuBLAS {cuda}) and "
            f"cuDNN {cudnn}, and a driver that supports CUDA {cuda}"
        ],
        "docs/serving.md": [f"machine without CUDA {cuda}/cuDNN {cudnn} falls back to CPU"],
    }
    missing = [f"{doc}: {q}" for doc, phrases in quoted.items() for q in phrases if q not in flat(doc)]
    assert not missing, missing


def test_the_gpu_base_image_is_of_the_wheels_cuda(wheel):
    """compose's GPU build and the release's GPU image start from NVIDIA's CUDA image of the wheel's major, with
    cuDNN (the tag's `-cudnn-`)."""
    for path in ("deploy/compose.gpu.yaml", "deploy/k8s_release.py"):
        tags = re.findall(r"nvidia/cuda:([\w.-]+)@sha256", (ROOT / path).read_text())
        assert tags and all(t.startswith(f"{wheel['cuda']}.") and "-cudnn-" in t for t in tags), (path, tags)
