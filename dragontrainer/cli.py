"""`dragon`: the command line. Each handler parses, calls the Python API, prints; errors are one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dragontrainer.console import printable, text
from dragontrainer.errors import DragonError, RecipeError

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, also after flags (`train --json train.epochs=6`)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.items = [*args.items, *extra]
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    with warnings.catch_warnings(record=True) as caught:
        # a library's warning (torch, Pillow) must never come before our error line: held until the end
        warnings.simplefilter("default")
        code = run_handler(args)
    caught = [w for w in caught if not internal_deprecation(w)]
    if code in (0, 1) and caught:
        for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            print(f"dragon: note: a library warned: {printable(' '.join(message.split()))[:300]}", file=sys.stderr)
    return code


def internal_deprecation(warning: warnings.WarningMessage) -> bool:
    """torch warning about its own deprecated internals (torch.compile imports them): nothing a user can change."""
    return issubclass(warning.category, DeprecationWarning) and f"{os.sep}torch{os.sep}" in warning.filename


def run_handler(args: argparse.Namespace) -> int:
    """The command, with the one-line error policy: bad input (DragonError) exit 2; running out of
    memory exit 2 with what to change; anything else is a bug: `internal error`, exit 1."""
    try:
        return args.handler(args)
    except DragonError as exc:
        print(f"dragon: error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return USAGE_ERROR
    except MemoryError:
        if args.debug:
            raise
        print(
            "dragon: error: out of memory; use smaller images (data.image_size), a smaller model (model.widths) "
            "or a smaller batch (train.batch_size)",
            file=sys.stderr,
        )
        return USAGE_ERROR
    except BrokenPipeError:  # `dragon components | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush either
        return 0
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(
            f"dragon: internal error: {type(exc).__name__}: {printable(exc)[:500]} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("dragon: interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with our error form: one line `dragon: error: ...`, exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        where = "" if self.prog == "dragon" else f"{self.prog.removeprefix('dragon ')}: "
        self.exit(USAGE_ERROR, f"dragon: error: {where}{message}\n")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value[:50]!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dragon", description="Train CNNs with the folklore built in.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"dragon {version_string()}")
    parser.set_defaults(command=None, debug=False)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

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
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train with N ranks on this machine (DistributedDataParallel via torchrun)")  # fmt: skip

    p = command("resume", cmd_resume, "continue a stopped run: dragon resume RUN [train.epochs=N]")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("items", nargs="*", metavar="train.epochs=N", help="lengthen the run (or change early stopping)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="continue with N ranks (any number, whatever the run started with)")  # fmt: skip

    p = command("eval", cmd_eval, "score a run's best weights (its test/val split, or --data)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--data", help="a dataset path (.npz, class folders, IDX or CIFAR folder)")
    p.add_argument("--source", help="data source, when it cannot be guessed from --data")
    p.add_argument(
        "--part",
        default="test",
        choices=["train", "test", "all"],
        help="MNIST/CIFAR part of --data (default: the official test files)",
    )
    p.add_argument("--json", action="store_true")

    p = command("predict", cmd_predict, "class and probability for each image file")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("files", nargs="+", metavar="FILE|DIR|GLOB", help="images, folders (recursive) or globs")
    p.add_argument("--csv", action="store_true", help="print a CSV table (file, class, probability, top-k)")
    p.add_argument("--top", type=positive_int, default=3, help="how many classes to list per image")
    p.add_argument("--json", action="store_true")

    p = command("export", cmd_export, "the run's model with its preprocessing as one file (uint8 images in)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "safetensors"])
    p.add_argument("--out", metavar="FILE", help="output file (default RUN/model.onnx, ...); never overwritten")
    p.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"],
                   help="input images N×H×W×C (default, as PIL/NumPy give) or N×C×H×W")  # fmt: skip

    p = command("compare", cmd_compare, "the same recipe once per value: dragon compare [recipe.yaml] KEY=v1,v2 ...")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | KEY=v1,v2,... | key=value")
    p.add_argument("--resume", metavar="DIR", help="continue the comparison in DIR (as recorded in DIR/compare.json)")
    p.add_argument("--seeds", type=positive_int, default=1, help="runs per value, with seeds seed, seed+1, ...")
    p.add_argument("--out", help="comparison folder (default compare/<keys>-<hash>: the same command continues it)")
    p.add_argument("--target", type=float, default=0.95, help="accuracy for the 'epochs to target' column")
    p.add_argument("--zip", action="store_true", help="pair the i-th values of every key instead of all combinations")
    p.add_argument("--json", action="store_true", help="print summary.json's runs as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("search", cmd_search, "hyperparameter search: dragon search [recipe.yaml] space.yaml [key=value ...]")
    p.add_argument("items", nargs="+", metavar="recipe.yaml | space.yaml | key=value")
    p.add_argument("--trials", type=int, default=20, help="trials per stage (default 20)")
    p.add_argument("--stages", type=int, default=1, help="coarse-to-fine stages: each narrows the ranges (default 1)")
    p.add_argument("--folds", type=int, default=1, help="score each trial as the mean over K stratified folds")
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    p.add_argument("--storage", help="study storage URL (default: sqlite in the search folder; postgresql://...)")
    p.add_argument("--out", help="search folder (default search/<space>-<hash of the settings>); rerun to continue")
    p.add_argument("--sampler", default="random", choices=["random", "tpe", "qmc"])
    p.add_argument("--pruner", default="halving", choices=["none", "median", "halving", "hyperband"])
    p.add_argument("--top-k", type=int, default=5, help="trials that narrow the next stage and are checked at borders")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--json", action="store_true", help="print trials.json's trials as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = command("doctor", cmd_doctor, "pre-flight checks of a recipe: dragon doctor [recipe.yaml] [key=value ...]")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON line")

    p = command("report", cmd_report, "diagnose a run folder again: findings.json and report.html")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print the findings as one JSON line")

    p = command("lr-find", cmd_lr_find, "learning-rate range test: dragon lr-find [recipe.yaml] [key=value ...]")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--repeats", type=int, help="sweeps with different seeds and data orders (default 3)")
    p.add_argument("--apply", metavar="FILE", help="write the suggestion as optim.lr into this recipe file")
    p.add_argument("--out", help="folder for lr_find.png and lr_find.json (default lr-find/<time>)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")

    p = command("ensemble", cmd_ensemble, "combine trained models: dragon ensemble RUN... [--search DIR]")
    p.add_argument("members", nargs="*", metavar="RUN", help="run folders, comparison folders or folders of runs")
    p.add_argument("--search", metavar="DIR", help="a dragon search folder: its best trials become members")
    p.add_argument("--top", type=int, default=5, help="how many trials of --search (default 5)")
    p.add_argument("--snapshots", metavar="RUN", action="append", default=[], help="a run's snapshots as members")
    p.add_argument("--combine", default="mean", choices=["mean", "logit", "vote"], help="default: mean probability")
    p.add_argument("--fit-weights", action="store_true", help="member weights fitted on the validation split")
    p.add_argument("--data", help="score on this dataset instead of the members' common held-out split")
    p.add_argument("--source", help="data source of --data, when it cannot be guessed")
    p.add_argument("--part", default="all", choices=["train", "test", "all"], help="MNIST/CIFAR part of --data")
    p.add_argument("--out", help="ensemble folder (default ensembles/<time>); the same --out continues a killed one")
    p.add_argument("--json", action="store_true", help="print ensemble.json's summary as one JSON line")
    p.add_argument("--quiet", action="store_true")

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

    p = command("cache", cmd_cache, "decode an image folder into the decoded cache: dragon cache [recipe.yaml] [k=v]")
    p.add_argument("items", nargs="*", metavar="recipe.yaml | key=value")
    p.add_argument("--json", action="store_true", help="print where the cache is and what it holds as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("components", cmd_components, "list every registered component by kind, one line each")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="the full description of each component")
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
    from dragontrainer.train.outcomes import TrainingDiverged, TrainingInterrupted

    path, overrides = split_items(args.items)
    recipe = Recipe.load(path, [*overrides, *(["train.deterministic=true"] if args.deterministic else [])])
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    if args.nproc is not None and args.nproc > 1:
        return launch_ranks(["train", *args.items], args, recipe.train.device)
    try:
        result = train(recipe, progress=not args.quiet, console=Console(stderr=True, quiet=args.quiet))
    except TrainingInterrupted as exc:
        say_once(f"dragon: {exc}")
        return exc.exit_code
    except TrainingDiverged as exc:
        say_once(f"dragon: {exc}")
        return 1
    print_result(result, as_json=args.json)
    return 0


def say_once(message: str) -> None:
    """A run's outcome on stderr, from rank 0 alone when several ranks run it."""
    from dragontrainer.train.distributed import is_follower

    if not is_follower():
        print(message, file=sys.stderr)


