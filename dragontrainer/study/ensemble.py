"""`dragon ensemble`: several trained models vote; the gain over the best single one, measured.

    dragon ensemble runs/a runs/b runs/c                 # run folders (or a `dragon compare` folder)
    dragon ensemble --search search/x --top 5            # the best trials of a search (all folds of each)
    dragon ensemble --snapshots runs/a                   # the snapshots of one run (train.snapshots)

Every member is scored on one held-out split that all of them share (their common test split, else
their common validation split) or on `--data`; the ensemble folder holds `plan.json`, the members'
held-out logits (`logits/NNN.safetensors`, so a killed ensemble continues where it was), `ensemble.json`
and `index.html`. The folder is a predictor: `dragon eval` / `dragon predict` accept it like a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file, save

from dragontrainer.errors import DataError, RecipeError, RunError
from dragontrainer.run import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    open_plan_folder,
    unique_path,
)
from dragontrainer.study.combine import COMBINE, combine, equal_weights, fit_weights, scores
from dragontrainer.study.members import MemberSpec, check_agreement, collect_members, load_member, member_logits

ENSEMBLE_FILE = "ensemble.json"


@dataclass
class EnsembleRow:
    """One line of the table: a member, a weight average (compared only), or the ensemble."""

    name: str
    role: str  # member | average | ensemble
    accuracy: float
    nll: float
    ece: float
    weight: float | None = None
    run_dir: str | None = None
    weights: str | None = None


@dataclass
class EnsembleResult:
    out: Path
    split: str
    images: int
    combine: str
    weights: list[float]
    rows: list[EnsembleRow]
    gain: dict[str, float] = field(default_factory=dict)  # ensemble minus best member (accuracy up, nll down)

    @property
    def ensemble(self) -> EnsembleRow:
        return next(r for r in self.rows if r.role == "ensemble")

    def summary(self) -> dict[str, Any]:
        record = asdict(self)
        record["out"] = str(self.out)
        return record


# ------------------------------------------------------------------------------------ the study


def ensemble(
    members: Sequence[str | Path] = (), *, search: str | Path | None = None, top: int = 5,
    snapshots: Sequence[str | Path] = (), combine_method: str = "mean", fit_weights_on_val: bool = False,
    data: str | Path | None = None, source: str | None = None, part: str = "all", out: str | Path | None = None,
    progress: bool = False,
) -> EnsembleResult:  # fmt: skip
    """Score each member and their combination on a shared held-out split; write the ensemble folder.
    Running the same call again on the same `out` continues a killed one (cached member logits)."""
    if combine_method not in COMBINE:
        raise RecipeError(f"--combine: one of {', '.join(COMBINE)}, got {combine_method!r}")
    console = Console(stderr=True, quiet=not progress)
    specs = collect_members(list(members), search=search, top=top, snapshots=list(snapshots))
    if not any(s.role == "member" for s in specs):
        raise RunError("dragon ensemble: no members to combine")
    out = Path(out) if out is not None else unique_path(Path("ensembles") / time.strftime("%Y%m%d-%H%M%S"))
    plan = {"members": [s.to_dict() for s in specs], "combine": combine_method,
            "fit_weights": fit_weights_on_val, "data": None if data is None else str(data)}  # fmt: skip
    start_folder(out, plan)
    loaded = [load_member(s) for s in specs]
    check_agreement(specs, loaded)
    held_out, val, split = evaluation_images(loaded, data, source, part, need_val=fit_weights_on_val)
    logits, val_logits = [], []
    for index, (spec, member) in enumerate(zip(specs, loaded, strict=True)):
        cached = cached_logits(out / "logits" / f"{index:03d}.safetensors", member, held_out[0],
                               val[0] if val is not None else None)  # fmt: skip
        logits.append(cached["held_out"])
        val_logits.append(cached.get("val"))
        console.print(f"member {index + 1}/{len(specs)} {spec.name} ({spec.weights}): scored")
    labels = held_out[1].cpu()
    chosen = [i for i, s in enumerate(specs) if s.role == "member"]
    stacked = torch.stack([logits[i] for i in chosen])
    weights = equal_weights(len(chosen))
    if fit_weights_on_val:
        assert val is not None
        weights = fit_weights(torch.stack([val_logits[i] for i in chosen]), val[1].cpu(), combine_method)
    rows = []
    for index, spec in enumerate(specs):
        probabilities, predictions = combine(logits[index][None], "mean")
        weight = float(weights[chosen.index(index)]) if index in chosen else None
        rows.append(EnsembleRow(spec.name, spec.role, **scores(probabilities, predictions, labels, "mean"),
                                weight=weight, run_dir=spec.run_dir, weights=spec.weights))  # fmt: skip
    probabilities, predictions = combine(stacked, combine_method, weights)
    rows.append(EnsembleRow(f"ensemble ({combine_method}, {len(chosen)} members)", "ensemble",
                            **scores(probabilities, predictions, labels, combine_method)))  # fmt: skip
    best = min((r for r in rows if r.role == "member"), key=lambda r: r.nll)
    best_accuracy = max(r.accuracy for r in rows if r.role == "member")
    gain = {"accuracy": rows[-1].accuracy - best_accuracy, "nll": rows[-1].nll - best.nll}
    result = EnsembleResult(out, split, len(labels), combine_method, [float(w) for w in weights], rows, gain)
    write_outputs(out, result, specs, loaded[0])
    return result


def start_folder(out: Path, plan: dict[str, Any]) -> None:
    """A new or empty folder gets the plan; a folder with the same plan is continued; anything else refused."""
    open_plan_folder(out, plan, file_name="plan.json", kind="ensemble")


def cached_logits(file: Path, member: Any, x: torch.Tensor, val_x: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The member's logits on the held-out images (and validation images), computed once and kept."""
    if file.is_file():
        cached = load_file(str(file))
        if "held_out" in cached and (val_x is None or "val" in cached):
            return cached
    tensors = {"held_out": member_logits(member, x)}
    if val_x is not None:
        tensors["val"] = member_logits(member, val_x)
    atomic_write_bytes(file, save({k: v.contiguous() for k, v in tensors.items()}))
    return tensors


