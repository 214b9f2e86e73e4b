"""`dragon export`: a run's model as one file that needs nothing else — ONNX, TorchScript or safetensors.

The exported model takes **uint8 images** of the run's size, N×H×W×C by default (what PIL, NumPy and
OpenCV give; `layout="nchw"` for N×C×H×W), and returns **class probabilities** N×K: the fitted
preprocessing (its statistics are constants inside the file), the network in eval mode and, when the
run evaluated with it, the flip test-time augmentation are all inside. Class names, the input layout
and size go into the file's metadata (ONNX `metadata_props`, TorchScript extra file
`dragontrainer.json`, safetensors header metadata).

Resize images to the run's size and give them the run's channels (1: gray, 3: RGB) first; `dragon
predict` does exactly that before the same computation.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dragontrainer.errors import DragonError, RecipeError, RunError
from dragontrainer.run import atomic_write_bytes

Format = Literal["onnx", "torchscript", "safetensors"]
Layout = Literal["nhwc", "nchw"]
FORMATS: dict[str, str] = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "safetensors": "model.export.safetensors",
}
METADATA_FILE = "dragontrainer.json"  # TorchScript: the metadata as an extra file in the archive
ONNX_OPSET = 17


class ExportError(DragonError):
    """The model cannot be exported as asked (a missing optional package, an existing output file)."""


class InferenceModel(nn.Module):
    """uint8 images -> class probabilities: the run's fitted preprocessing, its network and its flip TTA."""

    def __init__(
        self, network: nn.Module, preprocessor: Any, *, layout: Layout = "nhwc", tta_flip: bool = False
    ) -> None:
        super().__init__()
        self.network = network.eval()
        self.layout = layout
        self.tta_flip = tta_flip
        self.transform = preprocessor.transform  # a pure function of (pixels, fitted tensors)
        self.state_names = list(preprocessor.state_dict())
        for name, tensor in preprocessor.state_dict().items():
            self.register_buffer(f"preprocess_{name}", tensor.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) if self.layout == "nhwc" else images
        x = x.float() / 255.0
        state = {name: getattr(self, f"preprocess_{name}") for name in self.state_names}
        x = self.transform(x, state)
        probabilities = torch.softmax(self.network(x).float(), dim=1)
        if self.tta_flip:  # as dragon predict: the mean softmax of the image and its mirror image
            probabilities = (probabilities + torch.softmax(self.network(x.flip(3)).float(), dim=1)) / 2
        return probabilities


def export_run(
    run_dir: str | Path,
    format: Format = "onnx",
    out: str | Path | None = None,
    *,
    layout: Layout = "nhwc",
) -> Path:
    """Write the run's best model (with its preprocessing) as `format`; returns the file's path.

    Default file: `RUN/model.onnx`, `RUN/model.torchscript.pt` or `RUN/model.export.safetensors`;
    an `out` that exists already is refused (nothing the user had is overwritten).
    """
    from dragontrainer.api import load_run

    if format not in FORMATS:
        raise RecipeError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    if layout not in ("nhwc", "nchw"):
        raise RecipeError(f"export layout {layout!r}: expected nhwc (N×H×W×C) or nchw (N×C×H×W)")
    loaded = load_run(run_dir, device="cpu")
    path = Path(out) if out is not None else loaded.run.path / FORMATS[format]
    if out is not None and path.exists():
        raise ExportError(f"{path}: exists already; remove it or choose another --out")
    if out is not None and not path.parent.is_dir():
        raise ExportError(f"{path.parent}: no such folder for --out")
    model = InferenceModel(loaded.model, loaded.preprocessor, layout=layout, tta_flip=loaded.recipe.augment.tta_flip)
    model.requires_grad_(False)  # an inference graph: no autograd in the traced file
    channels, height, width = loaded.image_shape
    example = torch.zeros((2, height, width, channels) if layout == "nhwc" else (2, channels, height, width),
                          dtype=torch.uint8)  # fmt: skip
    metadata = export_metadata(loaded, layout)
    writers = {"onnx": onnx_bytes, "torchscript": torchscript_bytes, "safetensors": safetensors_bytes}
    data = writers[format](model, example, metadata, loaded)
    atomic_write_bytes(path, data)
    return path