def launch_ranks(command: list[str], args: argparse.Namespace, device: str) -> int:
    """`--nproc N`: the same command as N ranks under torchrun (standalone); torchrun's exit code."""
    from dragontrainer.train.distributed import check_nproc, launch

    check_nproc(args.nproc, device)
    flags = [f"--{name}" for name in ("json", "quiet", "deterministic", "debug") if getattr(args, name, False)]
    return launch([*command, *flags], args.nproc)


def cmd_resume(args: argparse.Namespace) -> int:
    from dragontrainer.api import RunFinished, resume
    from dragontrainer.run import RunDir
    from dragontrainer.train.distributed import is_follower
    from dragontrainer.train.outcomes import TrainingDiverged, TrainingInterrupted

    if args.nproc is not None and args.nproc > 1:
        device = RunDir.open(args.run_dir).recipe().train.device
        return launch_ranks(["resume", args.run_dir, *args.items], args, device)
    try:
        result = resume(
            args.run_dir, args.items, progress=not args.quiet, console=Console(stderr=True, quiet=args.quiet)
        )
    except RunFinished as exc:
        say_once(f"dragon: {exc}")
        if args.json and not is_follower():
            print(json.dumps(exc.summary))
        return 0
    except TrainingInterrupted as exc:
        say_once(f"dragon: {exc}")
        return exc.exit_code
    except TrainingDiverged as exc:
        say_once(f"dragon: {exc}")
        return 1
    print_result(result, as_json=args.json)
    return 0


