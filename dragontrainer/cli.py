"""`dragon`: the command line. Each handler parses, calls the Python API, prints; errors are one line."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dragontrainer.errors import DragonError, RecipeError

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        return args.handler(args)
    except DragonError as exc:
        print(f"dragon: error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return USAGE_ERROR
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(
            f"dragon: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("dragon: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dragon", description="Train CNNs with the folklore built in.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(command=None, debug=False)
    sub = parser.add_subparsers(dest="command")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.set_defaults(handler=handler)
        return p

    p = command("train", cmd_train, "train a recipe: dragon train [recipe.yaml] [dotted.key=value ...]")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last line of stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--deterministic", action="store_true", help="same as train.deterministic=true")

    p = command("resume", cmd_resume, "continue a stopped run from its last checkpoint")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = command("eval", cmd_eval, "score a run's best weights (its test/val split, or --data)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--data", help="a dataset path (.npz, class folders, IDX or CIFAR folder)")
    p.add_argument("--source", help="data source, when it cannot be guessed from --data")
    p.add_argument("--part", default="all", choices=["train", "test", "all"], help="MNIST/CIFAR part of --data")
    p.add_argument("--json", action="store_true")

    p = command("predict", cmd_predict, "class and probability for each image file")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--top", type=int, default=3, help="how many classes to list per image")
    p.add_argument("--json", action="store_true")

    p = command("compare", cmd_compare, "the same recipe once per value: dragon compare [recipe.yaml] KEY=v1,v2 ...")
    p.add_argument("items", nargs="+", metavar="recipe.yaml | KEY=v1,v2,... | key=value")
    p.add_argument("--seeds", type=int, default=1, help="runs per value, with seeds seed, seed+1, ...")
    p.add_argument("--out", help="comparison folder (default compare/<time>)")
    p.add_argument("--target", type=float, default=0.95, help="accuracy for the 'epochs to target' column")
    p.add_argument("--zip", action="store_true", help="pair the i-th values of every key instead of all combinations")
    p.add_argument("--json", action="store_true", help="print summary.json's runs as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("doctor", cmd_doctor, "pre-flight checks of a recipe: dragon doctor [recipe.yaml] [key=value ...]")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON line")

    p = command("report", cmd_report, "diagnose a run folder again: findings.json and report.html")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print the findings as one JSON line")

    p = command(
        "finetune", cmd_finetune,
        "transfer learning: dragon finetune SOURCE [recipe.yaml] [key=value ...] [--strategy auto|linear|top|full]",
    )  # fmt: skip
    p.add_argument("source", metavar="SOURCE", help="a run folder or a weights file (.safetensors, .pt, .pth)")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--strategy", default="auto", choices=["auto", "linear", "top", "full"])
    p.add_argument("--out", help="study folder (default finetune/<source>-<strategy>); the same command resumes")
    p.add_argument("--json", action="store_true", help="print summary.json as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("components", cmd_components, "list every registered component by kind")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="the README catalogue section")
    return parser


def split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first item is a recipe file unless it looks like key=value."""
    if items and "=" not in items[0]:
        first = items[0]
        if not Path(first).exists() and not first.endswith((".yaml", ".yml")):
            raise RecipeError(f"{first}: neither a recipe file nor a dotted.key=value override (e.g. {first}=...)")
        return first, list(items[1:])
    return None, list(items)