def evaluation_images(
    loaded: list[Any], data: str | Path | None, source: str | None, part: str, *, need_val: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None, str]:
    """(held-out images, labels), (validation images, labels) when weights are fitted, and the split's name.
    The held-out split is the members' common test split, else their common validation split."""
    splits = [prepared_splits(member) for member in loaded]
    tests = [s["test"] for s in splits]
    vals = [s["val"] for s in splits]
    common_val = vals[0] if all(same(v, vals[0]) for v in vals) else None
    if data is not None:
        held, name = other_data(loaded[0], Path(data), source, part), str(data)
    elif all(t is not None for t in tests) and all(same(t, tests[0]) for t in tests):
        held, name = tests[0], "test"
    elif common_val is not None:
        if need_val:
            raise RecipeError(
                "--fit-weights: the members have no common test split, and weights fitted on the validation split "
                "cannot be scored on it; train the members with data.test_fraction > 0 (same data.split_seed)"
            )
        held, name = common_val, "val"
    else:
        raise DataError(
            "ensemble members were held out on different images (e.g. cross-validation folds): give them a common "
            "test split (the same data.test_fraction and data.split_seed) or score them on --data"
        )
    if need_val and common_val is None:
        raise RecipeError("--fit-weights: the members do not share a validation split to fit the weights on")
    return held, common_val if need_val else None, name


