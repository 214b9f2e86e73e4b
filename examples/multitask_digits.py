"""The README's multi-task table: digit class (main task) + parity ("is odd") + ">= 5" on little data.

    PYTHONPATH=$PWD .venv/bin/python examples/multitask_digits.py --out /tmp/multitask-demo [--seeds 3]

The training pool keeps `--per-class` images of each digit; the rest is a held-out test set. Each method
trains the same small VGG: the main task alone, hard parameter sharing (one trunk, three heads) and soft
parameter sharing (three towers tied by an L2 penalty). Prints a Markdown table: test accuracy of the
main task (mean ± std over seeds) and of the auxiliary tasks. Runs are ordinary run folders under --out;
finished ones are reused when the script runs again.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from dragontrainer import evaluate_run, train

MODEL = ["model.name=vgg", "model.widths=[32,64]", "monitor.report=false"]
TASKS = "multitask.tasks=[digit, odd, ge5]"
METHODS = {
    "single task (digit only)": [],
    "hard sharing, 3 tasks": [TASKS],
    "soft sharing, λ=1e-3": [TASKS, "multitask.sharing=soft", "multitask.soft_strength=1e-3"],
}


def write_data(out: Path, per_class: int) -> dict[str, Path]:
    """digits-train-tasks.npz (y_digit, y_odd, y_ge5), digits-train.npz (y: the digit), and the test files."""
    digits = load_digits()
    x = (digits.images * 255 / 16).round().astype(np.uint8)
    y = digits.target
    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)])
    parts = {"train": np.sort(pool), "test": np.setdiff1d(np.arange(len(y)), pool)}
    paths = {}
    for name, index in parts.items():
        labels = y[index]
        tasks = {"y_digit": labels, "y_odd": labels % 2, "y_ge5": (labels >= 5).astype(np.int64)}
        np.savez(out / f"digits-{name}-tasks.npz", x=x[index], **tasks,
                 classes_odd=np.array(["even", "odd"]), classes_ge5=np.array(["<5", ">=5"]))  # fmt: skip
        np.savez(out / f"digits-{name}.npz", x=x[index], y=labels)
        paths[name], paths[f"{name}-tasks"] = out / f"digits-{name}.npz", out / f"digits-{name}-tasks.npz"
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("multitask-demo"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_data(args.out, args.per_class)
    print(f"{args.per_class} training images per digit (val split from them), "
          f"{len(np.load(paths['test'])['y'])} test images, {args.seeds} seeds")  # fmt: skip
    print("| method | digit (main) test accuracy | odd | >= 5 |")
    print("|---|---|---|---|")
    for number, (label, overrides) in enumerate(METHODS.items()):
        data = "train-tasks" if overrides else "train"
        main_scores, odd, ge5 = [], [], []
        for seed in range(args.seeds):
            run_dir = args.out / f"method{number}-seed{seed}"
            if not (run_dir / "result.json").is_file():
                run = [f"seed={seed}", f"train.epochs={args.epochs}", f"run.dir={run_dir}"]
                data_path = ["data.source=npz", f"data.path={paths[data]}"]
                train(overrides=[*MODEL, *data_path, *run, *overrides], progress=False)
            metrics = evaluate_run(run_dir, paths["test-tasks" if overrides else "test"])
            main_scores.append(metrics["accuracy"])
            if "tasks" in metrics:
                odd.append(metrics["tasks"]["odd"]["accuracy"])
                ge5.append(metrics["tasks"]["ge5"]["accuracy"])
        cells = [f"{statistics.mean(main_scores):.1%} ± {statistics.pstdev(main_scores):.1%}"]
        cells += [f"{statistics.mean(scores):.1%}" if scores else "—" for scores in (odd, ge5)]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
