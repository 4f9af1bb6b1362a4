"""Limited-data experiment: ImageNet-pretrained vs from-scratch EfficientNet-Lite0 at several sizes.

The evidence behind "transfer learning is the answer to limited data": same data, same epochs,
same test set; only the starting weights differ. Writes a Markdown table and a plot.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

from servable.config import LimitedDataConfig
from servable.machine import describe_machine
from training.image_pipeline import train_image


def run_experiment(cfg: LimitedDataConfig) -> dict:
    cfg.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, float]] = {"pretrained": {}, "scratch": {}}
    epochs = cfg.epochs_head + cfg.epochs_finetune
    for size in cfg.sizes:
        for kind in results:
            tqdm.write(f"== {kind}, {size} training images")
            # From scratch there is nothing to keep frozen: all epochs train the whole network.
            stages = ({"epochs_head": cfg.epochs_head, "epochs_finetune": cfg.epochs_finetune} if kind == "pretrained"
                      else {"epochs_head": 0, "epochs_finetune": epochs, "lr_finetune": cfg.lr_head})  # fmt: skip
            run_cfg = cfg.model_copy(update={
                "limit": size, "pretrained": kind == "pretrained", "quantize": False, "register_model": False,
                "version": f"limited-{kind}-{size}", "runs_dir": cfg.runs_dir / "limited_data", **stages,
            })  # fmt: skip
            run = train_image(run_cfg)
            results[kind][size] = run.metrics["test"]["fp32"]["accuracy"]
    write_report(cfg, results)
    return results


def write_report(cfg: LimitedDataConfig, results: dict[str, dict[int, float]]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, accs in results.items():
        ax.plot(list(accs), list(accs.values()), "o-", label=kind)
    ax.set(xscale="log", xlabel="training images", ylabel="test accuracy", ylim=(0, 1),
           title="Fashion-MNIST: pretrained vs from scratch")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.output / "limited_data.png", dpi=100)
    plt.close(fig)
    rows = "\n".join(
        f"| {s} | {results['pretrained'][s]:.4f} | {results['scratch'][s]:.4f} | "
        f"{results['pretrained'][s] - results['scratch'][s]:+.4f} |"
        for s in cfg.sizes
    )
    cmd = "python -m training " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else "make limited-data"
    (cfg.output / "limited_data.md").write_text(
        "# Limited data: pretrained vs from scratch\n\n"
        f"Command: `{cmd}`  \nMachine: {describe_machine()}; test set: first "
        f"{cfg.test_limit} Fashion-MNIST test images; "
        f"{cfg.epochs_head}+{cfg.epochs_finetune} epochs, {cfg.image_size} px, seed {cfg.seed}.\n\n"
        "| training images | pretrained | from scratch | gain |\n|---:|---:|---:|---:|\n"
        f"{rows}\n\n![accuracy vs training-set size](limited_data.png)\n"
    )
    (cfg.output / "limited_data.json").write_text(json.dumps(results, indent=2))
    tqdm.write(f"wrote {cfg.output / 'limited_data.md'}")
