"""model.weights: start from safetensors or a plain PyTorch state dict; pickled code is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import DataError, train
from dragontrainer.cli import main
from dragontrainer.nn.models import create_model
from dragontrainer.nn.pretrained import load_pretrained, read_weights
from dragontrainer.recipe import ModelSpec
from tests.conftest import TINY, PlantMarker


def test_a_trained_run_is_a_starting_point(tmp_path: Path) -> None:
    first = train(overrides=[*TINY, f"run.dir={tmp_path / 'a'}"])
    weights = first.run_dir / "checkpoints" / "best" / "model.safetensors"
    second = train(overrides=[*TINY, "train.epochs=1", f"model.weights={weights}", f"run.dir={tmp_path / 'b'}"])
    assert second.history[1]["accuracy"] >= first.best_val_accuracy - 0.05  # starts where the first ended
    initial = load_file(str(tmp_path / "b" / "init.safetensors"))
    assert torch.equal(initial["stem.1.0"], load_file(str(weights))["stem.1.0.weight"])


def test_torch_state_dict_loads_and_a_new_head_keeps_its_init(tmp_path: Path) -> None:
    spec = ModelSpec(name="mlp", widths=[16])
    source = create_model(spec, in_channels=1, num_classes=10, image_size=8)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = create_model(spec, in_channels=1, num_classes=4, image_size=8)  # another number of classes
    loaded = load_pretrained(target, path)
    assert "stem.1.0.weight" in loaded.loaded and {"head.weight", "head.bias"} <= set(loaded.skipped)
    assert torch.equal(target.stem[1][0].weight, source.stem[1][0].weight)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": PlantMarker(marker)}, path)
    with pytest.raises(DataError, match="refused"):
        read_weights(path)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(PlantMarker(marker)))
    with pytest.raises(DataError):
        read_weights(raw)
    assert not marker.exists()


def test_through_the_cli_a_payload_is_one_line_and_never_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    torch.save({"payload": PlantMarker(marker)}, tmp_path / "evil.pt")
    code = main(["train", *TINY, f"model.weights={tmp_path / 'evil.pt'}", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "Traceback" not in err and not marker.exists()
    assert not (tmp_path / "run").exists()  # a run that never started leaves nothing behind


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.safetensors", None, "not found"),
        ("bad.safetensors", b"not a safetensors file", "not a readable safetensors file"),
        ("bad.pt", b"\x00\x01 not a zip", "not a readable PyTorch weights file"),
        ("weights.h5", b"...", "must be .safetensors"),
    ],
)
def test_bad_weight_files_are_clear_errors(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_weights(path)


def test_weights_of_another_model_match_nothing(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    model = create_model(ModelSpec(name="mlp", widths=[8]), in_channels=1, num_classes=3, image_size=8)
    with pytest.raises(DataError, match="none of its 1 tensors matches"):
        load_pretrained(model, tmp_path / "other.pt")


def test_a_partial_match_is_reported_even_with_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dragontrainer.cli import main
    from tests.conftest import make_npz

    first = train(overrides=[*TINY, f"run.dir={tmp_path / 'a'}"])
    four_classes = make_npz(tmp_path / "four.npz", n=40, classes=4)
    argv = ["train", *TINY, f"data.path={four_classes}", f"model.weights={first.run_dir}", f"run.dir={tmp_path / 'b'}"]
    assert main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "weights from" in err and "shape-mismatched" in err  # the new head for 4 classes did not match
