"""train.precision: the auto rule, the probe's measurements and restoration, the record, fp16 refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dragontrainer import Recipe, resume, train
from dragontrainer.cli import main
from dragontrainer.train import precision as precision_module
from dragontrainer.train.precision import (
    MIN_GRAD_COSINE,
    MIN_SPEEDUP,
    Precision,
    ProbeResult,
    autocast_dtype,
    choose,
    probe,
)

GRADIENT = torch.tensor([1.0, -2.0, 0.5])


def side(seconds: float, loss: float = 1.0, gradient: torch.Tensor = GRADIENT) -> ProbeResult:
    return ProbeResult(seconds=seconds, loss=loss, gradient=gradient)


def test_faster_and_agreeing_picks_bf16_and_says_what_it_measured() -> None:
    chosen = choose(side(1.0, 2.000), side(0.5, 2.004))
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16
    assert chosen.measured["speedup"] == pytest.approx(2.0)
    assert "faster and agreeing" in chosen.reason and "2.00×" in chosen.reason


@pytest.mark.parametrize(
    ("bf16", "why"),
    [
        (side(0.5, 2.3), "disagreeing"),  # the loss is 15% off
        (side(0.5, float("nan")), "disagreeing"),
        (side(0.5, 2.0, torch.tensor([-1.0, 2.0, -0.5])), "disagreeing"),  # the gradient points the other way
        (side(1.0 / (MIN_SPEEDUP - 0.02), 2.0), "not faster"),
        (side(3.0, 2.0), "not faster"),
    ],
)
def test_disagreeing_or_not_faster_keeps_fp32_with_the_reason(bf16: ProbeResult, why: str) -> None:
    chosen = choose(side(1.0, 2.0), bf16)
    assert chosen.name == "fp32" and chosen.dtype is None
    assert why in chosen.reason


def test_disagreement_wins_over_speed() -> None:
    """A much faster bf16 whose gradient differs is still refused: speed never buys wrong numbers."""
    tilted = torch.tensor([1.0, -2.0, 0.5]) + torch.tensor([0.6, 0.3, 0.9])
    assert torch.nn.functional.cosine_similarity(tilted, GRADIENT, dim=0) < MIN_GRAD_COSINE
    assert choose(side(1.0, 2.0), side(0.1, 2.0, tilted)).name == "fp32"


def test_probe_measures_real_steps_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    inputs, targets = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    rng = torch.get_rng_state()
    fp32, bf16 = probe(model, nn.CrossEntropyLoss(), inputs, targets, torch.device("cpu"))
    assert fp32.seconds > 0 and bf16.seconds > 0
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.05)  # dropout off: the same network on both sides
    assert torch.nn.functional.cosine_similarity(fp32.gradient, bf16.gradient, dim=0) > 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_autocast_dtype_without_a_probe() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp32", cuda) is None


def test_old_amp_key_reads_as_precision() -> None:
    assert Recipe.load(overrides=["train.amp=on"]).train.precision == "bf16"
    assert Recipe.load(overrides=["train.amp=off"]).train.precision == "fp32"
    assert "amp" not in Recipe.load(overrides=["train.amp=auto"]).to_yaml()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def test_auto_that_keeps_fp32_trains_exactly_as_explicit_fp32(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe ran (on dropout and batch norm) and left no trace: same weights bit for bit."""
    overrides = [*tiny, "model.name=vgg", "model.widths=[8]", "model.dropout=0.3", "monitor.report=false"]
    explicit = train(overrides=[*overrides, "train.precision=fp32", f"run.dir={tmp_path / 'fp32'}"])
    measured: list[tuple[ProbeResult, ProbeResult]] = []

    def keep_fp32(fp32: ProbeResult, bf16: ProbeResult) -> Precision:
        measured.append((fp32, bf16))
        return Precision("fp32", "kept for the test", {"speedup": fp32.seconds / bf16.seconds})

    monkeypatch.setattr(precision_module, "MIN_PROBE_STEPS", 0)
    monkeypatch.setattr(precision_module, "choose", keep_fp32)
    auto = train(overrides=[*overrides, "train.precision=auto", f"run.dir={tmp_path / 'auto'}"])
    assert len(measured) == 1  # the probe really ran
    assert json.loads((auto.run_dir / "precision.json").read_text())["reason"] == "kept for the test"
    a, b = weights(explicit.run_dir), weights(auto.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reads_the_decision_back_and_never_probes_again(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "MIN_PROBE_STEPS", 0)
    monkeypatch.setattr(precision_module, "choose", lambda a, b: Precision("bf16", "chosen by the test"))
    first = train(overrides=[*tiny, "train.precision=auto", "monitor.report=false"])
    record = json.loads((first.run_dir / "precision.json").read_text())
    assert record["precision"] == "bf16" and record["reason"] == "chosen by the test"

    def no_probe(*args: object) -> None:
        raise AssertionError("a resumed run must not probe again")

    monkeypatch.setattr(precision_module, "probe", no_probe)
    resumed = resume(first.run_dir, ["train.epochs=4"])
    assert resumed.epochs == 4
    assert json.loads((first.run_dir / "precision.json").read_text())["precision"] == "bf16"


def test_a_short_run_keeps_fp32_without_probing(tiny: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "probe", lambda *a: pytest.fail("probed a 3-epoch run"))
    result = train(overrides=[*tiny, "train.precision=auto", "monitor.report=false"])
    record = json.loads((result.run_dir / "precision.json").read_text())
    assert record["precision"] == "fp32" and "too short" in record["reason"]


def test_bf16_run_trains_and_records(tiny: list[str]) -> None:
    result = train(overrides=[*tiny, "train.precision=bf16"])  # monitors and report on: bf16 activations
    assert json.loads((result.run_dir / "precision.json").read_text())["precision"] == "bf16"
    assert result.val_accuracy > 0.3


def test_fp16_on_cpu_is_one_line_and_leaves_nothing(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", *tiny, "train.precision=fp16", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "train.precision: fp16 needs a CUDA device" in err
    assert not (tmp_path / "run").exists()
