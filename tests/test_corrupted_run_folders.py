"""Corrupted run folders: every file resume/eval/predict/report read gets one line naming it, exit 2."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dragontrainer.cli import main
from tests.conftest import TINY, make_image_folder

Corrupt = Callable[[Path], None]


def write(name: str, data: bytes) -> Corrupt:
    return lambda run: (run / name).write_bytes(data)


def truncate(name: str) -> Corrupt:
    return lambda run: (run / name).write_bytes((run / name).read_bytes()[:40])


CORRUPTIONS: dict[str, tuple[Corrupt, str]] = {
    "state.json not JSON": (write("checkpoints/last/state.json", b"{not json"), "state.json: not readable JSON"),
    "state.json a list": (write("checkpoints/last/state.json", b"[1, 2]"), "state.json: expected a JSON object"),
    "state.json missing keys": (write("checkpoints/last/state.json", b"{}"), "state.json: train: Field required"),
    "state.json wrong types": (write("checkpoints/last/state.json", b'{"train": {"epoch": "three"}}'), "state.json: train.epoch"),
    "data.json not JSON": (write("data.json", b"\xff\xfe"), "data.json: not readable JSON"),
    "data.json not a mapping": (write("data.json", b'"text"'), "data.json: expected a JSON object"),
    "data.json without classes": (write("data.json", b'{"image_shape": [3, 8, 8]}'), "data.json: classes"),
    "data.json bad shape": (write("data.json", b'{"classes": ["a"], "image_shape": [3, "x", 8]}'), "data.json: image_shape"),
    "preprocess truncated": (truncate("preprocess.safetensors"), "preprocess.safetensors: not a readable safetensors"),
    "preprocess garbage": (write("preprocess.safetensors", b"\x00" * 64), "preprocess.safetensors: not a readable"),
    "best weights truncated": (truncate("checkpoints/best/model.safetensors"), "model.safetensors: not a readable"),
    "last weights garbage": (write("checkpoints/last/model.safetensors", b"garbage!"), "model.safetensors: not a readable"),
    "optimizer garbage": (write("checkpoints/last/optimizer.safetensors", b"zz"), "optimizer.safetensors: not a readable"),
    "init garbage": (write("init.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), "init.safetensors: not a readable"),
}  # fmt: skip

# which command reads which file (report reads the rest in its own code)
READERS = {
    "state.json": ["resume"],
    "data.json": ["eval", "predict"],
    "preprocess": ["eval", "predict"],
    "best weights": ["eval", "predict"],
    "last weights": ["resume"],
    "optimizer": ["resume"],
    "init": ["resume"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    images = make_image_folder(root / "images", classes=3, per_class=6, size=8)
    assert main(["train", f"data.path={images}", *TINY, "train.epochs=2", f"run.dir={root / 'run'}", "--quiet"]) == 0
    return root / "run", next((images / "class_0").iterdir())


CASES = [(name, command) for name in CORRUPTIONS for prefix, commands in READERS.items() if name.startswith(prefix)
         for command in commands]  # fmt: skip


@pytest.mark.parametrize(("name", "command"), CASES)
def test_a_corrupted_file_is_one_line_naming_it(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    source, image = trained
    run = tmp_path / "copy"
    shutil.copytree(source, run)
    corrupt, fragment = CORRUPTIONS[name]
    corrupt(run)
    if command == "resume":
        (run / "result.json").unlink()  # an interrupted run: resume must read its checkpoint
    argv = {
        "resume": ["resume", str(run), "--quiet"],
        "eval": ["eval", str(run)],
        "predict": ["predict", str(run), str(image)],
    }
    code = main(argv[command])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and err.count("\n") == 1 and "internal error" not in err
