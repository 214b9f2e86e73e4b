"""ResNet-18/34/50 laid out exactly as torchvision's (and timm's) ResNets: the same module names
(conv1, bn1, layer1.0.conv1, ..., downsample.0/1, fc) and shapes, so an ImageNet checkpoint a user
already has loads through `model.weights` by name. Plain torch, nothing is downloaded.

The stages keep the zoo's names for transfer rules: stem = conv1 + bn1, blocks.N = layer{N+1}, head = fc.
"""

from __future__ import annotations

import torch
from torch import nn

from dragontrainer.nn.activations import create_activation
from dragontrainer.nn.models import MODELS
from dragontrainer.nn.norms import create_norm
from dragontrainer.recipe import ModelSpec


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class TorchBasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3×3 convs, identity or conv1x1+norm `downsample` shortcut."""

    expansion = 1

    def __init__(self, spec: ModelSpec, c_in: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, width, stride)
        self.bn1 = create_norm(spec.norm, width, dims=2)
        self.relu = create_activation(spec, width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = create_norm(spec.norm, width, dims=2)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)

    def last_norm(self) -> nn.Module:
        return self.bn2


class TorchBottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3×3 conv), expansion 4."""

    expansion = 4

    def __init__(self, spec: ModelSpec, c_in: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv1x1(c_in, width)
        self.bn1 = create_norm(spec.norm, width, dims=2)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = create_norm(spec.norm, width, dims=2)
        self.conv3 = conv1x1(width, width * 4)
        self.bn3 = create_norm(spec.norm, width * 4, dims=2)
        self.relu = create_activation(spec, width * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)

    def last_norm(self) -> nn.Module:
        return self.bn3


class TorchResNet(nn.Module):
    """conv1 7×7/2 -> bn1 -> relu -> maxpool 3×3/2 -> layer1..4 -> global average pool -> fc."""

    def __init__(
        self, spec: ModelSpec, block: type[TorchBasicBlock | TorchBottleneck], layers: list[int],
        in_channels: int, num_classes: int,
    ) -> None:  # fmt: skip
        super().__init__()
        widths = list(spec.widths) if spec.widths is not None else [64, 128, 256, 512]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = create_norm(spec.norm, widths[0], dims=2)
        self.relu = create_activation(spec, widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = widths[0]
        for i, (width, count) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or c_in != width * block.expansion:
                downsample = nn.Sequential(
                    conv1x1(c_in, width * block.expansion, stride), create_norm(spec.norm, width * block.expansion, 2)
                )
            blocks = [block(spec, c_in, width, stride, downsample)]
            c_in = width * block.expansion
            blocks += [block(spec, c_in, width, 1, None) for _ in range(count - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(c_in, num_classes)
        self.memory_format = torch.channels_last

    @property
    def head(self) -> nn.Module:
        """The classifier, under the zoo's stage name (init gives it the linear gain)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def stage_prefixes(self) -> dict[str, list[str]]:
        """Stage name -> the module names it is made of, input to output."""
        return {
            "stem": ["conv1", "bn1"],
            **{f"blocks.{i}": [f"layer{i + 1}"] for i in range(4)},
            "head": ["fc"],
        }

    def stages(self) -> dict[str, nn.Module]:
        """Each stage's entry module (for hooks on the activation entering it)."""
        return {name: self.get_submodule(names[0]) for name, names in self.stage_prefixes().items()}

    def zero_init_residual(self) -> None:
        for module in self.modules():
            if isinstance(module, (TorchBasicBlock, TorchBottleneck)):
                norm = module.last_norm()
                if getattr(norm, "weight", None) is not None:
                    nn.init.zeros_(norm.weight)


def check_widths(spec: ModelSpec) -> None:
    if spec.widths is not None and len(spec.widths) != 4:
        from dragontrainer.errors import RecipeError

        raise RecipeError(f"model.widths: {spec.name} takes 4 widths (torchvision: 64,128,256,512), got {spec.widths}")


@MODELS.register("resnet18")
def resnet18(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> TorchResNet:
    """ResNet-18 in torchvision's layout (He et al. 2016; ImageNet checkpoints load by name), [2,2,2,2] basic blocks."""
    check_widths(spec)
    return TorchResNet(spec, TorchBasicBlock, [2, 2, 2, 2], in_channels, num_classes)


@MODELS.register("resnet34")
def resnet34(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> TorchResNet:
    """ResNet-34 in torchvision's layout, [3,4,6,3] basic blocks."""
    check_widths(spec)
    return TorchResNet(spec, TorchBasicBlock, [3, 4, 6, 3], in_channels, num_classes)


@MODELS.register("resnet50")
def resnet50(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> TorchResNet:
    """ResNet-50 (v1.5) in torchvision's layout, [3,4,6,3] bottleneck blocks."""
    check_widths(spec)
    return TorchResNet(spec, TorchBottleneck, [3, 4, 6, 3], in_channels, num_classes)
