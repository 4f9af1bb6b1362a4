"""What machine a figure was measured on: recorded beside every benchmark and experiment."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


INT8_INSTRUCTIONS = ("avx_vnni", "avx512_vnni", "amx_int8")  # int8 dot products in one instruction


def int8_instructions(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of the CPU's int8 dot-product instructions it has: without them (AVX2 alone) ONNX Runtime's int8
    kernels add pairs of products in int16, and an int8 model gains much less over fp32 (docs/benchmark.md)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for name in INT8_INSTRUCTIONS if name in flags]


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0))
    gpu = gpu_name()
    return f"{cpu_model()}, {cores} cores, {'GPU ' + gpu if gpu else 'no GPU'}, Python {platform.python_version()}"
