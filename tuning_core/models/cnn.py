"""Image classifiers for FashionMNIST/MNIST, in plain torch (torchvision does not install here).

``MODELS`` maps a name to a constructor; ``build_model`` is the one entry point, so the
config, the trainable and checkpoint loading all build models the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tuning_core.errors import ConfigError


class SmallCNN(nn.Module):
    """Two conv blocks (``width`` then ``2*width`` channels, each halving the image) and an MLP head.

    Batch norm makes plain SGD converge within a few epochs over a wide learning-rate range,
    which is what a tuning run with small budgets needs.
    """

    def __init__(self, width: int = 32, dropout: float = 0.25, hidden: int = 128, num_classes: int = 10,
                 in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        h, w = image_size[0] // 4, image_size[1] // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * h * w, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block, with a 1x1 projection when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small grey images, as in the classic CIFAR/MNIST adaptation.

    The ImageNet stem (7x7 stride-2 conv + max pool) would shrink a 28x28 image to 7x7 before
    the first block; a 3x3 stride-1 stem without pooling keeps the resolution the blocks expect.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, base: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        layers: list[nn.Module] = []
        in_planes = base
        for i, blocks in enumerate((2, 2, 2, 2)):
            planes = base * 2**i
            for j in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def _cnn(width: int, dropout: float, hidden: int, num_classes: int, in_channels: int,
         image_size: tuple[int, int]) -> nn.Module:
    return SmallCNN(width=width, dropout=dropout, hidden=hidden, num_classes=num_classes,
                    in_channels=in_channels, image_size=image_size)


def _resnet18(width: int, dropout: float, hidden: int, num_classes: int, in_channels: int,
              image_size: tuple[int, int]) -> nn.Module:
    # The classic architecture: width/dropout/hidden are the small CNN's knobs and do not apply.
    return ResNet18(num_classes=num_classes, in_channels=in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": _cnn, "resnet18": _resnet18}


def build_model(name: str, width: int = 32, dropout: float = 0.25, hidden: int = 128, num_classes: int = 10,
                in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> nn.Module:
    """Build a model by name.

    Args:
        name: a key of ``MODELS`` ("cnn" or "resnet18").
        width: channels of the small CNN's first block (its second block has twice as many).
        dropout: dropout before each of the small CNN's dense layers.
        hidden: units of the small CNN's hidden dense layer.
        num_classes: output classes.
        in_channels: image channels (1 for FashionMNIST/MNIST).
        image_size: (height, width) of the input images; the small CNN's head depends on it.

    Raises:
        ConfigError: unknown name, or a non-positive size.
    """
    if name not in MODELS:
        raise ConfigError(f"model: one of {sorted(MODELS)}, got {name!r}")
    if min(width, hidden, num_classes, in_channels) < 1:
        raise ConfigError(f"model {name}: width, hidden, num_classes and in_channels must be >= 1, got "
                          f"width={width} hidden={hidden} num_classes={num_classes} in_channels={in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model {name}: dropout must be in [0, 1), got {dropout}")
    if name == "cnn" and min(image_size) < 4:
        raise ConfigError(f"model cnn: images must be at least 4x4, got {list(image_size)}")
    return MODELS[name](int(width), float(dropout), int(hidden), int(num_classes), int(in_channels),
                        (int(image_size[0]), int(image_size[1])))


def model_spec(config: dict[str, Any], num_classes: int = 10, in_channels: int = 1,
               image_size: tuple[int, int] = (28, 28)) -> dict[str, Any]:
    """The ``build_model`` arguments a trial config implies (stored in checkpoints to rebuild the model)."""
    return {
        "name": str(config.get("model", "cnn")),
        "width": int(config.get("width", 32)),
        "dropout": float(config.get("dropout", 0.25)),
        "hidden": int(config.get("hidden", 128)),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": [int(image_size[0]), int(image_size[1])],
    }


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Inverse of ``model_spec``."""
    args = dict(spec)
    args["image_size"] = tuple(args.get("image_size", (28, 28)))
    return build_model(**args)
