"""Throughput of whole epochs: dragontrainer at default settings vs a minimal hand-written PyTorch loop.

Both train the same model (`create_model` of the recipe's model spec) on the same in-memory data with
the same work per step: flip + padded crop, label-smoothed cross-entropy, SGD with Nesterov momentum
and weight decay, a per-step learning rate; and both validate every epoch on the validation split in
eval mode with the same evaluation batch (`train.eval_batch_size`). An epoch is timed WHOLE on both
sides: training, validation and, for dragontrainer, everything it does between epochs (metrics,
checkpoints, monitors), measured from one epoch's end to the next; the first epoch is warm-up and
dropped. The sides alternate `--repeats` times in one process (machine noise hits all alike), each
side's rate is the median over its timed epochs (training images per whole-epoch second).

    python bench/throughput.py --data digits
    python bench/throughput.py --data cifar-shape               # 3×32×32, batch 256, 647K-param VGG
    python bench/throughput.py --data cifar-shape --bf16        # bf16 autocast on both sides

Precision is pinned on both sides (fp32, or bf16 autocast with `--bf16`): `train.precision=auto`
would probe and might pick bf16 for dragontrainer alone.
Sides: `dragon` (defaults, monitors on), `dragon-nomon` (monitors off) and `plain`. The last lines are
`ratio_<side>=<side / plain>`. The C allocator is set up once for the whole process
(dragontrainer/train/allocator.py), so it serves both sides alike; its own effect is measured per
process with `--only SIDE` under `/usr/bin/time -v` and DRAGONTRAINER_MALLOC=system (README).
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dragontrainer import Recipe, train
from dragontrainer.data.sources import load_images
from dragontrainer.nn.models import count_parameters, create_model
from dragontrainer.optim.optimizers import base_lr
from dragontrainer.recipe import TrainSpec
from dragontrainer.report.html import write_report
from dragontrainer.train.allocator import configure_allocator
from dragontrainer.train.callbacks import Callback

SIDES = ("dragon", "dragon-nomon", "plain")
CIFAR_MODEL = ["model.name=vgg", "model.widths=[48,96,192]", "model.depth=2"]  # conv-BN-ReLU, 647K parameters


def make_data(kind: str, images: int, folder: Path) -> list[str]:
    """Recipe overrides for the data: the embedded digits, or a CIFAR-shaped npz file (batch 256)."""
    if kind == "digits":
        return []
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    y = np.arange(images) % 10
    np.savez(folder / "cifar_shape.npz", x=x, y=y)
    return ["data.source=npz", f"data.path={folder / 'cifar_shape.npz'}", "train.batch_size=256", *CIFAR_MODEL]


def precision_override(bf16: bool) -> str:
    """The same arithmetic on both sides: precision pinned (auto could pick bf16 for dragontrainer only),
    in whichever spelling this version's recipe has."""
    if "precision" in TrainSpec.model_fields:
        return f"train.precision={'bf16' if bf16 else 'fp32'}"
    return f"train.amp={'on' if bf16 else 'off'}"


