"""A user's own model: by import path in the recipe (through train, eval, predict and export in the
CLI) or registered from Python; clear one-line errors when the import path is wrong."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dragontrainer
from dragontrainer import Recipe, RecipeError, load_export, train
from dragontrainer.cli import main

MODULE = '''
import torch
from torch import nn

NOT_CALLABLE = 3


def small_cnn(spec, in_channels, num_classes, image_size):
    """conv -> relu -> global pool -> linear; spec.widths[0] channels."""
    width = (spec.widths or [8])[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def not_a_module(spec, in_channels, num_classes, image_size):
    return [1, 2]
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_models_{uuid.uuid4().hex[:8]}"  # a fresh module per test: no stale import
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_model_by_import_path_through_train_eval_predict_export(
    user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", f"model.name={user_module}:small_cnn", "model.widths=[6]", "train.epochs=2",
            "train.batch_size=64", "monitor.report=false", f"run.dir={run}", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert Recipe.load(run / "recipe.yaml").model.name == f"{user_module}:small_cnn"
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    image = tmp_path / "x.png"
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    assert main(["predict", str(run), str(image), "--json", "--top", "10"]) == 0
    top = dict(json.loads(capsys.readouterr().out)[0]["top"])
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    model, metadata = load_export(run / "model.torchscript.pt")
    with torch.no_grad():
        probabilities = model(torch.from_numpy(pixels)[None, :, :, None])[0]
    classes = json.loads(metadata["classes"])
    assert metadata["model"] == f"{user_module}:small_cnn"
    np.testing.assert_allclose([top[c] for c in classes], probabilities.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable factory"),
        (":small_cnn", "expected package.module:factory"),
    ],
)
def test_bad_import_paths_are_one_clear_line(
    user_module: str, factory: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", f"model.name={factory.format(module=user_module)}", "--print-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dragon: error: recipe field model.name: ") and message in err
    assert err.count("\n") == 1


def test_a_factory_that_returns_no_module_is_refused(user_module: str, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"returned a list, expected a torch.nn.Module"):
        train(overrides=[f"model.name={user_module}:not_a_module", "train.epochs=1", f"run.dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()


def test_register_model_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dragontrainer.nn.models import MODELS

    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))  # the registration ends with the test
    name = f"mine_{uuid.uuid4().hex[:8]}"

    @dragontrainer.register_model(name)
    def mine(spec, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        """A linear classifier on the pixels."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    result = train(overrides=[f"model.name={name}", "train.epochs=2", "monitor.report=false", f"run.dir={tmp_path}"])
    assert result.val_accuracy > 0.5  # a linear model learns the digits
    assert name in dragontrainer.registry.all_components()["model"]
