"""The small from-scratch baseline: a few conv + pooling layers and a softmax head at the native 28 px."""

from __future__ import annotations

from torch import nn

from training.image_model import BackboneHead


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # BatchNorm with PyTorch's default momentum (0.1): running statistics track a short run.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(BackboneHead):
    """conv32-pool-conv64-pool-conv128, global average pool, dropout, linear (softmax via the loss).

    About 0.1 M parameters: 28 -> 14 -> 7 px. Takes the same (N, 3, H, W) normalised input as the
    EfficientNet classifier, so the pipeline, export and serving treat both alike.
    """

    def __init__(self, num_classes: int, dropout: float, width: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_block(3, width), nn.MaxPool2d(2),
            conv_block(width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))