def usage() -> tuple[int, float]:
    """(minor page faults, system seconds) of this process so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_minflt, own.ru_stime


class EpochClock(Callback):
    """Wall time (and faults, system time) at each epoch's end: consecutive differences are whole
    epochs (train + validation + everything between epochs)."""

    def __init__(self, costs: list[tuple[int, float]]) -> None:
        self.ends: list[float] = []
        self.usage: list[tuple[int, float]] = []
        self.costs = costs

    def on_epoch_end(self, state: object, logs: object) -> None:
        self.ends.append(time.perf_counter())
        self.usage.append(usage())
        if len(self.usage) > 1:
            (f0, s0), (f1, s1) = self.usage[-2:]
            self.costs.append((f1 - f0, s1 - s0))


def dragontrainer_rates(recipe: Recipe, wall: list[float], costs: list[tuple[int, float]]) -> list[float]:
    clock = EpochClock(costs)
    started = time.perf_counter()
    result = train(recipe, callbacks=[clock])
    wall.append(time.perf_counter() - started)
    images = [r["images"] for r in result.history if r["split"] == "train"]
    return [n / (b - a) for n, a, b in zip(images[1:], clock.ends, clock.ends[1:], strict=False)]


def minimal_rates(
    recipe: Recipe, device: torch.device, bf16: bool, wall: list[float], costs: list[tuple[int, float]]
) -> list[float]:
    """What a careful person writes by hand: device tensors, sliced batches, no DataLoader; validation
    every epoch in eval mode, one host sync per epoch."""
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    data = load_images(recipe.data)
    x = torch.from_numpy(data.x).float().div(255)
    labels = torch.from_numpy(data.y)
    cut = int(len(x) * (1 - recipe.data.val_fraction))
    x, y, x_val, y_val = x[:cut].to(device), labels[:cut].to(device), x[cut:].to(device), labels[cut:].to(device)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, x_val = (x - mean) / std, (x_val - mean) / std
    channels, size = x.shape[1], x.shape[2]
    model = create_model(recipe.model, in_channels=channels, num_classes=len(data.classes), image_size=size)
    model = model.to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    batch, lr, epochs = recipe.train.batch_size, base_lr(recipe.optim), recipe.train.epochs
    eval_batch = recipe.train.eval_batch_size
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.optim.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    steps = len(x) // batch
    total, warmup = steps * epochs, steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    pad = max(1, round(size / 8))
    flip_p = 0.5 if data.flip_safe else 0.0
    arange = torch.arange(size, device=device)
    rates = []
    for epoch in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, (faults, system) = time.perf_counter(), usage()
        model.train()
        order = torch.randperm(len(x), device=device)
        for i in range(steps):
            index = order[i * batch : (i + 1) * batch]
            xb, yb = x[index], y[index]
            flip = torch.rand(len(xb), device=device) < flip_p
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            padded = F.pad(xb, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
            dy, dx = torch.randint(0, 2 * pad + 1, (2, len(xb), 1), device=device)
            rows, cols = (dy + arange).unsqueeze(2), (dx + arange).unsqueeze(1)
            xb = padded[torch.arange(len(xb), device=device).view(-1, 1, 1), rows, cols].permute(0, 3, 1, 2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=recipe.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        val_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for lo in range(0, len(x_val), eval_batch):
                logits = model(x_val[lo : lo + eval_batch]).float()
                target = y_val[lo : lo + eval_batch]
                val_loss += F.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1)
                correct += (logits.argmax(1) == target).sum()
        val_loss.item(), correct.item()  # the epoch's one host sync
        rates.append(steps * batch / (time.perf_counter() - start))
        if epoch:
            costs.append((usage()[0] - faults, usage()[1] - system))
    wall.append(time.perf_counter() - started)
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "cifar-shape"], default="digits")
    parser.add_argument("--images", type=int, default=5120, help="cifar-shape: number of synthetic images")
    parser.add_argument("--epochs", type=int, default=0, help="0: 6 for digits, 3 for cifar-shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the sides")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on every side")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=SIDES, help="one side, one repeat (for /usr/bin/time -v)")
    args = parser.parse_args()
    sides = [args.only] if args.only else [s.strip() for s in args.sides.split(",")]
    repeats = 1 if args.only else args.repeats
    if args.threads:  # on a busy shared machine, 1 thread per process keeps OpenMP from spinning against others
        torch.set_num_threads(args.threads)
    if "plain" not in sides and not args.only:
        parser.error("--sides must include plain (the ratios are against it)")
    print(f"allocator thresholds set: {configure_allocator()}")  # the same for every side (dragontrainer's default)
    epochs = args.epochs or (6 if args.data == "digits" else 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overrides = [
            *make_data(args.data, args.images, folder),
            f"train.epochs={epochs}",
            f"train.device={args.device}",
            "train.early_stopping.patience=null",
            precision_override(args.bf16),
        ]
        recipe = Recipe.load(overrides=overrides)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        if args.device != "auto":
            device = torch.device(args.device)
        rates: dict[str, list[float]] = {side: [] for side in sides}
        wall: dict[str, list[float]] = {side: [] for side in sides}
        costs: dict[str, list[tuple[int, float]]] = {side: [] for side in sides}
        for repeat in range(repeats):
            for side in sides:
                if side == "plain":
                    rates[side] += minimal_rates(recipe, device, args.bf16, wall[side], costs[side])
                    continue
                run = recipe.with_overrides(
                    {"run.dir": str(folder / f"{side}{repeat}"), "monitor.enabled": side == "dragon"}
                )
                rates[side] += dragontrainer_rates(run, wall[side], costs[side])
        report_seconds = None
        if "dragon" in sides:
            started = time.perf_counter()
            write_report(folder / f"dragon{repeats - 1}")  # a second time: the imports are warm
            report_seconds = time.perf_counter() - started
        shape = load_images(recipe.data).x.shape
    model = create_model(recipe.model, in_channels=shape[1], num_classes=10, image_size=shape[2])
    print(
        f"data={args.data} device={device} model={recipe.model.name} ({count_parameters(model):,} parameters) "
        f"batch={recipe.train.batch_size} eval_batch={recipe.train.eval_batch_size} epochs={epochs} "
        f"precision={'bf16' if args.bf16 else 'fp32'} threads={torch.get_num_threads()} repeats={repeats} "
        f"(n={len(rates[sides[0]])} timed whole epochs per side)"
    )
    for side in sides:
        r = rates[side]
        print(
            f"{side:13s} images/s = {statistics.median(r):,.0f} (median; min {min(r):,.0f}, max {max(r):,.0f}); "
            f"whole run {statistics.median(wall[side]):.2f} s; per epoch "
            f"{statistics.median(c[0] for c in costs[side]):,.0f} minor faults, "
            f"{statistics.median(c[1] for c in costs[side]):.2f} s system time"
        )
    if report_seconds is not None:
        print(f"report.html (findings + figures) for one run, written again: {report_seconds:.2f} s")
    if "plain" in sides:
        plain = statistics.median(rates["plain"])
        for side in sides:
            if side != "plain":
                print(f"ratio_{side}={statistics.median(rates[side]) / plain:.3f}")


if __name__ == "__main__":
    main()
