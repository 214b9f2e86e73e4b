"""`dragon finetune SOURCE [recipe] [key=value ...] --strategy auto|linear|top|full`.

SOURCE is a run folder (its model section, fitted preprocessing and class names come along) or a
weights file (the recipe names the model, e.g. model.name=resnet18). Every stage is an ordinary run
folder under `<out>/stages/`; the same command continues after a kill (finished stages are kept, a
started one is resumed, the probe measurements are cached in `<out>/probes.json`).

- linear: the frozen network's features -> a new linear head (a run), plus scikit-learn logistic
  regression and linear SVM on the features of several stages; the best on validation is named.
- top: the linear stage, then the top block and the head at 1/10 of the learning rate, the rest frozen.
- full: the linear stage, then every stage, lr_mult geometric in depth (head 1 -> stem 0.1).
- auto: the reference's 2×2 table, target data small/large × similar/different to the source: size
  from the training images per class, similarity from linear probes on the source's features against
  the same probes on a randomly initialised copy of the network.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import Recipe, parse_override, read_yaml_mapping, set_dotted
from dragontrainer.run import RunDir, atomic_write_json, open_plan_folder

STRATEGIES = ("auto", "linear", "top", "full")
SMALL_PER_CLASS = 100  # fewer training images per class than this: "very little data"
SIMILAR_GAIN = 0.05  # source features beat a random network's by this much (probe accuracy): "similar"
TOP_LR_MULT = 0.1  # `top`: the fine-tuned top stages' learning rate, relative to optim.lr
FULL_LOWEST = 0.1  # `full`: the stem's lr_mult (the head's is 1)
LINEAR_INIT = "linear_init.safetensors"  # the source weights with the probe's head, the linear stage's start
TOP_PROBE = ("head", "logistic_regression")  # the probe similarity is measured with: the top layer's features


@dataclass
class StageResult:
    name: str
    run_dir: str
    best_val_accuracy: float
    test_accuracy: float | None


@dataclass
class FinetuneResult:
    """What `dragon finetune` did: the strategy (and why), each stage's run, the linear probes."""

    out: Path
    strategy: str
    reasoning: list[str]
    measurements: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


# ------------------------------------------------------------------------------- the recipe


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def target_recipe(source: Path, recipe: str | Path | None, overrides: list[str]) -> Recipe:
    """The source run's model and preprocessing, under the user's recipe file, under the overrides;
    model.weights is the source."""
    data: dict[str, Any] = {}
    if source.is_dir():
        used = RunDir.open(source).recipe().model_dump(mode="json")
        data = {"model": {**used["model"], "weights": None}, "preprocess": used["preprocess"]}
    elif not source.is_file():
        raise DataError(f"{source}: neither a run folder nor a weights file (dragon finetune SOURCE)")
    if recipe is not None:
        data = deep_merge(data, read_yaml_mapping(Path(recipe)))
    for item in overrides:
        set_dotted(data, *parse_override(item))
    set_dotted(data, "model.weights", str(source))
    return Recipe.from_dict(data, origin=str(recipe or "finetune"))


def stage_recipe(base: Recipe, out: Path, name: str, weights: Path, rules: list[dict[str, Any]]) -> Recipe:
    """A stage's run: its weights, rules and folder; preprocessing and class names from the previous
    stage's run (or, for the first stage, from the source run when SOURCE is one)."""
    source = (
        weights
        if weights.is_dir()
        else base.transfer.source or (base.model.weights if Path(base.model.weights).is_dir() else None)
    )  # type: ignore[arg-type]
    return base.with_overrides({
        "model.weights": str(weights), "transfer.rules": rules, "run.dir": str(out / "stages" / name),
        "transfer.source": None if source is None else str(source),
    })  # fmt: skip


def linear_rules() -> list[dict[str, Any]]:
    """Only the head learns; nothing below it is even back-propagated through."""
    return [{"match": "head", "stop_grad": True}, {"match": ".*", "lr_mult": 0, "freeze_bn": True}]


def top_rules(stages: list[str]) -> list[dict[str, Any]]:
    top = stages[-2]  # the last block
    return [
        {"match": "head", "lr_mult": TOP_LR_MULT},
        {"match": re.escape(top), "lr_mult": TOP_LR_MULT, "stop_grad": True},
        {"match": ".*", "lr_mult": 0, "freeze_bn": True},
    ]


def full_rules(stages: list[str]) -> list[dict[str, Any]]:
    from dragontrainer.optim.transfer import depth_multipliers

    return [r.model_dump() for r in depth_multipliers(stages, FULL_LOWEST)]