def cmd_train(args: argparse.Namespace) -> int:
    from dragontrainer.api import train
    from dragontrainer.recipe import Recipe
    from dragontrainer.train.loop import TrainingDiverged, TrainingInterrupted

    path, overrides = split_items(args.items)
    recipe = Recipe.load(path, [*overrides, *(["train.deterministic=true"] if args.deterministic else [])])
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    try:
        result = train(recipe, progress=not args.quiet, console=Console(stderr=True, quiet=args.quiet))
    except TrainingInterrupted as exc:
        print(f"dragon: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        print(f"dragon: {exc}", file=sys.stderr)
        return 1
    print_result(result, as_json=args.json)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from dragontrainer.api import resume
    from dragontrainer.train.loop import TrainingDiverged, TrainingInterrupted

    try:
        result = resume(args.run_dir, progress=not args.quiet, console=Console(stderr=True, quiet=args.quiet))
    except TrainingInterrupted as exc:
        print(f"dragon: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        print(f"dragon: {exc}", file=sys.stderr)
        return 1
    print_result(result, as_json=args.json)
    return 0


def print_result(result: Any, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.summary()))
        return
    print(
        f"final validation accuracy {result.val_accuracy:.2%} (loss {result.val_loss:.4f}); "
        f"best {result.best_val_accuracy:.2%} at epoch {result.best_epoch}"
        + (f"; test accuracy {result.test_accuracy:.2%}" if result.test_accuracy is not None else "")
    )
    if result.stop_reason:
        print(result.stop_reason)
    print(
        f"{result.epochs} epochs in {result.seconds:.1f} s, {result.images_per_second:,.0f} images/s; "
        f"run folder {result.run_dir}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from dragontrainer.api import evaluate_run

    metrics = evaluate_run(args.run_dir, args.data, source=args.source, part=args.part)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{metrics['data']}: accuracy {metrics['accuracy']:.2%}, loss {metrics['loss']:.4f} "
            f"on {metrics['images']} images"
        )
        print_per_class(metrics)
    return 0


def print_per_class(metrics: dict[str, Any]) -> None:
    """Balanced accuracy, macro F1 and the per-class table of `dragon eval`."""
    print(f"balanced accuracy {metrics['balanced_accuracy']:.2%}, macro F1 {metrics['macro_f1']:.3f}")
    table = Table("class", "support", "precision", "recall", "F1")
    for row in metrics["per_class"]:
        cells = ["—" if row[k] is None else f"{row[k]:.3f}" for k in ("precision", "recall", "f1")]
        table.add_row(escape(str(row["class"])), str(row["support"]), *cells)
    Console().print(table)


def cmd_predict(args: argparse.Namespace) -> int:
    from dragontrainer.api import predict

    predictions = predict(args.run_dir, args.files, top_k=args.top)
    if args.json:
        print(
            json.dumps(
                [{"file": p.file, "class": p.label, "probability": p.probability, "top": p.top} for p in predictions]
            )
        )
    else:
        for p in predictions:
            print(f"{p.file}\t{p.label}\t{p.probability:.4f}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 1 when a check fails (warnings pass), so scripts can gate training on it."""
    from dragontrainer.api import doctor

    path, overrides = split_items(args.items)
    report = doctor(path, overrides)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        marks = {"pass": "[green]✓ pass[/]", "warn": "[yellow]! warn[/]", "fail": "[red]✗ fail[/]"}
        console = Console(highlight=False)
        for check in report.checks:
            console.print(f"{marks[check.status]}  [bold]{check.name}[/]: {check.message}", soft_wrap=True)
        verdict = "[red]failed[/]" if report.failed else "[green]ready to train[/]"
        console.print(f"{verdict} ({report.seconds:.1f} s)")
    return 1 if report.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from dragontrainer.api import report
    from dragontrainer.monitor.diagnose import print_findings

    page, findings = report(args.run_dir)
    if args.json:
        print(json.dumps([f.to_dict() for f in findings]))
        return 0
    console = Console(highlight=False)
    print_findings(console, findings, with_info=True)
    console.print(f"report: {escape(str(page))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dragontrainer.compare import compare, parse_sweeps, print_table
    from dragontrainer.recipe import Recipe

    path, items = split_items(args.items)
    if args.seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {args.seeds}")
    sweeps, fixed = parse_sweeps(items)
    base = Recipe.load(path, fixed)
    out, rows = compare(base, sweeps, seeds=args.seeds, out=Path(args.out) if args.out else None,
                        target_accuracy=args.target, zip_values=args.zip, progress=not args.quiet)  # fmt: skip
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"out": str(out), "runs": [asdict(r) for r in rows]}))
    else:
        print_table(rows, Console())
        print(f"comparison folder {out} (index.html, curves.png, summary.csv)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from dragontrainer.study.finetune import finetune, print_finetune

    path, overrides = split_items(args.items)
    result = finetune(
        args.source, path, overrides, strategy=args.strategy, out=args.out, progress=not args.quiet,
        console=Console(stderr=True, quiet=args.quiet),
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print_finetune(result, Console())
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    from dragontrainer.registry import all_components

    components = all_components()
    if args.markdown:
        from dragontrainer.registry import components_markdown

        print(components_markdown(), end="")
        return 0
    if args.json:
        print(json.dumps(components, indent=2))
        return 0
    table = Table("kind", "name", "what it does")
    for kind, entries in components.items():
        for name, description in entries.items():
            table.add_row(kind, name, escape(description))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
