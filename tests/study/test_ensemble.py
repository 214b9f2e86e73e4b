"""`dragon ensemble` end to end on the digits: three seeds of a small conv net, scored on their common
test split; the folder as a predictor; resuming; search top-k; mismatched members refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dragontrainer import evaluate_run, predict, train
from dragontrainer.cli import main
from tests.conftest import TINY, make_npz

SEEDS = ["model.name=lenet", "train.epochs=30", "data.test_fraction=0.2", "monitor.enabled=false",
         "monitor.report=false"]  # fmt: skip


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    for seed in range(3):
        train(overrides=[*SEEDS, f"seed={seed}", f"run.dir={root / 'runs' / f'seed{seed}'}"])
    return root / "runs"


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_three_seed_ensemble_nll_no_worse_than_best_member(
    seeds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_json(capsys, ["ensemble", str(seeds), "--out", str(tmp_path / "e"), "--json"])
    members = [r for r in summary["rows"] if r["role"] == "member"]
    ensemble = summary["rows"][-1]
    assert len(members) == 3 and summary["split"] == "test" and summary["images"] == 359
    assert ensemble["nll"] <= min(m["nll"] for m in members)
    assert ensemble["accuracy"] >= max(m["accuracy"] for m in members) - 0.01
    assert summary["gain"]["nll"] == pytest.approx(ensemble["nll"] - min(m["nll"] for m in members))
    assert (tmp_path / "e" / "index.html").read_text().count("<tr>") == 5


def test_an_ensemble_folder_evaluates_and_predicts_like_a_run(seeds: Path, tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    assert main(["ensemble", str(seeds), "--combine", "logit", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    record = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    metrics = evaluate_run(tmp_path / "e")
    assert metrics["data"] == "test" and metrics["accuracy"] == pytest.approx(record["rows"][-1]["accuracy"])
    assert metrics["loss"] == pytest.approx(record["rows"][-1]["nll"], rel=1e-5)
    digits = load_digits()
    files = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(path)
        files.append(path)
    predictions = predict(tmp_path / "e", files)
    assert [p.label for p in predictions] == [str(d) for d in digits.target[:5]]
    assert all(0 < p.probability <= 1 for p in predictions)


def test_a_killed_ensemble_continues_from_its_cached_logits(
    seeds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e"
    argv = ["ensemble", str(seeds), "--combine", "vote", "--out", str(out), "--json"]
    first = run_json(capsys, argv)
    kept = (out / "logits" / "000.safetensors").stat().st_mtime_ns
    (out / "ensemble.json").unlink()  # as if killed after member 0's logits were written
    (out / "logits" / "001.safetensors").unlink()
    again = run_json(capsys, argv)
    assert again == first and (out / "logits" / "000.safetensors").stat().st_mtime_ns == kept
    assert main(["ensemble", str(seeds), "--out", str(out)]) == 2  # a different plan: refused
    assert "holds a different ensemble" in capsys.readouterr().err


def test_search_top_k_takes_the_lowest_values(seeds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    search = tmp_path / "search"
    shutil.copytree(seeds, search / "trials")
    trials = [
        {"number": 0, "state": "COMPLETE", "value": 0.30, "run_dir": "trials/seed0", "params": {}},
        {"number": 1, "state": "COMPLETE", "value": 0.10, "run_dir": "trials/seed1", "params": {}},
        {"number": 2, "state": "PRUNED", "value": 0.01, "run_dir": "trials/seed2", "params": {}},
        {"number": 3, "state": "COMPLETE", "value": 0.20, "run_dir": "trials/seed2", "params": {}},
        {"number": 4, "state": "FAIL", "value": None, "run_dir": "trials/missing", "params": {}},
    ]
    (search / "trials.json").write_text(json.dumps(trials))
    summary = run_json(capsys, ["ensemble", "--search", str(search), "--top", "2", "--out", str(tmp_path / "e"),
                                "--json"])  # fmt: skip
    assert [r["run_dir"] for r in summary["rows"] if r["role"] == "member"] == [
        str(search / "trials/seed1"), str(search / "trials/seed2")
    ]  # fmt: skip


def test_mismatched_members_are_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quiet = [*TINY, "monitor.enabled=false", "monitor.report=false"]
    train(overrides=[*quiet, f"run.dir={tmp_path / 'digits'}"])
    npz = make_npz(tmp_path / "four.npz", n=80)
    train(overrides=[*quiet, "data.source=npz", f"data.path={npz}", f"run.dir={tmp_path / 'four'}"])
    train(overrides=[*quiet, "data.image_size=12", f"run.dir={tmp_path / 'big'}"])
    train(overrides=[*quiet, "data.split_seed=1", f"run.dir={tmp_path / 'fold'}"])
    for other, words in (("four", "disagree on classes"), ("big", "disagree on input shape"),
                         ("fold", "held out on different images")):  # fmt: skip
        assert (
            main(["ensemble", str(tmp_path / "digits"), str(tmp_path / other), "--out", str(tmp_path / other / "e")])
            == 2
        )
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