# ------------------------------------------------------------------------ measurements


def measure(base: Recipe, out: Path, console: Console) -> dict[str, Any]:
    """Probes on the source's features (every block and the head's input) and, for similarity, on a
    randomly initialised network's; cached in probes.json so a resumed study does not redo them."""
    cache = out / "probes.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.nn.models import create_model
    from dragontrainer.nn.pretrained import load_pretrained
    from dragontrainer.study.probes import probe_stages, stage_features
    from dragontrainer.train.device import resolve_device
    from dragontrainer.train.source import adopt_source

    device = resolve_device(base.train.device)
    torch.manual_seed(base.seed)
    data = prepare_data(base, device)
    adopt_source(base, data, console)
    channels, size, _ = data.images.image_shape
    y = data.images.y
    loaders = {"train": data.train, "val": data.val, "test": data.test}

    def features(model: torch.nn.Module, part: str) -> dict[str, np.ndarray]:
        # a split's images through its loader (resident or streamed, centre crops with data.cache_size)
        loader = loaders[part]
        assert loader is not None
        return stage_features(model, loader.take(torch.arange(loader.num_images))[0], data.preprocessor)

    def build() -> torch.nn.Module:
        return create_model(base.model, in_channels=channels, num_classes=data.num_classes, image_size=size).to(device)

    source = build()
    load_pretrained(source, base.model.weights)  # type: ignore[arg-type]
    split = data.split
    test = (features(source, "test"), y[split.test]) if len(split.test) else (None, None)
    scores = probe_stages(
        features(source, "train"), y[split.train], features(source, "val"), y[split.val], *test,
        seed=base.seed,
    )  # fmt: skip
    random_net = build()  # the same architecture, initialised as the recipe says, never trained
    top = {"head": features(random_net, "train")["head"]}, {"head": features(random_net, "val")["head"]}
    random_score = probe_stages(top[0], y[split.train], top[1], y[split.val], classifiers=("logistic_regression",))
    save_probe_head(source, features(source, "train")["head"], y[split.train], out, base.seed)
    counts = np.bincount(y[split.train], minlength=data.num_classes)
    result = {
        "train_images": len(split.train),
        "min_per_class": int(counts.min()),
        "stages": list(source.stages()),  # type: ignore[operator]
        "probes": [s.to_dict() for s in scores],
        # similarity: how much better the source's top-layer features are than a random network's
        "source_probe": next(s.val_accuracy for s in scores if (s.features, s.classifier) == TOP_PROBE),
        "random_probe": random_score[0].val_accuracy,
    }
    atomic_write_json(cache, result)
    return result


def save_probe_head(model: torch.nn.Module, features: np.ndarray, labels: np.ndarray, out: Path, seed: int) -> None:
    """The source weights with the new head set to logistic regression on the head's input features:
    the `linear` stage starts from the converged probe instead of a random head (and `top`/`full`
    start from the linear stage: a good head before the features move)."""
    from safetensors.torch import save

    from dragontrainer.run import atomic_write_bytes
    from dragontrainer.study.probes import fit_probe, folded_linear, head_linear_layer

    layer = head_linear_layer(model)
    weight, bias = folded_linear(fit_probe("logistic_regression", features, labels, seed), layer.out_features)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / LINEAR_INIT, save(tensors))


def choose(measured: dict[str, Any]) -> tuple[str, list[str]]:
    """The reference's table: small & similar -> linear classifier on the top layer; small & different
    -> linear classifiers from different stages; large & similar -> fine-tune a few layers; large &
    different -> fine-tune a larger number of layers."""
    per_class, source, random = measured["min_per_class"], measured["source_probe"], measured["random_probe"]
    small = per_class < SMALL_PER_CLASS
    similar = source - random >= SIMILAR_GAIN
    size = f"{per_class} training images in the smallest class: {'small' if small else 'large'} (< {SMALL_PER_CLASS})"
    likeness = (
        f"logistic regression on the top layer's features: source network {source:.1%} vs random network "
        f"{random:.1%}: "
        f"{'similar' if similar else 'different'} (gain {source - random:+.1%}, threshold {SIMILAR_GAIN:.0%})"
    )
    if small:
        strategy = "linear"
        why = (
            "small and similar: a linear classifier on the top layer"
            if similar
            else "small and different: linear classifiers on features of several stages, the best on validation"
        )
    elif similar:
        strategy, why = "top", "large and similar: fine-tune a few top layers at a lower learning rate"
    else:
        strategy, why = "full", "large and different: fine-tune every stage, earlier ones more gently"
    return strategy, [size, likeness, f"-> {strategy}: {why}"]


