"""The install path of `make setup` (docs/install.md): which torch build requirements/torch.sh picks,
what the Makefile passes on, and training output that stays readable in a log."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_SH = ROOT / "requirements" / "torch.sh"
PIP = str(Path(sys.executable).with_name("pip"))
VERSION = "2.13.0"


def torch_choice(env: dict[str, str], mode: str = "auto") -> str:
    done = subprocess.run([str(TORCH_SH), PIP, VERSION, mode], env=env, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return done.stdout.strip()


def no_gpu_env(tmp_path: Path) -> dict[str, str]:
    """PATH without nvidia-smi: this machine as a CPU-only one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "grep", "dirname"):
        (bin_dir / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    return {**os.environ, "PATH": str(bin_dir)}


def test_torch_cpu_build_from_pytorch_index_when_pip_sources_lack_it(tmp_path):
    env = no_gpu_env(tmp_path)
    env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")  # pip with no source at all
    assert torch_choice(env) == f"torch=={VERSION}+cpu --extra-index-url https://download.pytorch.org/whl/cpu"


def test_torch_cpu_build_without_gpu_never_the_cuda_wheel(tmp_path):
    spec = torch_choice(no_gpu_env(tmp_path))
    # pip's configured sources (find-links, a mirror) hold the CPU build, or PyTorch's CPU index is named
    assert spec in (
        f"torch=={VERSION}+cpu",
        f"torch=={VERSION}+cpu --extra-index-url https://download.pytorch.org/whl/cpu",
    )


def test_torch_cuda_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    env = no_gpu_env(tmp_path)
    smi = tmp_path / "bin" / "nvidia-smi"  # what the driver's tool prints on a GPU machine
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    # PyPI's Linux wheel, the CUDA build, from its hashed lock (requirements/torch-cuda.txt pins this version)
    assert torch_choice(env) == f"--require-hashes --no-deps -r {ROOT / 'requirements' / 'torch-cuda.txt'}"
    assert f"torch=={VERSION} " in (ROOT / "requirements" / "torch-cuda.txt").read_text()
    assert torch_choice(env, "cpu").startswith(f"torch=={VERSION}+cpu")  # what `make lock` resolves against


def make_n(*args: str) -> str:
    """What `make -n ARGS` would run, as a top-level make (the suite itself may run under `make test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    cmd = ["make", "--no-print-directory", "-n", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


def make_dry_run(*args: str) -> str:
    """The recipe `make` would run for the virtualenv, with pyproject.toml taken as changed."""
    return make_n("-W", "pyproject.toml", ".venv/.installed", *args)


def test_make_installs_the_lock_then_torch_for_the_machine():
    lines = make_dry_run().splitlines()
    pip = [line for line in lines if "bin/pip install" in line]
    assert pip[0].endswith("pip install -q --require-hashes --no-deps -r requirements/dev.txt")
    assert pip[1].endswith(f"pip install -q $(requirements/torch.sh .venv/bin/pip {VERSION})")
    assert "--require-hashes --no-deps -r requirements/assets.txt" in pip[-1]


def test_torch_spec_reaches_pip_unquoted_so_it_can_carry_an_index():
    spec = f"torch=={VERSION} --index-url https://download.pytorch.org/whl/cu130"
    assert f"pip install -q {spec}\n" in make_dry_run(f"TORCH_SPEC={spec}")


def test_apt_list_has_what_a_stock_machine_lacks_and_can_be_skipped():
    apt = make_n("apt")
    assert apt.startswith("requirements/apt.sh ")
    assert {"python3-venv", "curl", "nginx", "prometheus", "dataset-fashion-mnist"} <= set(apt.split())
    assert "apt.sh" not in make_n("apt", "SKIP_APT=1")
    script = (ROOT / "requirements" / "apt.sh").read_text()
    assert "--no-install-recommends" in script and "exit 101" in script and "systemctl disable --now" in script


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _one_stage(epochs: int = 2) -> None:
    import torch

    from servable.config import ImageTrainConfig
    from training.loop import EarlyStopping, run_stage

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    batches = lambda: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    run_stage(model, stage="head", params=list(model.parameters()), l1_params=[], epochs=epochs, lr=1e-2,
              cfg=ImageTrainConfig(progress=True), train_batches=batches, n_train_batches=4, val_batches=batches,
              val_targets=y, forward=lambda b: (model(b[0]), b[1]), device=torch.device("cpu"),
              stopper=EarlyStopping(patience=5, min_delta=0.0), history=[])  # fmt: skip


def test_training_progress_is_one_line_per_epoch_in_a_log(capsys):
    _one_stage()
    out, err = capsys.readouterr()  # not a terminal, as in CI or `make all > log`
    assert "\r" not in out + err, "a progress bar was drawn into a log"
    epochs = [line for line in out.splitlines() if line.startswith("[head ")]
    assert len(epochs) == 2 and "train loss" in epochs[0] and "val loss" in epochs[0]


def test_training_progress_bar_on_a_terminal(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _one_stage(epochs=1)
    assert "\r" in terminal.getvalue() and "head 1/1" in terminal.getvalue()
    assert "[head 1/1] train loss" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["torch.sh", "apt.sh", "lock.sh"])
def test_install_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "requirements" / script)], check=True)


def test_main_job_writes_under_runs_and_publishing_is_a_step_of_its_own():
    """`make all` must not rewrite committed results: its load test reports go to runs/loadtest/."""
    from loadtest import run

    assert run.parse([]).results == Path("runs/loadtest")
    main_job = make_n("-o", "setup", "-o", "train-image", "-o", "train-text", "all")
    assert "loadtest.run" in main_job and "docs/results" not in main_job
    publish = make_n("publish-loadtest")
    assert "runs/loadtest/local_" in publish and "docs/results/loadtest/" in publish
