"""resnet18/34/50 in torchvision's layout: names and shapes against a fixture written from the published
architecture, and a torchvision-style checkpoint loading through model.weights with the key report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dragontrainer.nn.models import count_parameters, create_model
from dragontrainer.nn.pretrained import load_pretrained
from dragontrainer.optim.transfer import apply_transfer
from dragontrainer.recipe import ModelSpec, TransferSpec

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "torchvision_resnet_keys.json").read_text())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_names_and_shapes_match_torchvision(name: str) -> None:
    model = create_model(ModelSpec(name=name), in_channels=3, num_classes=1000, image_size=224)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == FIXTURE["state_dict"][name]
    assert count_parameters(model) == FIXTURE["parameters"][name]


def test_a_wrapped_rgb_checkpoint_loads_into_a_gray_model_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet = create_model(ModelSpec(name="resnet18"), in_channels=3, num_classes=1000, image_size=32)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, path)
    target = create_model(ModelSpec(name="resnet18"), in_channels=1, num_classes=5, image_size=32)
    report = load_pretrained(target, path)
    assert report.renamed == "module."
    assert report.adapted == ["conv1.weight (RGB summed to gray)"]
    assert sorted(m.split(":")[0] for m in report.mismatched) == ["fc.bias", "fc.weight"]
    assert not report.missing and not report.unexpected
    assert len(report.loaded) == len(FIXTURE["state_dict"]["resnet18"]) - 2
    assert torch.allclose(target.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(target.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert "matched 120" in report.report() and "shape-mismatched 2" in report.report()


def test_transfer_rules_address_torchvision_names_and_zoo_stages() -> None:
    model = create_model(ModelSpec(name="resnet18", widths=[4, 8, 8, 8]), in_channels=1, num_classes=3, image_size=16)
    apply_transfer(
        model, TransferSpec(rules=[{"match": "stem|layer1.*", "lr_mult": 0}, {"match": "blocks.2", "stop_grad": True}])
    )
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    assert model.layer2[0].conv1.weight.grad is None  # below the stop-gradient at layer3's input
    assert model.layer3[0].conv1.weight.grad is not None and model.fc.weight.grad is not None