# ------------------------------------------------------------------------------ stages


def run_stage(recipe: Recipe, console: Console, progress: bool) -> StageResult:
    """Train a stage, resume it if it was started, or read its result if it finished."""
    from dragontrainer.api import resume, train

    folder = Path(recipe.run.dir)  # type: ignore[arg-type]
    name = folder.name
    if (folder / "result.json").is_file():
        summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        console.print(f"stage {name}: already done ({folder})")
    else:
        started = (folder / "recipe.yaml").is_file()
        console.print(f"stage {name}: {'resuming' if started else 'training'} {folder}")
        done = (
            resume(folder, progress=progress, console=console)
            if started
            else train(recipe, progress=progress, console=console)
        )
        summary = done.summary()
    return StageResult(name, str(folder), summary["best_val_accuracy"], summary.get("test_accuracy"))


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """The same command continues; another command on the same folder is refused."""
    open_plan_folder(out, plan, file_name="plan.json", kind="fine-tuning study (other settings)")


def finetune(
    source: str | Path,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    strategy: str = "auto",
    out: str | Path | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> FinetuneResult:
    """Fine-tune from a run folder or weights file to the recipe's data with a strategy (see module doc)."""
    if strategy not in STRATEGIES:
        raise RecipeError(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    console = console or Console(stderr=True, quiet=not progress)
    source = Path(source)
    base = target_recipe(source, recipe, list(overrides))
    out = Path(out) if out else Path("finetune") / f"{source.stem}-{strategy}"
    check_plan(out, {"source": str(source), "strategy": strategy, "recipe": base.model_dump(mode="json")})
    started = time.perf_counter()
    measured = measure(base, out, console)
    chosen, reasoning = choose(measured) if strategy == "auto" else (strategy, [f"strategy {strategy} as asked"])
    for line in reasoning:
        console.print(line)
    stages = measured["stages"]
    linear = run_stage(stage_recipe(base, out, "linear", out / LINEAR_INIT, linear_rules()), console, progress)
    results = [linear]
    if chosen in ("top", "full"):
        rules = top_rules(stages) if chosen == "top" else full_rules(stages)
        results.append(run_stage(stage_recipe(base, out, chosen, Path(linear.run_dir), rules), console, progress))
    result = FinetuneResult(out, chosen, reasoning, {k: v for k, v in measured.items() if k != "probes"})
    result.stages, result.probes = results, measured["probes"]
    result.best = best_of(results, measured["probes"], chosen)
    atomic_write_json(out / "summary.json", {**result.summary(), "seconds": time.perf_counter() - started})
    return result


def best_of(stages: list[StageResult], probes: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
    """The final stage's run, or for `linear` whichever of the head run and the probes is best on validation."""
    final = stages[-1]
    best = {"kind": "run", "name": final.name, "run_dir": final.run_dir, "val_accuracy": final.best_val_accuracy,
            "test_accuracy": final.test_accuracy}  # fmt: skip
    if strategy == "linear" and probes:
        probe = max(probes, key=lambda p: p["val_accuracy"])
        if probe["val_accuracy"] > final.best_val_accuracy:
            best = {"kind": "probe", "name": f"{probe['classifier']} on {probe['features']}", **probe}
    return best


def print_finetune(result: FinetuneResult, console: Console) -> None:
    """The reasoning, the probes table and each stage's accuracy."""
    from rich.markup import escape
    from rich.table import Table

    for line in result.reasoning:
        console.print(escape(line))
    table = Table(
        "features", "classifier", "dims", "val acc", "test acc", title="linear probes on the source's features"
    )
    for p in result.probes:
        test = "" if p["test_accuracy"] is None else f"{p['test_accuracy']:.1%}"
        table.add_row(p["features"], p["classifier"], str(p["dimensions"]), f"{p['val_accuracy']:.1%}", test)
    console.print(table)
    for stage in result.stages:
        test = "" if stage.test_accuracy is None else f", test {stage.test_accuracy:.1%}"
        console.print(f"stage {stage.name}: best val {stage.best_val_accuracy:.1%}{test}  {escape(stage.run_dir)}")
    best = result.best
    test = "" if best.get("test_accuracy") is None else f", test {best['test_accuracy']:.1%}"
    console.print(f"best on validation: {escape(best['name'])} ({best['val_accuracy']:.1%}{test})")
    console.print(f"study folder {escape(str(result.out))} (summary.json, probes.json, stages/)")
