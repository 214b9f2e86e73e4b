"""The README's transfer demonstration: pretrain on digits 0–4, fine-tune to digits 5–9 with 10 training
images per class; every `dragon finetune` strategy against training from scratch, and the `auto` choice.

    PYTHONPATH=$PWD .venv/bin/python examples/transfer_digits.py --out /tmp/transfer-demo [--epochs 30]

Prints a Markdown table (test accuracy on the held-out 5–9 images). Every run is an ordinary run
folder under --out, and the script continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from dragontrainer import finetune, train
from dragontrainer.recipe import Recipe

MODEL = ["model.name=vgg", "model.widths=[32,64]", "model.depth=2"]


def write_halves(out: Path) -> tuple[Path, Path]:
    """digits 0–4 and 5–9 as npz files (labels 0..4, class names kept)."""
    digits = load_digits()
    x = (digits.images * 255 / 16).round().astype(np.uint8)
    paths = []
    for name, low in (("digits0-4", 0), ("digits5-9", 5)):
        keep = (digits.target >= low) & (digits.target < low + 5)
        path = out / f"{name}.npz"
        np.savez(path, x=x[keep], y=digits.target[keep] - low, classes=np.array([str(c) for c in range(low, low + 5)]))
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("transfer-demo"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source_data, target_data = write_halves(args.out)
    common = [*MODEL, f"seed={args.seed}", "monitor.report=false"]
    source_dir = args.out / "source"
    if not (source_dir / "result.json").is_file():
        train(overrides=[*common, "data.source=npz", f"data.path={source_data}", f"run.dir={source_dir}",
                         f"train.epochs={args.epochs}"])  # fmt: skip
    # ~903 images of 5–9: 10 per class for training, the rest split between validation and test
    target = [*common, "data.source=npz", f"data.path={target_data}", "data.val_fraction=0.47",
              "data.test_fraction=0.474", f"train.epochs={args.epochs}", "train.batch_size=16",
              "optim.lr=0.05", "optim.lr_scaling=none", "schedule.warmup_epochs=1"]  # fmt: skip
    rows = []
    scratch_dir = args.out / "scratch"
    if (scratch_dir / "result.json").is_file():
        scratch = json.loads((scratch_dir / "result.json").read_text())
    else:
        scratch = train(overrides=[*target, f"run.dir={scratch_dir}"]).summary()
    train_images = Recipe.load(overrides=target)  # noqa: F841 (validated like the studies' recipes)
    rows.append(("scratch (same recipe, random init)", scratch["best_val_accuracy"], scratch["test_accuracy"]))
    for strategy in ("linear", "top", "full", "auto"):
        result = finetune(source_dir, None, target, strategy=strategy, out=args.out / f"finetune-{strategy}")
        last = result.stages[-1]
        label = f"{strategy} -> {result.strategy}" if strategy == "auto" else strategy
        rows.append((f"{label} (run)", last.best_val_accuracy, last.test_accuracy))
        if strategy == "linear":
            for probe in sorted(result.probes, key=lambda p: -p["val_accuracy"])[:3]:
                rows.append((f"linear: {probe['classifier']} on {probe['features']}", probe["val_accuracy"],
                             probe["test_accuracy"]))  # fmt: skip
        if strategy == "auto":
            print("\n".join(result.reasoning))
    print("| method | val accuracy | test accuracy |\n|---|---|---|")
    for name, val, test in rows:
        print(f"| {name} | {val:.1%} | {test:.1%} |")


if __name__ == "__main__":
    main()
