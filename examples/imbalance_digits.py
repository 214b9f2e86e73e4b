"""The README's class-imbalance table: digits made 10:1 imbalanced (classes 5–9 keep a tenth of their
training images), each `data.balance` mode scored on a balanced held-out test set.

    PYTHONPATH=$PWD .venv/bin/python examples/imbalance_digits.py --out /tmp/imbalance-demo [--seeds 3]

Prints a Markdown table: mean over seeds of test accuracy, balanced accuracy, mean recall of the
minority classes (5–9) and of the majority classes (0–4). Runs are ordinary run folders under --out;
finished ones are reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from dragontrainer import evaluate_run, train

MODEL = ["model.name=vgg", "model.widths=[32,64]"]  # the default recipe with a smaller VGG (2-core CPU)
METHODS = {
    "none": [],
    "class_weights": ["data.balance=class_weights"],
    "oversample": ["data.balance=oversample"],
    "undersample": ["data.balance=undersample"],
    "two_stage": ["data.balance=two_stage"],
    "oversample + rare_class_boost=0.5": ["data.balance=oversample", "augment.rare_class_boost=0.5"],
}


def write_data(out: Path, test_per_class: int = 40, ratio: int = 10) -> tuple[Path, Path]:
    digits = load_digits()
    x = (digits.images * 255 / 16).round().astype(np.uint8)
    y = digits.target
    rng = np.random.default_rng(0)
    train_index, test_index = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(y == c))
        test_index += members[:test_per_class].tolist()
        rest = members[test_per_class:]
        train_index += (rest if c < 5 else rest[: len(rest) // ratio]).tolist()
    paths = []
    for name, index in (("train", train_index), ("test", test_index)):
        path = out / f"digits-{name}.npz"
        np.savez(path, x=x[index], y=y[index])
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("imbalance-demo"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = write_data(args.out)
    counts = np.bincount(np.load(train_data)["y"])
    print(f"training pool per class: {counts.tolist()}")
    print("| method | test accuracy | balanced accuracy | minority recall (5–9) | majority recall (0–4) |")
    print("|---|---|---|---|---|")
    for label, overrides in METHODS.items():
        scores = []
        for seed in range(args.seeds):
            run_dir = args.out / f"{label.split(' ')[0]}{'-boost' if 'boost' in label else ''}-seed{seed}"
            if not (run_dir / "result.json").is_file():
                train(overrides=[*MODEL, "data.source=npz", f"data.path={train_data}", f"seed={seed}",
                                 f"train.epochs={args.epochs}", f"run.dir={run_dir}", "monitor.report=false",
                                 *overrides])  # fmt: skip
            metrics = evaluate_run(run_dir, test_data)
            recall = [row["recall"] for row in metrics["per_class"]]
            scores.append((metrics["accuracy"], metrics["balanced_accuracy"], np.mean(recall[5:]), np.mean(recall[:5])))
        means = [statistics.mean(column) for column in zip(*scores, strict=True)]
        print(f"| {label} | " + " | ".join(f"{m:.1%}" for m in means) + " |", flush=True)
    (args.out / "done.json").write_text(json.dumps({"seeds": args.seeds}))


if __name__ == "__main__":
    main()
