"""The model zoo. Every network has named stages — `stem`, `blocks.N`, `head` — so transfer rules
(freeze, per-stage learning rates, new head) can address them by name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from dragontrainer.errors import RecipeError
from dragontrainer.nn.activations import create_activation
from dragontrainer.nn.init import init_model
from dragontrainer.nn.layers import head_linear
from dragontrainer.nn.norms import apply_weight_norm, create_norm
from dragontrainer.nn.user import import_factory, is_import_path
from dragontrainer.recipe import ModelSpec
from dragontrainer.registry import Registry


class Network(nn.Module):
    """stem -> blocks -> head; `stages()` names them for transfer learning and monitoring."""

    def __init__(
        self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, *, convolutional: bool = True
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        # channels-last activations: oneDNN (CPU) and cuDNN (tensor cores) run convs ~25% faster
        self.memory_format = torch.channels_last if convolutional else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)  # a no-op when the batch is already so
        return self.head(self.blocks(self.stem(x)))

    def stages(self) -> dict[str, nn.Module]:
        named = {"stem": self.stem}
        named.update({f"blocks.{i}": block for i, block in enumerate(self.blocks)})
        named["head"] = self.head
        return named

    def stage_prefixes(self) -> dict[str, list[str]]:
        """Stage name -> the module names it is made of (here each stage is one module of that name)."""
        return {name: [name] for name in self.stages()}


NORMS_WITHOUT_SHIFT = ("none", "weight")  # layers followed by these keep their bias

ModelFactory = Callable[[ModelSpec, int, int, int], Network]
MODELS: Registry[ModelFactory] = Registry("model")


def conv_block(spec: ModelSpec, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """conv -> norm -> activation; the conv has no bias when a norm follows (the norm's shift is one)."""
    block = nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=spec.norm in NORMS_WITHOUT_SHIFT),
        create_norm(spec.norm, c_out, dims=2),
        create_activation(spec, c_out),
    )
    if spec.spatial_dropout > 0:
        block.append(nn.Dropout2d(spec.spatial_dropout))
    return block


