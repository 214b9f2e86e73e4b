"""`dragon export`: the exported file alone (onnxruntime, TorchScript, safetensors) gives dragontrainer's
`predict` probabilities on the same uint8 images; metadata carries the class names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dragontrainer import export_run, load_export, predict, train
from dragontrainer.cli import main
from tests.conftest import make_npz

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[Path]]:
    """A small conv net on RGB images, trained with flip TTA and standardisation, and six PNG files."""
    root = tmp_path_factory.mktemp("export")
    data = make_npz(root / "rgb.npz", n=48, classes=4, size=8, channels=3)
    train(overrides=["data.source=npz", f"data.path={data}", "data.class_names=[ant,bee,cat,dog]",
                     "model.name=vgg", "model.widths=[8,8]", "train.epochs=2", "train.batch_size=16",
                     "augment.tta_flip=true", "monitor.report=false", f"run.dir={root / 'run'}"])  # fmt: skip
    images = np.load(data)["x"][:6]
    files = []
    for i, image in enumerate(images):
        files.append(root / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    return root / "run", images, files


def predicted(run: Path, files: list[Path]) -> np.ndarray:
    """predict's probabilities of every class, in class order."""
    classes = ["ant", "bee", "cat", "dog"]
    rows = []
    for p in predict(run, files, top_k=4):
        by_name = dict(p.top)
        rows.append([by_name[c] for c in classes])
    return np.array(rows)


def test_onnx_export_equals_predict(rgb_run, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    run, images, files = rgb_run
    path = export_run(run, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"images": images})  # uint8 N×H×W×C
    np.testing.assert_allclose(probabilities, predicted(run, files), atol=TOLERANCE)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == ["ant", "bee", "cat", "dog"]
    assert metadata["input_layout"] == "NHWC" and metadata["tta_flip"] == "true"
    (one,) = session.run(None, {"images": images[:1]})  # any batch size
    np.testing.assert_allclose(one, probabilities[:1], atol=TOLERANCE)


def test_torchscript_and_safetensors_exports_equal_predict(rgb_run, tmp_path: Path) -> None:
    run, images, files = rgb_run
    expected = predicted(run, files)
    for format in ("torchscript", "safetensors"):
        model, metadata = load_export(export_run(run, format, tmp_path / f"m.{format}"))
        with torch.no_grad():
            got = model(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, err_msg=format)
        assert json.loads(metadata["classes"]) == ["ant", "bee", "cat", "dog"]
    model, metadata = load_export(export_run(run, "torchscript", tmp_path / "nchw.pt", layout="nchw"))
    assert metadata["input_layout"] == "NCHW"
    with torch.no_grad():
        got = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_whitening_exports_keep_the_batch_free(tmp_path: Path) -> None:
    """ZCA flattens the batch: the exported graph must still take any number of images."""
    run = train(overrides=["model.name=mlp", "model.widths=[16]", "train.epochs=1", "preprocess.name=zca_whiten",
                           "monitor.report=false", f"run.dir={tmp_path / 'run'}"]).run_dir  # fmt: skip
    model, _ = load_export(export_run(run, "torchscript"))
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 1), dtype=np.uint8)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image[..., 0]).save(files[-1])
    expected = [p.probability for p in predict(run, files)]
    with torch.no_grad():
        got = model(torch.from_numpy(images)).max(1).values.numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_cli_export_and_its_errors(rgb_run, tmp_path: Path, monkeypatch, capsys) -> None:
    run, _, _ = rgb_run
    out = tmp_path / "model.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and out.is_file()
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2  # never overwritten
    assert "exists already" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dragon: error: dragon export --format onnx needs the onnx package: pip install 'dragontrainer[onnx]'"
    assert not (tmp_path / "m.onnx").exists()