def prepared_splits(member: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    from dragontrainer.data.prepare import prepare_data

    prepared = prepare_data(member.recipe, member.device)
    pair = lambda loader: None if loader is None else loader.take(torch.arange(loader.num_images))
    return {"val": pair(prepared.val), "test": pair(prepared.test)}


def same(a: tuple[torch.Tensor, torch.Tensor] | None, b: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    return (
        a is not None
        and b is not None
        and a[0].shape == b[0].shape
        and bool(torch.equal(a[0].cpu(), b[0].cpu()) and torch.equal(a[1].cpu(), b[1].cpu()))
    )


def other_data(reference: Any, path: Path, source: str | None, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images from another dataset, decoded to the members' input shape (as `dragon eval --data` does)."""
    from dragontrainer.api import guess_source
    from dragontrainer.data.sources import load_images

    channels, size, _ = reference.image_shape
    spec = reference.recipe.data.model_copy(
        update={"source": source or guess_source(path), "path": path, "part": part, "image_size": size,
                "color": "gray" if channels == 1 else "rgb", "class_names": None}
    )  # fmt: skip
    images = load_images(spec)
    if len(images.y) and images.y.max() >= len(reference.classes):
        raise DataError(f"{path}: label {int(images.y.max())} but the members know {len(reference.classes)} classes")
    return torch.from_numpy(images.x), torch.from_numpy(images.y)


# ------------------------------------------------------------------------------------ outputs


HEADERS = ["model", "role", "weight", "accuracy", "NLL", "ECE"]


def table_rows(result: EnsembleResult) -> list[list[str]]:
    return [
        [r.name, r.role, "" if r.weight is None else f"{r.weight:.3f}", f"{r.accuracy:.2%}", f"{r.nll:.4f}",
         f"{r.ece:.4f}"]
        for r in result.rows
    ]  # fmt: skip


def gain_line(result: EnsembleResult) -> str:
    return (
        f"on {result.images} {result.split} images: ensemble accuracy {result.ensemble.accuracy:.2%} "
        f"({result.gain['accuracy'] * 100:+.2f} points over the best member), NLL {result.ensemble.nll:.4f} "
        f"({result.gain['nll']:+.4f} vs the best member's)"
    )


def print_table(result: EnsembleResult, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(*HEADERS)
    table.columns[0].overflow = "fold"
    for row in table_rows(result):
        table.add_row(*map(escape, row))
    console.print(table)
    console.print(escape(gain_line(result)))


def write_outputs(out: Path, result: EnsembleResult, specs: list[MemberSpec], reference: Any) -> None:
    import html

    record = {
        **result.summary(),
        "members": [s.to_dict(relative_to=out) for s in specs],
        "classes": list(reference.classes),
        "image_shape": list(reference.image_shape),
    }
    atomic_write_json(out / ENSEMBLE_FILE, record)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(result))
    atomic_write_text(out / "index.html", f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dragon ensemble</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style>
</head><body><h1>dragon ensemble</h1><p>{html.escape(gain_line(result))}</p>
<table><tr>{head}</tr>{body}</table>
<p>Members combined by <b>{html.escape(result.combine)}</b>; rows with role <i>average</i> are weight averages
(SWA/EMA) of a member's run, shown for comparison and not combined. NLL without label smoothing; ECE over
15 confidence bins. Weights fitted on the validation split when shown unequal, never on the test split.</p>
</body></html>
""")  # fmt: skip


# ------------------------------------------------------------------------- the folder as a predictor


def is_ensemble(path: str | Path) -> bool:
    path = Path(path)
    return (path / ENSEMBLE_FILE).is_file() and not (path / "recipe.yaml").is_file()


@dataclass
class EnsemblePredictor:
    """The members of an ensemble folder, loaded, with their combination."""

    path: Path
    members: list[Any]
    method: str
    weights: torch.Tensor
    split: str

    @classmethod
    def load(cls, path: str | Path) -> EnsemblePredictor:
        path = Path(path)
        try:
            record = json.loads((path / ENSEMBLE_FILE).read_text(encoding="utf-8"))
            specs = [MemberSpec.from_dict(m, relative_to=path) for m in record["members"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunError(f"{path / ENSEMBLE_FILE}: unreadable ensemble ({exc})") from None
        specs = [s for s in specs if s.role == "member"]
        loaded = [load_member(s) for s in specs]
        check_agreement(specs, loaded)
        return cls(path, loaded, record["combine"], torch.tensor(record["weights"]), record["split"])

    @property
    def reference(self) -> Any:
        return self.members[0]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, classes) of uint8 images."""
        logits = torch.stack([member_logits(m, x) for m in self.members])
        return combine(logits, self.method, self.weights)


def evaluate_ensemble(
    path: str | Path, data: str | Path | None = None, *, source: str | None = None, part: str = "all"
) -> dict[str, Any]:
    """Like `evaluate_run` for a run: the ensemble's held-out split again, or other data. `loss` is the NLL."""
    predictor = EnsemblePredictor.load(path)
    if data is None:
        splits = prepared_splits(predictor.reference)
        held, name = splits.get(predictor.split) or splits["val"], predictor.split
    else:
        held, name = other_data(predictor.reference, Path(data), source, part), str(data)
    assert held is not None
    probabilities, predictions = predictor.predict(held[0])
    metrics = scores(probabilities, predictions, held[1].cpu(), predictor.method)
    return {"run_dir": str(path), "data": name, "images": len(held[1]), "loss": metrics["nll"], **metrics}


def predict_ensemble(path: str | Path, files: Sequence[str | Path], *, top_k: int = 3) -> list[Any]:
    """`predict` for an ensemble folder: images decoded as the members were trained, then combined."""
    import numpy as np

    from dragontrainer.api import Prediction
    from dragontrainer.data.sources import convert_color, decode_image

    predictor = EnsemblePredictor.load(path)
    reference = predictor.reference
    channels, size, _ = reference.image_shape
    spec = reference.recipe.data.model_copy(update={"image_size": size})
    arrays = []
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"{file}: no such image file")
        arrays.append(decode_image(Path(file), spec)[0])
    rgb = np.stack(arrays).transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(convert_color(rgb, "gray" if channels == 1 else "rgb")))
    probabilities, classes = predictor.predict(x)
    k = min(top_k, len(reference.classes))
    predictions = []
    for file, row, label in zip(files, probabilities, classes.tolist(), strict=True):
        values, indices = row.topk(k)
        top = [(reference.classes[i], float(v)) for v, i in zip(values, indices, strict=True)]
        predictions.append(Prediction(str(file), reference.classes[label], float(row[label]), top))
    return predictions