def classifier_head(spec: ModelSpec, features: int, num_classes: int) -> nn.Sequential:
    """Global average pool -> flatten -> dropout -> linear."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(spec.dropout),
        head_linear(features, num_classes, spec.dropconnect),
    )


def widths_of(spec: ModelSpec, default: list[int], exactly: int | None = None) -> list[int]:
    widths = list(spec.widths) if spec.widths is not None else default
    if exactly is not None and len(widths) != exactly:
        raise RecipeError(f"model.widths: {spec.name} takes {exactly} widths, got {len(widths)} ({widths})")
    return widths


# ------------------------------------------------------------------------------------ mlp


@MODELS.register("mlp")
def mlp(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> Network:
    """Fully connected: flatten -> [linear, norm, activation, dropout] per width -> linear."""
    widths = widths_of(spec, [256] * (spec.depth or 2))

    def layer(n_in: int, n_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(n_in, n_out, bias=spec.norm in NORMS_WITHOUT_SHIFT),
            create_norm(spec.norm, n_out, dims=1),
            create_activation(spec, n_out),
            nn.Dropout(spec.dropout),
        )

    stem = nn.Sequential(nn.Flatten(), layer(in_channels * image_size * image_size, widths[0]))
    blocks = [layer(a, b) for a, b in itertools.pairwise(widths)]
    return Network(stem, blocks, head_linear(widths[-1], num_classes, spec.dropconnect), convolutional=False)


# ---------------------------------------------------------------------------------- lenet


@MODELS.register("lenet")
def lenet(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> Network:
    """LeNet-5 style (LeCun et al. 1998): two 5×5 conv+pool stages, two dense layers, widths 6,16,120,84."""
    c1, c2, f1, f2 = widths_of(spec, [6, 16, 120, 84], exactly=4)
    size = image_size

    def conv_pool(c_in: int, c_out: int) -> nn.Sequential:
        nonlocal size
        block = conv_block(spec, c_in, c_out, kernel=5)
        if size >= 2:
            block.append(nn.MaxPool2d(2))
            size //= 2
        return block

    stem = conv_pool(in_channels, c1)
    second = conv_pool(c1, c2)
    dense1 = nn.Sequential(
        nn.Flatten(), nn.Linear(c2 * size * size, f1), create_activation(spec, f1), nn.Dropout(spec.dropout)
    )
    dense2 = nn.Sequential(nn.Linear(f1, f2), create_activation(spec, f2), nn.Dropout(spec.dropout))
    return Network(stem, [second, dense1, dense2], head_linear(f2, num_classes, spec.dropconnect))


# ------------------------------------------------------------------------------------ vgg


@MODELS.register("vgg")
def vgg(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> Network:
    """VGG style (Simonyan & Zisserman 2015): stages of `depth` 3×3 convs, 2×2 max-pool between."""
    widths = widths_of(spec, [64, 128, 256])
    depth = spec.depth or 2
    stem = conv_block(spec, in_channels, widths[0])
    blocks: list[nn.Module] = []
    size, c_in = image_size, widths[0]
    for i, width in enumerate(widths):
        stage = nn.Sequential()
        if i > 0 and size >= 2:
            stage.append(nn.MaxPool2d(2))
            size //= 2
        for _ in range(depth if i > 0 else depth - 1):
            stage.append(conv_block(spec, c_in, width))
            c_in = width
        blocks.append(stage)
    return Network(stem, blocks, classifier_head(spec, c_in, num_classes))


# --------------------------------------------------------------------------------- resnet


class BasicBlock(nn.Module):
    """Two 3×3 convs with an identity (or 1×1 projection) shortcut (He et al. 2016)."""

    def __init__(self, spec: ModelSpec, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv_block(spec, c_in, c_out, stride=stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=spec.norm in NORMS_WITHOUT_SHIFT),
            create_norm(spec.norm, c_out, dims=2),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=spec.norm in NORMS_WITHOUT_SHIFT),
                create_norm(spec.norm, c_out, dims=2),
            )
        self.activation = create_activation(spec, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.branch(x) + self.shortcut(x))

    def zero_init_last_norm(self) -> None:
        norm = self.branch[-1]
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)


@MODELS.register("resnet")
def resnet(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> Network:
    """Small residual net for 32×32-scale inputs: a 3×3 stem, stages of `depth` basic blocks."""
    widths = widths_of(spec, [32, 64, 128])
    depth = spec.depth or 2
    stem = conv_block(spec, in_channels, widths[0])
    blocks: list[nn.Module] = []
    size, c_in = image_size, widths[0]
    for i, width in enumerate(widths):
        stride = 2 if i > 0 and size >= 2 else 1
        size = math.ceil(size / stride)
        stage = [BasicBlock(spec, c_in, width, stride)]
        stage += [BasicBlock(spec, width, width, 1) for _ in range(depth - 1)]
        blocks.append(nn.Sequential(*stage))
        c_in = width
    return Network(stem, blocks, classifier_head(spec, c_in, num_classes))


# --------------------------------------------------------------------------------- factory


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding your own model to the zoo under `name` (for this process; a recipe's
    `model.name=package.module:factory` works in every process):

        @dragontrainer.register_model("tiny")
        def tiny(spec, in_channels, num_classes, image_size) -> nn.Module: ...
    """
    return MODELS.register(name)


def model_factory(name: str) -> ModelFactory:
    """The zoo's factory, or the user's `package.module:factory` imported by name."""
    if is_import_path(name):
        return import_factory(name)
    return MODELS.get(name)


def create_model(spec: ModelSpec, *, in_channels: int, num_classes: int, image_size: int) -> Network:
    """Build the zoo entry, then initialise it as the recipe says (the global torch RNG is used)."""
    model = model_factory(spec.name)(spec, in_channels, num_classes, image_size)
    if not isinstance(model, nn.Module):
        raise RecipeError(
            f"model.name={spec.name}: the factory returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    init_model(model, spec)  # before the memory-format change: some initialisers view weights as 2-D
    if spec.norm == "weight":
        apply_weight_norm(model)  # after init: g starts at ‖v‖, so the function is unchanged
    if spec.zero_init_residual:
        for module in model.modules():
            if isinstance(module, BasicBlock):
                module.zero_init_last_norm()
        if hasattr(model, "zero_init_residual"):  # torchvision-layout ResNets (nn/resnets.py)
            model.zero_init_residual()
    return model.to(memory_format=getattr(model, "memory_format", torch.contiguous_format))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from dragontrainer.nn import resnets  # noqa: E402, F401  (registers resnet18/34/50 in MODELS)