def print_result(result: Any, *, as_json: bool) -> None:
    from dragontrainer.train.distributed import is_follower

    if is_follower():
        return  # several ranks: rank 0 prints the result
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
    rows = [{"file": p.file, "class": p.label, "probability": p.probability, "top": p.top} for p in predictions]
    if args.json:
        print(json.dumps(rows))
    elif args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "class", "probability", *(f"top{i + 1}" for i in range(args.top))])
        for p in predictions:
            writer.writerow([printable(p.file), printable(p.label), f"{p.probability:.6f}",
                             *(f"{printable(c)}:{v:.6f}" for c, v in p.top)])  # fmt: skip
    else:
        table = Table("file", "class", "probability", f"top {args.top}")
        for p in predictions:
            others = ", ".join(f"{printable(c)} {v:.2f}" for c, v in p.top)
            table.add_row(text(p.file), text(p.label), f"{p.probability:.4f}", text(others))
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)  # piped: never cut
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dragontrainer.export import export_run

    path = export_run(args.run_dir, args.format, args.out, layout=args.layout)
    print(f"exported {args.format} to {path} (input: uint8 {args.layout.upper()} images; output: class probabilities)")
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
            console.print(f"{marks[check.status]}  [bold]{check.name}[/]: {text(check.message)}", soft_wrap=True)
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
    console.print(f"report: {text(page)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dragontrainer.recipe import Recipe
    from dragontrainer.study.compare import ComparisonInterrupted, compare, parse_sweeps, resume_comparison
    from dragontrainer.study.compare_page import print_table, row_dict

    try:
        if args.resume:
            if args.items or args.out:
                raise RecipeError("dragon compare --resume DIR takes no other sweeps, overrides or --out")
            out, rows = resume_comparison(Path(args.resume), progress=not args.quiet)
        else:
            path, items = split_items(args.items)
            sweeps, fixed = parse_sweeps(items)
            base = Recipe.load(path, fixed)
            out, rows = compare(base, sweeps, seeds=args.seeds, out=Path(args.out) if args.out else None,
                                target_accuracy=args.target, zip_values=args.zip, progress=not args.quiet)  # fmt: skip
    except ComparisonInterrupted as exc:
        print(f"dragon: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"out": str(out), "runs": [row_dict(r) for r in rows]}))
    else:
        print_table(rows, Console())
        print(f"comparison folder {out} (index.html, curves.png, summary.csv)")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    import time

    from dragontrainer.monitor.lr_finder import apply_to_recipe_file, lr_find

    path, overrides = split_items(args.items)
    if args.repeats is not None and args.repeats < 1:
        raise RecipeError(f"--repeats must be at least 1, got {args.repeats}")
    out = Path(args.out) if args.out else Path("lr-find") / time.strftime("%Y%m%d-%H%M%S")
    result = lr_find(path, overrides, repeats=args.repeats, out=out, progress=not args.json)
    if args.apply:
        apply_to_recipe_file(Path(args.apply), result.chosen)
    if args.json:
        record = result.to_dict()
        record.pop("sweeps")
        print(json.dumps({**record, "out": str(out)}))
        return 0
    console = Console(highlight=False)
    console.print(escape(result.describe()))
    console.print(f"plot {escape(str(out / 'lr_find.png'))}" + (f"; wrote optim.lr into {escape(args.apply)}"
                                                                  if args.apply else ""))  # fmt: skip
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from dragontrainer.study.ensemble import ensemble, print_table

    if args.top < 1:
        raise RecipeError(f"--top must be at least 1, got {args.top}")
    result = ensemble(
        args.members, search=args.search, top=args.top, snapshots=args.snapshots, combine_method=args.combine,
        fit_weights_on_val=args.fit_weights, data=args.data, source=args.source, part=args.part, out=args.out,
        progress=not (args.quiet or args.json),
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    print_table(result, Console(highlight=False))
    print(f"ensemble folder {result.out} (ensemble.json, index.html); dragon eval / predict accept it")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from dragontrainer.study.search import search
    from dragontrainer.study.search_page import print_summary
    from dragontrainer.study.worker import SearchSettings
    from dragontrainer.train.outcomes import TrainingInterrupted

    files = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if not 1 <= len(files) <= 2:
        raise RecipeError("dragon search: give [recipe.yaml] space.yaml, then any key=value overrides")
    recipe, space = (None, files[0]) if len(files) == 1 else files
    console = Console(stderr=True, quiet=args.quiet)
    try:
        result = search(recipe, space, overrides=overrides, trials=args.trials, stages=args.stages, folds=args.folds,
                        workers=args.workers, storage=args.storage, out=args.out, sampler=args.sampler,
                        pruner=args.pruner, seed=args.seed, top_k=args.top_k, progress=not args.quiet,
                        console=console)  # fmt: skip
    except TrainingInterrupted as exc:
        print(f"dragon: search interrupted ({exc}); run the same command to continue the search", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"out": str(result.out), "warnings": result.warnings, "trials": result.trials}))
    else:
        settings = SearchSettings(**json.loads((result.out / "search.json").read_text(encoding="utf-8")))
        print_summary(result, settings, Console(highlight=False))
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


def cmd_cache(args: argparse.Namespace) -> int:
    """What a streamed run does first, ahead of time (e.g. once before a search or on a data machine)."""
    from dragontrainer.data.residency import cache_images
    from dragontrainer.recipe import Recipe
    from dragontrainer.resources import gib

    path, overrides = split_items(args.items)
    decoded = cache_images(Recipe.load(path, overrides).data, console=Console(stderr=True, quiet=args.quiet))
    record = {"cache": str(decoded.path), "shape": list(decoded.images.shape), "bytes": decoded.images.nbytes,
              "decoded": decoded.decoded}  # fmt: skip
    if args.json:
        print(json.dumps(record))
        return 0
    what = f"decoded {decoded.decoded:,} images" if decoded.decoded else "reused: the folder is unchanged"
    shape = "×".join(map(str, decoded.images.shape))
    print(f"{printable(decoded.path)}: {shape} uint8 ({gib(decoded.images.nbytes)}); {what}")
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
    if args.verbose:
        table = Table("kind", "name", "what it does")
        for kind, entries in components.items():
            for name, description in entries.items():
                table.add_row(kind, name, escape(description))
        Console().print(table)
        return 0
    kind_width = max(map(len, components))
    name_width = max(len(name) for entries in components.values() for name in entries)
    for kind, entries in components.items():
        for name, description in entries.items():
            print(f"{kind:<{kind_width}}  {name:<{name_width}}  {short_description(description)}")
    return 0


def short_description(description: str, limit: int = 80) -> str:
    """The description clipped at a word to `limit` characters: one line per component."""
    if len(description) <= limit:
        return description
    return description[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:(") + "…"


def version_string() -> str:
    from dragontrainer.version import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
