"""The CLI in-process (fast) and, for signals and the installed entry point, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dragontrainer.cli import main
from dragontrainer.recipe import Recipe
from tests.conftest import TINY, make_image_folder, make_npz


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_print_recipe_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "train", "optim.name=adam", "model.widths=[8,16]", "--print-recipe")
    assert code == 0
    path = tmp_path / "r.yaml"
    path.write_text(out)
    assert Recipe.load(path) == Recipe.load(overrides=["optim.name=adam", "model.widths=[8,16]"])
    code, again, _ = run_cli(capsys, "train", str(path), "--print-recipe")
    assert again == out and isinstance(yaml.safe_load(out), dict)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["optim.lrr=1"], "unknown key optim.lrr, did you mean optim.lr?"),
        (["optim.lr=-1"], "optim.lr: input should be greater than 0"),
        (["model.dropout=1.5"], "model.dropout: input should be less than 1"),
        (["missing.yaml"], "missing.yaml: recipe file not found"),
        (["data.source=npz", "data.path=/nonexistent.npz"], "/nonexistent.npz: no such file or folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    code, _out, err = run_cli(capsys, "train", *argv, "--quiet")
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_recipe_that_is_not_a_mapping(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("[1, 2]\n")
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2 and "expected a mapping of sections" in err


def test_corrupt_image_and_nan_data_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    (root / "class_0" / "bad.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "train", "data.source=image-folder", f"data.path={root}", "--quiet")
    assert code == 2 and "bad.png: not a readable image" in err
    np.savez(tmp_path / "nan.npz", x=np.full((4, 3, 3), np.nan), y=np.array([0, 1, 0, 1]))
    code, _, err = run_cli(capsys, "train", "data.source=npz", f"data.path={tmp_path / 'nan.npz'}", "--quiet")
    assert code == 2 and "NaN/Inf" in err


def test_train_json_eval_predict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", *TINY, f"run.dir={run_dir}", "--json", "--quiet")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("run_dir", "epochs", "best_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "seconds", "images_per_second"):  # fmt: skip
        assert key in result, key
    assert result["run_dir"] == str(run_dir) and result["epochs"] == 3

    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--json")
    metrics = json.loads(out)
    num_val = json.loads((run_dir / "data.json").read_text())["num_val"]
    assert code == 0 and metrics["data"] == "val" and metrics["images"] == num_val and metrics["accuracy"] > 0.5

    digits = Recipe().data  # the embedded digits, re-saved as an npz file for --data
    from dragontrainer.data.sources import load_images

    images = load_images(digits)
    np.savez(tmp_path / "d.npz", x=images.x[:100, 0], y=images.y[:100])
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--data", str(tmp_path / "d.npz"), "--json")
    assert code == 0 and json.loads(out)["images"] == 100

    files = []
    for i in range(3):
        Image.fromarray(images.x[i, 0], mode="L").save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    code, out, _ = run_cli(capsys, "predict", str(run_dir), *files, "--json")
    predictions = json.loads(out)
    assert code == 0 and [p["file"] for p in predictions] == files
    assert all(0 < p["probability"] <= 1 and p["class"] in [str(d) for d in range(10)] for p in predictions)
    assert sum(p["class"] == str(images.y[i]) for i, p in enumerate(predictions)) >= 2

    code, _, err = run_cli(capsys, "predict", str(run_dir), str(tmp_path / "none.png"))
    assert code == 2 and "none.png: no such image file" in err


def test_components_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "components", "--json")
    components = json.loads(out)
    assert code == 0 and {"digits", "npz", "image-folder", "cifar", "mnist-idx"} <= components["data source"].keys()
    assert {"mlp", "lenet", "vgg", "resnet"} <= components["model"].keys()


def test_train_on_npz_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = make_npz(tmp_path / "a.npz", n=80)
    code, out, _ = run_cli(capsys, "train", *TINY, "data.source=npz", f"data.path={path}",
                           f"run.dir={tmp_path / 'r'}", "--json", "--quiet")  # fmt: skip
    assert code == 0 and json.loads(out.splitlines()[-1])["val_accuracy"] >= 0.75


def dragon(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dragontrainer.cli", *argv]


def test_ctrl_c_leaves_a_resumable_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["model.name=vgg", "model.widths=[16,32]", "train.epochs=40", "train.batch_size=32",
            "train.early_stopping.patience=null", f"run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        dragon("train", *argv, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"dragon resume {run_dir}" in err and "Traceback" not in err
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(line["split"] in ("train", "val") for line in lines)
    assert (run_dir / "checkpoints" / "last" / "state.json").is_file()
    done = subprocess.run(dragon("resume", str(run_dir), "--json", "--quiet", "train.epochs=40")[:-1],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 40
    epochs = [(r["epoch"], r["split"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [(e, s) for e in range(1, 41) for s in ("train", "val")]


def test_bad_data_leaves_no_run_folder_behind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = run_cli(capsys, "train", "data.source=npz", f"data.path={tmp_path / 'x.npz'}", "--quiet")
    assert code == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_eval_reproduces_the_validation_loss_with_class_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", *TINY, "train.class_weights=balanced", "train.early_stopping.patience=null",
                           f"run.dir={run_dir}", "--json", "--quiet")  # fmt: skip
    assert code == 0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_epoch = json.loads(out.splitlines()[-1])["best_epoch"]
    best_val = next(r for r in history if r["split"] == "val" and r["epoch"] == best_epoch)
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(best_val["loss"], rel=1e-5)


def test_resume_of_a_finished_run_says_so_and_more_epochs_extend_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "train.early_stopping.patience=null", f"run.dir={run_dir}", "--quiet"]) == 0
    result = (run_dir / "result.json").read_bytes()
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 0
    assert "finished (3 of 3 epochs)" in capsys.readouterr().err and (run_dir / "result.json").read_bytes() == result
    assert main(["resume", str(run_dir), "model.widths=[8]"]) == 2
    assert "only train.epochs and train.early_stopping" in capsys.readouterr().err
    code = main(["resume", str(run_dir), "train.epochs=5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out.splitlines()[-1])["epochs"] == 5
    assert "extending the run from 3 to 5 epochs" in err
    epochs = [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert Recipe.load(run_dir / "recipe.yaml").train.epochs == 5


def test_overrides_after_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-recipe", "train.epochs=6"]) == 0
    assert "epochs: 6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["eval", "somewhere", "a=1"])
    assert exited.value.code == 2 and capsys.readouterr().err == "dragon: error: unrecognized arguments: a=1\n"


def test_predict_takes_folders_and_globs_and_prints_a_table_or_csv(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    images = make_image_folder(tmp_path / "imgs", classes=3, per_class=4, size=8)
    (images / "class_0" / "README.txt").write_text("not an image")
    run_dir = tmp_path / "run"
    assert main(["train", f"data.path={images}", *TINY, f"run.dir={run_dir}", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(images), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 and all(r["file"].endswith(".png") for r in rows)  # recursive, images only
    assert main(["predict", str(run_dir), str(images / "class_1" / "*.png"), "--csv", "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "file,class,probability,top1,top2" and len(lines) == 5
    assert main(["predict", str(run_dir), str(images / "class_2" / "0.png"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2" in out and "0.png" in out
    assert main(["predict", str(run_dir), str(tmp_path / "nothing*.png")]) == 2
    assert "matches no file" in capsys.readouterr().err
