"""train.compile: auto on CUDA only, a failing compiler falls back with one message, a real compiled run."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from dragontrainer import train
from dragontrainer.train.compile import CompiledForward, training_forward, wants_compile


def test_auto_compiles_on_cuda_only() -> None:
    assert wants_compile("auto", torch.device("cuda")) and not wants_compile("auto", torch.device("cpu"))
    assert wants_compile(True, torch.device("cpu")) and not wants_compile(False, torch.device("cuda"))
    model = nn.Linear(2, 2)
    assert training_forward(model, "auto", torch.device("cpu"), None) is model


def broken_compiler(model: nn.Module):  # type: ignore[no-untyped-def]
    def compiled(inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InductorError: no C++ compiler found\nlong traceback text")

    return compiled


def test_a_failing_compile_falls_back_once_with_one_message() -> None:
    out = io.StringIO()
    model = nn.Linear(3, 2)
    forward = CompiledForward(model, Console(file=out, width=300), compiler=broken_compiler)
    x = torch.randn(4, 3)
    assert torch.equal(forward(x), model(x))
    assert torch.equal(forward(x), model(x))  # stays on the plain module, no second message
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and "torch.compile failed (RuntimeError: InductorError: no C++ compiler" in lines[0]
    assert "training continues uncompiled" in lines[0]


def test_a_compiler_that_fails_at_once_also_falls_back() -> None:
    def refuses(model: nn.Module) -> None:
        raise ValueError("unsupported")

    out = io.StringIO()
    model = nn.Linear(3, 2)
    forward = CompiledForward(model, Console(file=out, width=300), compiler=refuses)
    assert forward(torch.ones(1, 3)).shape == (1, 2) and "unsupported" in out.getvalue()


def test_the_model_s_own_error_still_surfaces() -> None:
    model = nn.Linear(3, 2)
    forward = CompiledForward(model, None, compiler=broken_compiler)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        forward(torch.ones(1, 5))


def test_a_compiled_run_trains_and_saves_plain_parameter_names(tiny: list[str]) -> None:
    """Real torch.compile on CPU (about 20 s): the checkpoint has the module's names, not `_orig_mod.`."""
    from safetensors.torch import load_file

    result = train(overrides=[*tiny, "train.compile=true", "train.epochs=1", "monitor.report=false"])
    names = load_file(result.run_dir / "checkpoints" / "last" / "model.safetensors")
    assert not any(name.startswith("_orig_mod") for name in names)
    assert result.val_accuracy > 0.2


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("off", False), ("auto", "auto")])
def test_compile_takes_true_false_auto(value: str, expected: object) -> None:
    from dragontrainer import Recipe

    assert Recipe.load(overrides=[f"train.compile={value}"]).train.compile == expected


def test_a_wrong_compile_value_is_one_message() -> None:
    from dragontrainer import Recipe, RecipeError

    with pytest.raises(RecipeError, match=r"^recipe field train.compile: must be true, false or auto, got 'maybe'$"):
        Recipe.load(overrides=["train.compile=maybe"])
