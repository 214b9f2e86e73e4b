"""Training throughput: dragontrainer's loop at default settings vs a minimal hand-written PyTorch loop.

Both train the same model (the default recipe's) on the same in-memory data with the same work per
step: flip + padded crop, label-smoothed cross-entropy, SGD with Nesterov momentum and weight decay,
a per-step learning rate. Only the training phase is timed on both sides (evaluation excluded), and
the first epoch is dropped as warm-up. The two sides alternate `--repeats` times (machine noise hits
both alike) and each side's rate is the median over all its timed epochs.

    python bench/throughput.py --data digits
    python bench/throughput.py --data cifar-shape          # 3×32×32, batch 128, synthetic pixels

The last line is `ratio=<dragontrainer / minimal>`.

    python bench/throughput.py --data digits --monitor-overhead

alternates dragontrainer with monitors on (the default) and off instead (report off on both sides:
it is drawn once at the end and timed on its own); the last line is `overhead=<1 - on/off>` of
training images/s (wall time of whole runs is printed too).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dragontrainer import Recipe, train
from dragontrainer.data.sources import load_images
from dragontrainer.nn.models import create_model
from dragontrainer.optim.optimizers import base_lr
from dragontrainer.report.html import write_report


def make_data(kind: str, images: int, folder: Path) -> list[str]:
    """Recipe overrides for the data: the embedded digits, or a CIFAR-shaped npz file."""
    if kind == "digits":
        return []
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    y = np.arange(images) % 10
    np.savez(folder / "cifar_shape.npz", x=x, y=y)
    return ["data.source=npz", f"data.path={folder / 'cifar_shape.npz'}"]


def dragontrainer_rates(recipe: Recipe, seconds: list[float] | None = None) -> list[float]:
    result = train(recipe)
    if seconds is not None:
        seconds.append(result.seconds)
    return [r["images_per_second"] for r in result.history if r["split"] == "train"][1:]


def monitor_overhead(recipe: Recipe, folder: Path, repeats: int) -> None:
    """Monitors on vs off, alternating; medians of training images/s and of whole-run seconds."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(repeats):
        for enabled in (True, False):
            run = recipe.with_overrides(
                {"monitor.enabled": enabled, "monitor.report": False, "run.dir": str(folder / f"m{enabled}{repeat}")}
            )
            rates[enabled] += dragontrainer_rates(run, seconds[enabled])
    started = time.perf_counter()
    write_report(folder / f"mTrue{repeats - 1}")
    report_seconds = time.perf_counter() - started
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    wall_on, wall_off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"epochs={recipe.train.epochs} repeats={repeats} (n={len(rates[True])} timed epochs per side)")
    print(f"monitors on  images/s = {on:,.0f}; whole run {wall_on:.2f} s (medians)")
    print(f"monitors off images/s = {off:,.0f}; whole run {wall_off:.2f} s (medians)")
    print(f"report.html (findings + figures) for one run: {report_seconds:.2f} s")
    print(f"wall-time overhead={wall_on / wall_off - 1:.3f}")
    print(f"overhead={1 - on / off:.3f}")


def minimal_rates(recipe: Recipe, device: torch.device) -> list[float]:
    """What a careful person writes by hand: device tensors, sliced batches, no DataLoader."""
    torch.manual_seed(recipe.seed)
    data = load_images(recipe.data)
    x = torch.from_numpy(data.x).float().div(255)
    cut = int(len(x) * (1 - recipe.data.val_fraction))
    x, y = x[:cut].to(device), torch.from_numpy(data.y[:cut]).to(device)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    channels, size = x.shape[1], x.shape[2]
    model = create_model(recipe.model, in_channels=channels, num_classes=len(data.classes), image_size=size)
    model = model.to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    batch, lr, epochs = recipe.train.batch_size, base_lr(recipe.optim), recipe.train.epochs
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
    model.train()
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
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
            loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        loss.item()  # sync
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "cifar-shape"], default="digits")
    parser.add_argument("--images", type=int, default=2560, help="cifar-shape: number of synthetic images")
    parser.add_argument("--epochs", type=int, default=0, help="0: 8 for digits, 3 for cifar-shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the two loops")
    parser.add_argument("--monitor-overhead", action="store_true", help="monitors on vs off instead")
    args = parser.parse_args()
    epochs = args.epochs or (8 if args.data == "digits" else 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overrides = [
            *make_data(args.data, args.images, folder),
            f"train.epochs={epochs}",
            f"train.device={args.device}",
            "train.early_stopping.patience=null",
        ]
        recipe = Recipe.load(overrides=overrides)
        if args.monitor_overhead:
            monitor_overhead(recipe, folder, args.repeats)
            return
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        if args.device != "auto":
            device = torch.device(args.device)
        ours_all: list[float] = []
        theirs_all: list[float] = []
        for repeat in range(args.repeats):
            ours_all += dragontrainer_rates(recipe.with_overrides({"run.dir": str(folder / f"run{repeat}")}))
            theirs_all += minimal_rates(recipe, device)
    ours, theirs = statistics.median(ours_all), statistics.median(theirs_all)
    print(
        f"data={args.data} device={device} model={recipe.model.name} batch={recipe.train.batch_size} "
        f"epochs={epochs} repeats={args.repeats} (n={len(ours_all)} timed epochs per side)"
    )
    print(f"dragontrainer images/s = {ours:,.0f} (median; min {min(ours_all):,.0f}, max {max(ours_all):,.0f})")
    print(f"minimal loop  images/s = {theirs:,.0f} (median; min {min(theirs_all):,.0f}, max {max(theirs_all):,.0f})")
    print(f"ratio={ours / theirs:.3f}")


if __name__ == "__main__":
    main()
