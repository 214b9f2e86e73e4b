"""The recipe: every knob, its default and its validation, in one pydantic schema.

A recipe is built from defaults, then an optional YAML file, then dotted ``key=value`` overrides.
Unknown keys are refused with the closest valid key; bad values name the field and the allowed range.
Each stage of the pipeline receives only its own section (``create_model(recipe.model, ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dragontrainer.errors import RecipeError, shorten
from dragontrainer.recipe_augment import (
    AffineSpec,
    AugmentSpec,
    ColorJitterSpec,
    CropSpec,
    CutoutSpec,
    ErasingSpec,
    FancyPcaSpec,
    FlipSpec,
    HsvJitterSpec,
    MixSpec,
    NoiseSpec,
    Op,
    ResizedCropSpec,
    RotateSpec,
    TranslateSpec,
)
from dragontrainer.recipe_base import Section, _check_registered, yaml_switch
from dragontrainer.recipe_text import (
    MAX_YAML_NODES,
    OLD_NAMES,
    RecipeLoader,
    check_known_keys,
    describe_validation_error,
    dotted_values,
    expanded_size,
    load_yaml,
    parse_override,
    read_yaml_mapping,
    schema_keys,
    set_dotted,
    unknown_key_message,
)

# the one schema's public names: its sections, and the text helpers re-exported from recipe_text.py
__all__ = [
    "MAX_SEED",
    "MAX_YAML_NODES",
    "OLD_NAMES",
    "AffineSpec",
    "AugmentSpec",
    "ColorJitterSpec",
    "CropSpec",
    "CutoutSpec",
    "DataSpec",
    "EarlyStoppingSpec",
    "ErasingSpec",
    "FancyPcaSpec",
    "FlipSpec",
    "HsvJitterSpec",
    "LrFindSpec",
    "MixSpec",
    "ModelSpec",
    "MonitorSpec",
    "MultitaskSpec",
    "NoiseSpec",
    "Op",
    "OptimSpec",
    "PreprocessSpec",
    "Recipe",
    "RecipeLoader",
    "RegularizeSpec",
    "ResizedCropSpec",
    "RotateSpec",
    "RunSpec",
    "ScheduleSpec",
    "Section",
    "TrainSpec",
    "TransferRule",
    "TransferSpec",
    "TranslateSpec",
    "check_known_keys",
    "describe_validation_error",
    "dotted_values",
    "expanded_size",
    "load_yaml",
    "parse_override",
    "read_yaml_mapping",
    "schema_keys",
    "set_dotted",
    "unknown_key_message",
    "yaml_switch",
]

MAX_SEED = 2**31 - 1  # every RNG accepts it, with room for the offsets runs add (seed + 1, seed·1,000,003 + step)


# ----------------------------------------------------------------------------------------- data


class DataSpec(Section):
    """Where the images come from and how they are split."""

    source: str = "auto"  # auto: inferred from `path` (no path: digits); digits, npz, image-folder, cifar, mnist-idx
    path: Path | None = None  # file or folder, for every source but the embedded digits
    # MNIST / CIFAR files: official = the training files, the official test files as the run's test split;
    # train / test / all = only those files, split by val_fraction / test_fraction (other sources: unused)
    part: Literal["official", "train", "test", "all"] = "official"
    image_size: int | None = Field(None, ge=1, le=4096)  # resize every image to S×S pixels
    color: Literal["auto", "rgb", "gray"] = "auto"  # auto: gray if every image file is gray
    cifar_labels: Literal["fine", "coarse"] = "fine"  # CIFAR-100 only
    class_names: list[str] | None = None  # for sources whose files carry no names (npz, IDX)
    max_image_pixels: int = Field(89_478_485, ge=1)  # refuse larger images (decompression bombs)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # stratified validation split
    test_fraction: float = Field(0.0, ge=0, lt=1)  # optional held-out test split, scored at the end
    split_seed: int = Field(0, ge=0, le=MAX_SEED)  # the split stays fixed when only `seed` changes
    folds: int = Field(1, ge=1, le=100)  # >1: K stratified folds of the non-test images (val_fraction unused)
    fold: int = Field(0, ge=0)  # with folds: which fold is the validation set (0 .. folds-1)
    # class imbalance: none | oversample | undersample | class_weights (loss weighted N / (C · count_c)) |
    # two_stage (class-balanced draws, then from two_stage_switch × epochs the natural order, only the head learning)
    balance: Literal["none", "oversample", "undersample", "class_weights", "two_stage"] = "none"
    two_stage_switch: float = Field(0.75, gt=0, lt=1)  # two_stage: fraction of train.epochs before the switch
    # data larger than memory: device = each split as one uint8 tensor on the device; stream = batches read by a
    # background thread from a decoded uint8 cache on disk (image folders) or from host memory; auto = decided from
    # the decoded size and the memory available, and said (data/residency.py)
    resident: Literal["auto", "device", "stream"] = "auto"
    cache: Path | None = None  # folder of decoded caches; null: $XDG_CACHE_HOME/dragontrainer (~/.cache/dragontrainer)
    # image folders: store each photo with its shorter side at cache_size (centre square); training takes random
    # image_size crops within it, evaluation the centre crop (e.g. 1.15 × data.image_size)
    cache_size: int | None = Field(None, ge=1, le=8192)

    @field_validator("source")
    @classmethod
    def _known_source(cls, name: str) -> str:
        return _check_registered("data source", name)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataSpec:
        if self.val_fraction + self.test_fraction >= 0.95:
            raise ValueError(
                f"val_fraction + test_fraction must be below 0.95 to leave training images, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self

    @model_validator(mode="after")
    def _fold_exists(self) -> DataSpec:
        if self.fold >= self.folds:
            raise ValueError(f"fold must be below folds ({self.folds}), got fold {self.fold}")
        return self

    @model_validator(mode="after")
    def _cache_size_holds_image_size(self) -> DataSpec:
        if self.cache_size is not None and (self.image_size is None or self.cache_size < self.image_size):
            raise ValueError(
                f"cache_size ({self.cache_size}) needs data.image_size set, at most cache_size; got {self.image_size}"
            )
        return self


class PreprocessSpec(Section):
    """Input preprocessing, fitted on the training split only and saved with the run."""

    name: str = "standardize"  # per-channel mean/std; see `dragon components` for the others
    eps: float = Field(1e-5, gt=0)  # pca_whiten / zca_whiten: Xrot / √(S + eps), the reference's 1e-5
    max_features: int = Field(4096, ge=1)  # whitening: refuse C·H·W above this (covariance is D×D)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_registered("preprocess", name)


# ---------------------------------------------------------------------------------------- model


class ModelSpec(Section):
    """The network: a zoo entry plus the layer choices it is built with."""

    name: str = "vgg"  # mlp | lenet | vgg | resnet
    widths: list[int] | None = None  # channels (or units) per stage; None: the model's default
    depth: int | None = Field(None, ge=1, le=64)  # blocks (or convs) per stage; None: the default
    activation: str = "relu"
    leaky_slope: float = Field(0.01, ge=0, lt=1)  # leaky_relu: negative-side slope (1/100; 1/5.5 ≈ 0.18)
    rrelu_lower: float = Field(3.0, gt=1)  # rrelu: negative slope 1/a, a ~ U(lower, upper) in training
    rrelu_upper: float = Field(8.0, gt=1)
    norm: str = "batch"
    init: str = "he"  # he | xavier | ... | lsuv | auto (matches each layer's activation)
    init_mode: Literal["fan_in", "fan_out"] = "fan_in"  # he / he_uniform
    init_std: float = Field(0.01, gt=0)  # normal: N(0, std²) (the reference's 0.01, 0.03 ...)
    init_value: float = 0.0  # constant
    dropout: float = Field(0.0, ge=0, lt=1)  # inverted dropout before the head (and between MLP layers)
    spatial_dropout: float = Field(0.0, ge=0, lt=1)  # drops whole channels after every conv block
    dropconnect: float = Field(0.0, ge=0, lt=1)  # drops individual weights of the head (Wan et al. 2013)
    zero_init_residual: bool = True  # last norm of each residual branch starts at 0 (Goyal et al.)
    weights: Path | None = None  # .safetensors, .pt/.pth (read with weights_only=True), or a run folder

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: list[int] | None) -> list[int] | None:
        if widths is not None and (not widths or min(widths) < 1):
            raise ValueError(f"must be a non-empty list of integers >= 1, got {widths}")
        return widths

    @model_validator(mode="after")
    def _rrelu_range(self) -> ModelSpec:
        if self.rrelu_lower > self.rrelu_upper:
            raise ValueError(f"rrelu_lower ({self.rrelu_lower}) must not exceed rrelu_upper ({self.rrelu_upper})")
        return self

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if ":" in name:  # package.module:factory, the user's own model (nn/user.py)
            from dragontrainer.nn.user import import_factory

            try:
                import_factory(name)
            except RecipeError as exc:
                raise ValueError(str(exc).removeprefix(f"model.name={name}: ")) from None
            return name
        return _check_registered("model", name)

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, name: str) -> str:
        return _check_registered("activation", name)

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, name: str) -> str:
        return _check_registered("norm", name)

    @field_validator("init")
    @classmethod
    def _known_init(cls, name: str) -> str:
        return _check_registered("init", name)


# ------------------------------------------------------------------------------ optimisation


class OptimSpec(Section):
    """Optimiser and its hyperparameters; `lr` is per `reference_batch_size` images."""

    name: str = "sgd"  # sgd | adagrad | rmsprop | adam | amsgrad | adamw | nadam | radam | adabelief | diffgrad
    lr: Annotated[float, Field(gt=0, le=100)] | Literal["auto", "find"] = "auto"  # auto: the optimiser family's
    # usual rate (see optim.optimizers.AUTO_LR); find: an LR range test picks it before training (dragon lr-find)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)  # Adam family
    eps: float = Field(1e-8, gt=0, le=1)
    bias_correction: bool = True  # adam only: false shows the huge first steps it prevents
    rho: float = Field(0.99, ge=0, lt=1)  # rmsprop: decay of the running mean of g²
    rmsprop_momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, lt=1)  # never on biases or normalisation parameters
    lr_scaling: Literal["linear", "none"] = "linear"  # lr × batch_size / reference_batch_size
    reference_batch_size: int = Field(128, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_registered("optimizer", name)

    @field_validator("lr", mode="wrap")
    @classmethod
    def _lr_or_find(cls, value: Any, handler: Any) -> float | str:
        if value in ("auto", "find"):
            return value
        try:
            lr = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a positive number, 'auto' or 'find', got {shorten(repr(value))}") from None
        if not 0 < lr <= 100:
            raise ValueError("input should be greater than 0" if lr <= 0 else "input should be at most 100")
        return lr

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"both betas must be in [0, 1), got {list(betas)}")
        return betas


class LrFindSpec(Section):
    """The LR range test (Smith 2017) behind `dragon lr-find` and `optim.lr=find`; lrs are effective
    (at the training batch size), the suggestion is converted back to `optim.lr` units."""

    start_lr: float = Field(1e-6, gt=0)
    end_lr: float = Field(10.0, gt=0)
    steps: int = Field(200, ge=20, le=100_000)  # per sweep; lr grows exponentially from start to end
    repeats: int = Field(3, ge=1, le=50)  # sweeps with different seeds and data orders; the median wins
    smoothing: float = Field(0.9, ge=0, lt=1)  # debiased exponential smoothing of the loss (lag ≈ β/(1−β) steps)
    diverge_factor: float = Field(4.0, gt=1)  # a sweep stops when the smoothed loss exceeds this × its best
    conservative_factor: float = Field(10.0, ge=1)  # conservative suggestion: lr at the loss minimum / this
    use: Literal["steepest", "conservative"] = "steepest"  # which suggestion optim.lr=find trains with

    @model_validator(mode="after")
    def _range(self) -> LrFindSpec:
        if self.start_lr >= self.end_lr:
            raise ValueError(f"start_lr ({self.start_lr}) must be below end_lr ({self.end_lr})")
        return self


class ScheduleSpec(Section):
    """Learning-rate factor per iteration: linear warm-up, then the named decay. Times in epochs."""

    name: str = "cosine"  # see `dragon components`: constant, step, multistep, exponential, ...
    warmup_epochs: float | Literal["auto"] = "auto"  # auto: min(1, 10% of train.epochs); 0: none
    min_lr_fraction: float = Field(0.0, ge=0, le=1)  # floor (cosine, linear, polynomial); cyclic low end
    step_epochs: float = Field(30.0, gt=0)  # step: multiply by `gamma` every this many epochs
    milestones_epochs: list[float] = [30.0, 60.0, 80.0]  # multistep: multiply by `gamma` at each
    gamma: float = Field(0.1, gt=0, le=1)
    decay_rate: float = Field(0.1, ge=0)  # k per epoch: exponential e^(−kt), inverse time 1/(1+kt), ...
    power: float = Field(2.0, gt=0)  # polynomial: (1 − t/T)^power
    restart_epochs: float = Field(10.0, gt=0)  # cosine_restarts: length of the first period
    restart_mult: float = Field(1.0, ge=1)  # cosine_restarts: each period this many times longer
    cycle_epochs: float = Field(8.0, gt=0)  # cyclic: one full low -> high -> low cycle
    cyclic_mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    cyclic_gamma: float = Field(0.9999, gt=0, le=1)  # exp_range: amplitude × gamma^step
    onecycle_pct: float = Field(0.3, gt=0, lt=1)  # one_cycle: fraction of the run spent rising
    onecycle_div: float = Field(25.0, ge=1)  # one_cycle: start at lr / div
    onecycle_final_div: float = Field(1e4, ge=1)  # one_cycle: end at lr / (div × final_div)
    plateau_factor: float = Field(0.5, gt=0, lt=1)  # plateau: multiply lr by this (0.5 = divide by 2)
    plateau_patience: int = Field(3, ge=1)  # plateau: epochs without val_loss improvement first
    plateau_min_delta: float = Field(0.0, ge=0)
    plateau_min_fraction: float = Field(1e-3, ge=0, le=1)  # never below lr × this

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_registered("schedule", name)

    @field_validator("warmup_epochs")
    @classmethod
    def _non_negative_warmup(cls, epochs: float | str) -> float | str:
        if epochs != "auto" and float(epochs) < 0:
            raise ValueError(f"must be 'auto' or a number of epochs >= 0, got {epochs}")
        return epochs


class RegularizeSpec(Section):
    """Penalties in the loss and constraints after each step (weight decay is in `optim`)."""

    penalty: str = "none"  # none | l1 | l2 (½λ‖w‖² in the loss) | elastic_net
    strength: float = Field(0.0, ge=0)  # λ of the penalty
    l1_ratio: float = Field(0.5, ge=0, le=1)  # elastic_net: λ·(r·‖w‖₁ + (1−r)·½‖w‖²)
    max_norm: float | None = Field(None, gt=0)  # project each unit's incoming weights to ‖w‖₂ ≤ c (3–4)
    clip_grad_norm: float | None = Field(None, gt=0)  # rescale gradients whose global norm exceeds this
    clip_grad_value: float | None = Field(None, gt=0)  # clamp every gradient element to ±this

    @field_validator("penalty")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_registered("penalty", name)


class EarlyStoppingSpec(Section):
    """Stop when the monitored validation metric has not improved for `patience` epochs."""

    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int | None = Field(10, ge=1)  # None: never stop early
    min_delta: float = Field(0.0, ge=0)


class TrainSpec(Section):
    """The loop: length, batch, loss and device."""

    epochs: int = Field(30, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    eval_batch_size: int = Field(1024, ge=1, le=1_000_000)
    # validate every this many epochs (and always after the last); early stopping's patience and
    # reduce-on-plateau count validations
    val_every: int = Field(1, ge=1, le=100_000)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] | list[float] = "none"  # balanced: N / (C · count_c) on train
    accumulate_steps: int = Field(1, ge=1, le=4096)  # gradient accumulation: effective batch = batch × this
    device: str = "auto"  # auto: cuda if available, else cpu
    # fp32 | bf16 (bfloat16 autocast) | fp16 (float16 autocast + loss scaling; CUDA only) | auto: a short probe
    # on the run's model and first batch picks bf16 only when faster and agreeing (precision.json says why)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # torch.compile the training forward; auto: on CUDA only
    deterministic: bool = False  # torch deterministic algorithms (CUDA); CPU runs repeat bitwise anyway
    shuffle: bool = True  # a new order every epoch; off only to reproduce (or diagnose) ordered data
    # several ranks (torchrun, dragon train --nproc N): batch norm statistics over the global batch, not each
    # rank's shard (SyncBatchNorm); worth it when a rank's share of train.batch_size is small
    sync_batchnorm: bool = False
    score_test: bool = True  # score the best weights on the test split at the end (search trials never do)
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    snapshots: Literal["none", "cycles", "every_k"] = "none"  # weights kept for ensembles in checkpoints/snapshots/
    snapshot_every: int = Field(5, ge=1)  # every_k: a snapshot every this many epochs
    weight_average: Literal["none", "swa", "ema"] = "none"  # an averaged copy of the weights in checkpoints/<name>/
    swa_start: float = Field(0.75, ge=0, lt=1)  # swa: average the weights at the end of epochs after this fraction
    ema_decay: float = Field(0.99, gt=0, lt=1)  # ema: w ← d·w + (1−d)·w_now per step (d warmed up)
    # softmax: cross-entropy over the classes; sigmoid: one binary cross-entropy per class (one-vs-rest), for
    # binary targets and multi-label targets (a 0/1 matrix per image)
    loss: Literal["softmax", "sigmoid"] = "softmax"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        """One message for the three values (a bool-or-literal union would report two)."""
        words = {"true": True, "false": False, "auto": "auto", "on": True, "off": False}
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise ValueError(f"must be true, false or auto, got {value!r}")

    @model_validator(mode="before")
    @classmethod
    def _amp_is_precision(cls, values: Any) -> Any:
        """`train.amp` (before train.precision existed) still reads: on → bf16, off → fp32, auto → auto."""
        if isinstance(values, dict) and "amp" in values:
            values = dict(values)
            amp = yaml_switch(values.pop("amp"))
            if "precision" in values:
                raise ValueError("train.amp is the old name of train.precision: give only train.precision")
            if amp not in ("on", "off", "auto"):
                raise ValueError(f"train.amp (now train.precision) must be on, off or auto, got {amp!r}")
            values["precision"] = {"on": "bf16", "off": "fp32", "auto": "auto"}[amp]
        return values

    @field_validator("class_weights")
    @classmethod
    def _valid_weights(cls, weights: str | list[float]) -> str | list[float]:
        if isinstance(weights, list) and (not weights or min(weights) < 0 or max(weights) == 0):
            raise ValueError(f"must be 'none', 'balanced' or a list of non-negative weights, got {weights}")
        return weights


class MonitorSpec(Section):
    """Babysitting: sampled layer statistics on a fixed probe batch, the NaN guard, findings and report."""

    enabled: bool = True
    every: int = Field(0, ge=0)  # optimiser steps between layer samples; 0: auto (4 per epoch, at most every 20 steps)
    probe_size: int = Field(64, ge=2, le=4096)  # fixed training images the layer statistics are measured on
    noise_scale: bool = True  # gradient noise scale (McCandlish et al. 2018) at every 8th sample
    on_nan: Literal["stop", "rollback"] = "stop"  # rollback: back to `last` with the learning rate lowered
    max_rollbacks: int = Field(3, ge=1, le=100)
    rollback_lr_factor: float = Field(0.1, gt=0, lt=1)
    report: bool = True  # findings.json and report.html at the end of the run
    tensorboard: Literal["auto", "on", "off"] = "auto"  # auto: scalars for TensorBoard when it is installed

    _tensorboard_switch = field_validator("tensorboard", mode="before")(lambda v: yaml_switch(v))
    mlflow: Literal["auto", "on", "off"] = "auto"  # auto: MLflow tracking when mlflow is installed
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a file store in <run>/mlruns

    _mlflow_switch = field_validator("mlflow", mode="before")(lambda v: yaml_switch(v))


class TransferRule(Section):
    """One Caffe-style rule for the parameters (and stages) whose name matches `match`; the first rule
    that matches a parameter decides for it."""

    match: str  # regular expression, fully matching a parameter name (stem.0.weight) or its stage (blocks.1)
    lr_mult: float = Field(1.0, ge=0)  # × the learning rate; 0 freezes (left out of the optimiser)
    decay_mult: float = Field(1.0, ge=0)  # × optim.weight_decay (which stays off biases and norms)
    stop_grad: bool = False  # detach the activation entering the matched stage: nothing below gets a gradient
    freeze_bn: bool = False  # batch norm of matched frozen parameters keeps its running statistics (eval mode)

    @field_validator("match")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        import re

        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}): {pattern!r}") from None
        return pattern


class TransferSpec(Section):
    """Transfer learning: per-stage learning rates, freezing and stop-gradient, and what comes with
    the source run named in model.weights."""

    rules: list[TransferRule] = []
    preprocess: Literal["source", "refit"] = "source"  # source: the source run's fitted preprocessing
    source: Path | None = None  # the run preprocessing and class names come from; None: model.weights if a run


class MultitaskSpec(Section):
    """Several label columns learnt at once (train/multitask.py): `tasks` names them, the first is the main
    task (early stopping, the diagnosis and the confusion matrix use it)."""

    tasks: list[str] = []  # npz `y` N×T: the names of its columns; named arrays `y_<task>`: which, in order
    weights: list[float] = []  # loss weight per task (default 1 each): loss = Σ w_t · loss_t
    sharing: Literal["hard", "soft"] = "hard"  # hard: one trunk, one head per task; soft: one tower per task
    soft_strength: float = Field(1e-3, ge=0)  # soft: λ·Σ_{t<u} ‖θ_t − θ_u‖² between corresponding tower weights

    @model_validator(mode="after")
    def _weights_per_task(self) -> MultitaskSpec:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct names, got {self.tasks}")
        if self.weights and len(self.weights) != len(self.tasks):
            raise ValueError(f"weights: {len(self.weights)} weight(s) for {len(self.tasks)} task(s) {self.tasks}")
        if self.weights and (min(self.weights) < 0 or max(self.weights) == 0):
            raise ValueError(f"weights must be non-negative and not all zero, got {self.weights}")
        return self


class RunSpec(Section):
    """Where the run folder goes."""

    dir: Path | None = None  # exact folder; None: <root>/<timestamp>-<model>-<source>
    root: Path = Path("runs")


class Recipe(Section):
    """Everything a training run needs; the resolved recipe is saved in every run folder."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataSpec = DataSpec()
    preprocess: PreprocessSpec = PreprocessSpec()
    augment: AugmentSpec = AugmentSpec()
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    lr_find: LrFindSpec = LrFindSpec()
    regularize: RegularizeSpec = RegularizeSpec()
    train: TrainSpec = TrainSpec()
    monitor: MonitorSpec = MonitorSpec()
    run: RunSpec = RunSpec()
    transfer: TransferSpec = TransferSpec()
    multitask: MultitaskSpec = MultitaskSpec()

    @model_validator(mode="after")
    def _warmup_shorter_than_run(self) -> Recipe:
        if self.schedule.warmup_epochs != "auto" and self.schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) must be shorter "
                f"than train.epochs ({self.train.epochs})"
            )
        return self

    @model_validator(mode="after")
    def _snapshot_cycles_need_cycles(self) -> Recipe:
        if self.train.snapshots == "cycles" and self.schedule.name not in ("cosine_restarts", "cyclic"):
            raise ValueError(
                f"train.snapshots=cycles needs a schedule with cycles (schedule.name=cosine_restarts or cyclic), "
                f"got schedule.name={self.schedule.name}; or use train.snapshots=every_k"
            )
        return self

    # -------------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
        """Defaults, then the YAML file at `path` (if any), then dotted ``key=value`` overrides."""
        data: dict[str, Any] = read_yaml_mapping(Path(path)) if path is not None else {}
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(data, key, value)
        return cls.from_dict(data, origin=str(path) if path else "recipe")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "recipe") -> Recipe:
        """Validate a nested mapping; errors are RecipeErrors naming the dotted field."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
        check_known_keys(data)
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise RecipeError(describe_validation_error(exc)) from None

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> Recipe:
        """A copy with dotted overrides applied: ``["optim.lr=0.05"]`` or ``{"optim.lr": 0.05}``."""
        data = self.model_dump(mode="json")
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
        for key, value in items:
            set_dotted(data, key, value)
        return Recipe.from_dict(data)

    def to_yaml(self) -> str:
        """The fully resolved recipe as YAML that `Recipe.load` reads back to an equal recipe."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