def export_metadata(loaded: Any, layout: Layout) -> dict[str, str]:
    """String -> string (what every format's metadata holds): classes, input, output, provenance."""
    from dragontrainer.version import __version__

    channels, height, width = loaded.image_shape
    shape = f"N×{height}×{width}×{channels}" if layout == "nhwc" else f"N×{channels}×{height}×{width}"
    return {
        "classes": json.dumps(loaded.classes),
        "input": f"uint8 {shape} ({'gray' if channels == 1 else 'RGB'}, pixels 0-255)",
        "input_layout": layout.upper(),
        "image_size": json.dumps([height, width]),
        "channels": str(channels),
        "output": f"float32 N×{len(loaded.classes)} class probabilities",
        "preprocess": loaded.recipe.preprocess.name,
        "tta_flip": json.dumps(loaded.recipe.augment.tta_flip),
        "model": loaded.recipe.model.name,
        "run": str(loaded.run.path),
        "dragontrainer_version": __version__,
    }


def onnx_bytes(model: InferenceModel, example: torch.Tensor, metadata: dict[str, str], loaded: Any) -> bytes:
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "dragon export --format onnx needs the onnx package: pip install 'dragontrainer[onnx]'"
        ) from None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"dragontrainer classifier: {metadata['input']} -> {metadata['output']}"
    return proto.SerializeToString()


def torchscript_bytes(model: InferenceModel, example: torch.Tensor, metadata: dict[str, str], loaded: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices; the format is what was asked for
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def safetensors_bytes(model: InferenceModel, example: torch.Tensor, metadata: dict[str, str], loaded: Any) -> bytes:
    """Weights and fitted preprocessing as tensors, the recipe in the metadata: `load_export` rebuilds it
    (with dragontrainer; for use without it, export ONNX or TorchScript)."""
    from safetensors.torch import save

    tensors = {f"network.{k}": v for k, v in model.network.state_dict().items()}
    tensors.update({f"preprocess.{k}": v for k, v in loaded.preprocessor.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(tensors, metadata={**metadata, "recipe": loaded.recipe.to_yaml()})


def load_export(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """An exported file back as (uint8 images -> probabilities module, metadata): TorchScript or
    safetensors (ONNX files are for onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such exported model file")
    if path.suffix == ".safetensors":
        return load_safetensors_export(path)
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE])


def load_safetensors_export(path: Path) -> tuple[nn.Module, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dragontrainer.data.preprocess import create_preprocessor
    from dragontrainer.nn.models import create_model
    from dragontrainer.recipe import Recipe

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if "recipe" not in metadata:
        raise RunError(f"{path}: not a dragon export (no recipe in the safetensors metadata)")
    import yaml

    recipe = Recipe.from_dict(yaml.safe_load(metadata["recipe"]), origin=str(path))
    tensors = load_file(str(path))
    height, _ = json.loads(metadata["image_size"])
    classes = json.loads(metadata["classes"])
    network = create_model(recipe.model, in_channels=int(metadata["channels"]), num_classes=len(classes),
                           image_size=height)  # fmt: skip
    network.load_state_dict({k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")})
    preprocessor = create_preprocessor(recipe.preprocess)
    preprocessor.load_state_dict(
        {k.removeprefix("preprocess."): v for k, v in tensors.items() if k.startswith("preprocess.")}
    )
    layout = "nhwc" if metadata["input_layout"] == "NHWC" else "nchw"
    model = InferenceModel(network, preprocessor, layout=layout, tta_flip=recipe.augment.tta_flip)
    return model.requires_grad_(False), metadata
