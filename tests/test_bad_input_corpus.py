"""Bad inputs across every data format and the recipe: each one line naming the file or field, exit 2.

Every case builds its own bad file in a temporary folder and runs the real CLI (`dragon train`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragontrainer.cli import main
from tests.conftest import PlantMarker, idx_bytes, make_cifar10_binary, make_cifar10_python, make_idx, make_image_folder

Case = Callable[[Path], list[str]]


def npz_with(**arrays: object) -> Case:
    def build(tmp: Path) -> list[str]:
        np.savez(tmp / "bad.npz", **arrays)
        return ["data.source=npz", f"data.path={tmp / 'bad.npz'}"]

    return build


def folder_with(change: Callable[[Path], None], *extra: str) -> Case:
    def build(tmp: Path) -> list[str]:
        root = make_image_folder(tmp / "imgs")
        change(root)
        return ["data.source=image-folder", f"data.path={root}", *extra]

    return build


def idx_with(change: Callable[[Path], None]) -> Case:
    def build(tmp: Path) -> list[str]:
        root = make_idx(tmp / "idx", gz=False)
        change(root)
        return ["data.source=mnist-idx", f"data.path={root}"]

    return build


def cifar_with(change: Callable[[Path], None], python: bool = False) -> Case:
    def build(tmp: Path) -> list[str]:
        root = (make_cifar10_python if python else make_cifar10_binary)(tmp / "cifar")
        change(root)
        return ["data.source=cifar", f"data.path={root}"]

    return build


def recipe_file(text: str) -> Case:
    def build(tmp: Path) -> list[str]:
        (tmp / "recipe.yaml").write_text(text)
        return [str(tmp / "recipe.yaml")]

    return build


def overrides(*items: str) -> Case:
    return lambda tmp: list(items)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def save_odd_size(root: Path) -> None:
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(root / "class_0" / "odd.png")


def save_truncated_jpeg(root: Path) -> None:
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "class_0" / "t.jpg", format="JPEG")
    truncate(root / "class_0" / "t.jpg")


def flat_folder(tmp: Path) -> list[str]:
    (tmp / "flat").mkdir()
    return ["data.source=image-folder", f"data.path={tmp / 'flat'}"]


def corrupt_gzip(tmp: Path) -> list[str]:
    root = make_idx(tmp / "g")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    return ["data.source=mnist-idx", f"data.path={root}"]


def empty_cifar_folder(tmp: Path) -> list[str]:
    (tmp / "c").mkdir()
    return ["data.source=cifar", f"data.path={tmp / 'c'}"]


def not_an_npz(tmp: Path) -> list[str]:
    (tmp / "x.npz").write_bytes(b"hello")
    return ["data.source=npz", f"data.path={tmp / 'x.npz'}"]


CORPUS: dict[str, tuple[Case, str]] = {
    # image folders
    "truncated png": (folder_with(lambda r: truncate(r / "class_0" / "0.png")), "0.png: "),
    "zero-byte png": (folder_with(lambda r: (r / "class_1" / "1.png").write_bytes(b"")), "1.png: not a readable image"),
    "truncated jpeg": (folder_with(save_truncated_jpeg), "t.jpg: "),
    "text file named as an image in a class folder": (folder_with(lambda r: (r / "class_2" / "notes.png").write_text("hi")), "notes.png: not a readable image"),
    "empty class folder": (folder_with(lambda r: (r / "empty").mkdir()), "empty: class folder is empty"),
    "mixed sizes without a resize": (folder_with(save_odd_size), "set data.image_size=S"),
    "image above the pixel limit": (folder_with(lambda r: None, "data.max_image_pixels=10"), "above data.max_image_pixels"),
    "folder with no class folders": (flat_folder, "no class sub-folders"),
    # IDX
    "idx wrong magic": (idx_with(lambda r: (r / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x02" + b"\0" * 8)), "wrong magic number"),
    "idx mismatched counts": (idx_with(lambda r: (r / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))), "30 images but"),
    "idx truncated body": (idx_with(lambda r: truncate(r / "train-images-idx3-ubyte")), "its header [30, 28, 28] implies"),
    "idx missing label file": (idx_with(lambda r: (r / "train-labels-idx1-ubyte").unlink()), "matching label file"),
    "idx corrupt gzip": (corrupt_gzip, "not a readable gzip file"),
    # CIFAR
    "cifar batch of the wrong length": (cifar_with(lambda r: (r / "data_batch_2.bin").write_bytes(b"\0" * 5000)), "not a whole number of 3073-byte"),
    "cifar without training batches": (cifar_with(lambda r: [p.unlink() for p in r.glob("data_batch_*")]), "no CIFAR training batches"),
    "cifar python batch holding code": (cifar_with(lambda r: (r / "data_batch_1").write_bytes(pickle.dumps({b"data": PlantMarker(r / "pwned")})), python=True), "refusing to load pathlib"),
    "cifar python batch not a pickle": (cifar_with(lambda r: (r / "data_batch_3").write_bytes(b"garbage"), python=True), "data_batch_3: "),
    "cifar folder without batches": (empty_cifar_folder, "no CIFAR files found"),
    # npz
    "npz without x": (npz_with(y=np.array([0, 1])), "missing array 'x'"),
    "npz without y": (npz_with(x=np.zeros((2, 4, 4), np.uint8)), "missing array 'y'"),
    "npz holding object arrays": (npz_with(x=np.array([PlantMarker(Path("/tmp/never"))], dtype=object), y=np.array([0])), "object arrays"),
    "negative labels": (npz_with(x=np.zeros((4, 4, 4), np.uint8), y=np.array([0, 1, -1, 0])), "label -1 is negative"),
    "labels >= C": (npz_with(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 5]), classes=np.array(["a", "b"])), "label 5 is outside 0..1"),
    "non-integer labels": (npz_with(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0.0, 1.5])), "whole numbers"),
    "NaN pixels": (npz_with(x=np.full((4, 4, 4), np.nan, np.float32), y=np.array([0, 1, 0, 1])), "NaN/Inf"),
    "Inf pixels": (npz_with(x=np.full((4, 4, 4), np.inf, np.float32), y=np.array([0, 1, 0, 1])), "NaN/Inf"),
    "empty dataset": (npz_with(x=np.zeros((0, 4, 4), np.uint8), y=np.zeros(0, np.int64)), "holds no images"),
    "one-sample class with a stratified split": (npz_with(x=np.zeros((5, 4, 4), np.uint8), y=np.array([0, 0, 1, 1, 2])), "class 2 has 1 image"),
    "not an npz file": (not_an_npz, "not a readable .npz file"),
    "missing data path": (overrides("data.source=npz", "data.path=/nonexistent/data.npz"), "no such file or folder"),
    # recipe
    "recipe that is not a mapping": (recipe_file("- 1\n- 2\n"), "expected a mapping of sections"),
    "recipe that is not YAML": (recipe_file("optim: [unclosed\n"), "not valid YAML"),
    "unknown key": (overrides("optim.lrr=0.1"), "unknown key optim.lrr, did you mean optim.lr?"),
    "unknown section in a file": (recipe_file("optimiser:\n  lr: 0.1\n"), "unknown key optimiser"),
    "wrong type": (overrides("train.epochs=ten"), "train.epochs: input should be a valid integer"),
    "negative lr": (overrides("optim.lr=-0.1"), "optim.lr: input should be greater than 0"),
    "dropout >= 1": (overrides("model.dropout=1"), "model.dropout: input should be less than 1"),
    "momentum >= 1": (overrides("optim.momentum=1.5"), "optim.momentum: input should be less than 1"),
    "warm-up longer than the run": (overrides("train.epochs=2", "schedule.warmup_epochs=3"), "must be shorter than train.epochs"),
    "unknown component": (overrides("model.name=resnett"), "unknown model 'resnett'. Did you mean 'resnet'"),
    "override without =": (overrides("optim.lr"), "optim.lr: neither a recipe file nor a dotted.key=value override"),
    "override with an empty key": (overrides("=3"), "expected dotted.key=value"),
    "recipe file missing": (overrides("/nonexistent/recipe.yaml"), "recipe file not found"),
    "fractions leave no training data": (overrides("data.val_fraction=0.5", "data.test_fraction=0.5"), "must be below 0.95"),
    "lenet with the wrong widths": (overrides("model.name=lenet", "model.widths=[6]"), "lenet takes 4 widths"),
    "whitening too many features": (overrides("preprocess.name=zca_whiten", "preprocess.max_features=10"), "exceed preprocess.max_features"),
    "colour op on gray data": (overrides("augment.hsv_jitter.p=0.5"), "hsv_jitter needs RGB images"),
    "no such device": (overrides("train.device=tpu"), "train.device"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_gives_one_clear_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, fragment = CORPUS[name]
    argv = build(tmp_path)
    code = main(["train", *argv, f"run.dir={tmp_path / 'run'}", "train.epochs=2", "schedule.warmup_epochs=0", "--quiet"]
                if not any("warmup" in a or "train.epochs" in a for a in argv)
                else ["train", *argv, f"run.dir={tmp_path / 'run'}", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not Path("/tmp/never").exists()


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) >= 30
