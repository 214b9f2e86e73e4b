"""The diagnosis scenario suite: broken runs (one cause each) and healthy controls, on three data sets
made here (the digits; `shapes`, coloured shapes and textures, 3×32×32; `letters`, a folder of gray
PNGs of stroke letters in mixed sizes) and four models (vgg, lenet, resnet, mlp).

A broken scenario names the finding keys that name its cause: the diagnosis's *first* finding must be
one of them. A healthy control (strong regularisation included) must produce no warning or error.

    python -m tests.monitor.scenarios --all             # the full matrix: top-finding accuracy, false alarms
    python -m tests.monitor.scenarios --all --part 0/2  # half of it (run 1/2 beside it on a second core)
    python -m tests.monitor.scenarios digits/healthy    # chosen cases, every finding printed
    python -m tests.monitor.scenarios --all --keep DIR  # keep the run folders (DIR/<dataset>_<name>/run);
                                                        # the same command continues after a kill
    python -m tests.monitor.scenarios --rediagnose DIR  # diagnose kept run folders again, without training
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------- data sets


def digits() -> tuple[list[np.ndarray], np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return list((bunch.images * 255 / 16).round().astype(np.uint8)), bunch.target.astype(np.int64)


def shapes(n: int = 900, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """32×32 RGB: six classes (disk, square, triangle, ring, stripes, checker) in random colours, sizes
    and places on a noisy background of another colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images, labels = [], np.arange(n) % 6
    for label in labels:
        cx, cy, r = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(6, 10)
        dx, dy = xx - cx, yy - cy
        mask = [np.hypot(dx, dy) < r, (abs(dx) < r * 0.8) & (abs(dy) < r * 0.8),
                (dy > -r * 0.8) & (dy < r * 0.8) & (abs(dx) < (dy + r * 0.8) * 0.6),
                (np.hypot(dx, dy) < r) & (np.hypot(dx, dy) > r * 0.55),
                (np.hypot(dx, dy) < r) & ((yy // 3) % 2 == 0),
                (np.hypot(dx, dy) < r) & (((xx // 4) + (yy // 4)) % 2 == 0)][label]  # fmt: skip
        background, colour = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.abs(colour - background).sum() < 200:
            colour = rng.uniform(0, 255, 3)
        image = background[:, None, None] + rng.normal(0, 20, (3, 32, 32))
        image = np.where(mask[None], colour[:, None, None] + rng.normal(0, 10, (3, 32, 32)), image)
        images.append(np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    return images, labels.astype(np.int64)


STROKES = {  # polylines in the unit square
    "E": [[(0.8, 0.1), (0.2, 0.1), (0.2, 0.9), (0.8, 0.9)], [(0.2, 0.5), (0.6, 0.5)]],
    "H": [[(0.2, 0.1), (0.2, 0.9)], [(0.8, 0.1), (0.8, 0.9)], [(0.2, 0.5), (0.8, 0.5)]],
    "L": [[(0.25, 0.1), (0.25, 0.9), (0.8, 0.9)]],
    "N": [[(0.2, 0.9), (0.2, 0.1), (0.8, 0.9), (0.8, 0.1)]],
    "T": [[(0.1, 0.15), (0.9, 0.15)], [(0.5, 0.15), (0.5, 0.9)]],
    "V": [[(0.15, 0.1), (0.5, 0.9), (0.85, 0.1)]],
    "X": [[(0.15, 0.1), (0.85, 0.9)], [(0.85, 0.1), (0.15, 0.9)]],
    "Z": [[(0.15, 0.1), (0.85, 0.1), (0.15, 0.9), (0.85, 0.9)]],
}


def letters(n: int = 800, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Gray images of stroke letters, 14 to 40 pixels on a side, jittered, at random stroke widths."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    names = sorted(STROKES)
    images, labels = [], np.arange(n) % len(names)
    for label in labels:
        size = int(rng.integers(14, 41))
        image = Image.new("L", (size, size), int(rng.integers(0, 60)))
        draw = ImageDraw.Draw(image)
        shift, scale = rng.uniform(-0.08, 0.08, 2), rng.uniform(0.8, 1.0)
        for line in STROKES[names[label]]:
            points = [(((px - 0.5) * scale + 0.5 + shift[0]) * size, ((py - 0.5) * scale + 0.5 + shift[1]) * size)
                      for px, py in line]  # fmt: skip
            draw.line(points, fill=int(rng.integers(180, 256)), width=max(1, round(size * rng.uniform(0.06, 0.12))))
        images.append(np.asarray(image))
    return images, labels.astype(np.int64)


DATASETS = {"digits": digits, "shapes": shapes, "letters": letters}


def write(dataset: str, folder: Path, images: list[np.ndarray], labels: np.ndarray) -> list[str]:
    """The images as the data set's own format: npz for digits and shapes, a PNG folder for letters."""
    folder.mkdir(parents=True, exist_ok=True)
    if dataset != "letters":
        np.savez(folder / "data.npz", x=np.stack(images), y=labels)
        return ["data.source=npz", f"data.path={folder / 'data.npz'}"]
    from PIL import Image

    root = folder / "letters"
    names = sorted(STROKES)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{i:05d}.png")
    return ["data.source=image-folder", f"data.path={root}", "data.image_size=16"]


# --------------------------------------------------------------------- data problems (x, y) -> (x, y)


def shuffled_labels(x: list, y: np.ndarray) -> tuple[list, np.ndarray]:
    return x, np.random.default_rng(0).permutation(y)


def sorted_by_label(x: list, y: np.ndarray) -> tuple[list, np.ndarray]:
    order = np.argsort(y, kind="stable")
    return [x[i] for i in order], y[order]


def imbalanced(x: list, y: np.ndarray) -> tuple[list, np.ndarray]:
    classes = int(y.max()) + 1
    per_class = np.bincount(y).min()
    keep = np.concatenate([np.flatnonzero(y == c)[: per_class if c < classes // 2 else per_class // 7]
                           for c in range(classes)])  # fmt: skip
    return [x[i] for i in keep], y[keep]


def flipped_labels(x: list, y: np.ndarray, share: float = 0.3) -> tuple[list, np.ndarray]:
    """`share` of the labels moved to another class, chosen at random."""
    rng = np.random.default_rng(0)
    classes = int(y.max()) + 1
    flip = rng.random(len(y)) < share
    return x, np.where(flip, (y + rng.integers(1, classes, len(y))) % classes, y)


def duplicated(x: list, y: np.ndarray) -> tuple[list, np.ndarray]:
    """Every image three times: most validation images are copies of training images."""
    return x * 3, np.tile(y, 3)


def few_images(x: list, y: np.ndarray) -> tuple[list, np.ndarray]:
    """30 images per class (half of them to train on): too few to generalise from, enough to memorise."""
    keep = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(int(y.max()) + 1)])
    return [x[i] for i in keep], y[keep]


def digits_with(problem: str, folder: Path) -> list[str]:
    """The digits with a data problem above, written to `folder`: the overrides that read them."""
    x, y = PROBLEMS[problem](*digits())
    return write("digits", folder, x, y)


# ------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    overrides: tuple[str, ...]
    expect: tuple[str, ...]  # finding keys that name the cause; empty for a healthy control
    problem: str | None = None  # a data problem above
    datasets: tuple[str, ...] = ("digits", "shapes", "letters")


BASE = {  # small and quick, yet healthy: each data set with its own model
    "digits": ("model.name=lenet", "train.epochs=10", "schedule.warmup_epochs=1"),
    "shapes": ("model.widths=[16,32,32]", "train.epochs=8", "schedule.warmup_epochs=1", "train.batch_size=64"),
    "letters": ("model.name=resnet", "model.widths=[16,32]", "train.epochs=6", "schedule.warmup_epochs=1",
                "train.batch_size=64"),
}  # fmt: skip
NO_NORM = ("model.norm=none",)
MLP = ("model.name=mlp", "model.widths=[256]")
# an unregularised, unaugmented MLP with Adam: it memorises quickly
MEMORISE = ("model.name=mlp", "model.widths=[1024]", "optim.name=adam", "optim.weight_decay=0",
            "train.label_smoothing=0", "train.batch_size=32", "schedule.name=constant", "augment.crop.p=0",
            "train.early_stopping.patience=null", "train.epochs=40", "data.val_fraction=0.5")  # fmt: skip
MLP_DATA = ("digits", "letters")  # a dense net on coloured textures is not a healthy control: it underfits
LR_HIGH = ("lr_too_high", "lr_off_range", "diverged", "dead_units", "exploding_gradients")

SCENARIOS = [
    Scenario("healthy", (), ()),
    Scenario("healthy_dropout_mlp", (*MLP, "model.dropout=0.5"), (), datasets=MLP_DATA),
    Scenario("healthy_mixup", ("augment.mixup.p=1.0",), ()),
    Scenario("healthy_adamw_decay", ("optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.05"), ()),
    Scenario("healthy_small_dense", ("model.name=mlp", "model.widths=[32]"), (), datasets=MLP_DATA),
    Scenario("diverged", (*NO_NORM, "optim.lr=20"), ("lr_off_range", "diverged", "lr_too_high")),
    Scenario("nan_rollback", (*NO_NORM, "optim.lr=20", "monitor.on_nan=rollback"), ("lr_off_range", "nan_rollback")),
    Scenario("lr_too_high", (*NO_NORM, "optim.lr=1.0"), LR_HIGH),
    Scenario("adam_at_sgd_rate", ("optim.name=adam", "optim.lr=0.2"), ("lr_off_range",)),
    Scenario("lr_too_low", ("optim.lr=1e-5",), ("lr_off_range", "lr_too_low")),
    Scenario("zero_init", ("model.init=zeros",), ("bad_init",)),
    Scenario("large_init", (*NO_NORM, "model.init=normal", "model.init_std=1.0"), ("bad_init",)),
    Scenario("vanishing", ("model.name=mlp", "model.widths=[64,64,64,64,64,64,64,64]", "model.activation=sigmoid",
                           *NO_NORM, "model.init=xavier"), ("vanishing_gradients", "saturated_activations")),
    Scenario("exploding", ("model.name=mlp", "model.widths=[256,256,256,256,256,256,256,256]", *NO_NORM,
                           "model.init=normal", "model.init_std=0.15", "optim.lr=0.001"),
             ("exploding_gradients", "bad_init")),
    Scenario("dead_units", (*NO_NORM, "optim.lr=0.5"), LR_HIGH),
    Scenario("saturated", ("model.activation=sigmoid", *NO_NORM, "model.init=normal", "model.init_std=0.5"),
             ("saturated_activations", "bad_init")),
    Scenario("unnormalised", ("preprocess.name=none",), ("unnormalised_inputs",)),
    Scenario("pca_whiten", ("preprocess.name=pca_whiten",), ("noise_amplification",), datasets=("digits", "letters")),
    Scenario("labels_mismatch", (), ("labels_mismatch",), "shuffled_labels"),
    Scenario("unshuffled", ("train.shuffle=false",), ("unshuffled_data",), "sorted_by_label"),
    Scenario("underfitting", ("model.name=mlp", "model.widths=[3]", "train.label_smoothing=0"), ("underfitting",)),
    Scenario("small_data", MEMORISE, ("overfitting", "overtraining"), "few_images"),
    Scenario("label_noise", (), ("label_noise",), "flipped_labels"),
    Scenario("over_regularised", ("model.dropout=0.9", "optim.weight_decay=0.05"), ("over_regularisation",)),
    Scenario("split_overlap", (), ("split_overlap",), "duplicated"),
    Scenario("noisy", ("train.batch_size=8",), ("noisy_loss",)),
    Scenario("imbalanced", (), ("class_imbalance",), "imbalanced"),
]  # fmt: skip
PROBLEMS = {f.__name__: f for f in (shuffled_labels, sorted_by_label, imbalanced, flipped_labels, duplicated,
                                    few_images)}  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}
CASES = [(d, s) for s in SCENARIOS for d in s.datasets]  # the full matrix


def run_scenario(scenario: Scenario, folder: Path, dataset: str = "digits", report: bool = False) -> list[dict]:
    """Train the scenario on `dataset` into `folder/run` and diagnose it: its ranked findings. The
    report's figures are drawn only with `report` (they cost more than the diagnosis)."""
    from dragontrainer import train
    from dragontrainer.monitor.diagnose import diagnose
    from dragontrainer.train.outcomes import TrainingDiverged

    x, y = DATASETS[dataset]()
    if scenario.problem:
        x, y = PROBLEMS[scenario.problem](x, y)
    data = write(dataset, folder / "data", x, y) if dataset != "digits" or scenario.problem else []
    overrides = [*BASE[dataset], *data, *scenario.overrides, f"run.dir={folder / 'run'}", f"monitor.report={report}"]
    with contextlib.suppress(TrainingDiverged):  # a diverged run is diagnosed like any other
        train(overrides=overrides)
    return [f.to_dict() for f in diagnose(folder / "run")]


def problems(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["severity"] in ("error", "warning")]


def verdict(scenario: Scenario, findings: list[dict]) -> bool:
    """A broken run: its first problem names the cause. A healthy run: no problem at all."""
    found = problems(findings)
    if not scenario.expect:
        return not found
    return bool(found) and found[0]["key"] in scenario.expect


def markdown_table(outcomes: dict[tuple[str, str], tuple[bool, str]]) -> str:
    """Scenario rows, data-set columns: ✓, or ✗ with the first problem found (— for none)."""
    datasets = [d for d in DATASETS if any(key[0] == d for key in outcomes)]
    lines = [f"| scenario | {' | '.join(datasets)} |", f"|---|{'---|' * len(datasets)}"]
    for scenario in SCENARIOS:
        cells = [outcomes.get((d, scenario.name)) for d in datasets]
        if any(cells):
            shown = ["" if c is None else "✓" if c[0] else f"✗ {c[1] or '—'}" for c in cells]
            lines.append(f"| {scenario.name} | {' | '.join(shown)} |")
    return "\n".join(lines)


def score(cases: list[tuple[str, Scenario]], diagnosed: Callable[[str, Scenario], list[dict]]) -> None:
    """Print every case's findings and, at the end, the top-finding accuracy, the false alarms and a
    markdown table of every case (for README)."""
    broken = hits = healthy = alarms = 0
    outcomes: dict[tuple[str, str], tuple[bool, str]] = {}
    for dataset, scenario in cases:
        started = time.perf_counter()
        found = diagnosed(dataset, scenario)
        ok = verdict(scenario, found)
        outcomes[dataset, scenario.name] = (ok, problems(found)[0]["key"] if problems(found) else "")
        broken, hits = broken + bool(scenario.expect), hits + (ok and bool(scenario.expect))
        healthy, alarms = healthy + (not scenario.expect), alarms + (not ok and not scenario.expect)
        print(f"== {dataset}/{scenario.name} ({time.perf_counter() - started:.1f} s) {'OK' if ok else 'MISSED'}")
        for f in found:
            print(f"   {f['severity']:7} {'  ↳ ' if f.get('because') else ''}{f['key']}: {f['verdict']}")
        sys.stdout.flush()
    rate = hits / broken if broken else math.nan
    print(f"\ntop finding names the cause: {hits}/{broken} broken runs ({rate:.0%}); "
          f"false alarms: {alarms}/{healthy} healthy runs\n\n{markdown_table(outcomes)}")  # fmt: skip


def main(argv: list[str]) -> None:
    """`--all [--part I/N] [--keep DIR]`: the matrix, or its I-th of N interleaved parts; `--rediagnose DIR`:
    the kept run folders diagnosed again (after a rule changed); else `dataset/name` cases."""
    options = {flag: argv[argv.index(flag) + 1] for flag in ("--part", "--keep", "--rediagnose") if flag in argv}
    names = [a for a in argv if a.count("/") == 1 and not a.startswith("-") and a not in options.values()]
    index, parts = map(int, options.get("--part", "0/1").split("/"))
    if "--rediagnose" in options:
        from dragontrainer.monitor.diagnose import diagnose

        kept = Path(options["--rediagnose"])
        found = [(d, s) for d, s in CASES if (kept / f"{d}_{s.name}" / "trained").exists()]
        score(found, lambda d, s: [f.to_dict() for f in diagnose(kept / f"{d}_{s.name}" / "run")])
        return
    cases = [(a.split("/")[0], BY_NAME[a.split("/")[1]]) for a in names] or CASES[index::parts]

    def trained(dataset: str, scenario: Scenario) -> list[dict]:
        if "--keep" in options:
            folder = Path(options["--keep"]) / f"{dataset}_{scenario.name}"
            if (folder / "trained").exists():  # kept by an earlier call: a killed matrix continues
                from dragontrainer.monitor.diagnose import diagnose

                return [f.to_dict() for f in diagnose(folder / "run")]
            if folder.exists() and {p.name for p in folder.iterdir()} <= {"data", "run"}:
                shutil.rmtree(folder)  # this script's own unfinished folder; anything else is refused
            found = run_scenario(scenario, folder, dataset)
            (folder / "trained").touch()
            return found
        with tempfile.TemporaryDirectory() as tmp:
            return run_scenario(scenario, Path(tmp), dataset)

    score(cases, trained)


if __name__ == "__main__":
    main(sys.argv[1:])
