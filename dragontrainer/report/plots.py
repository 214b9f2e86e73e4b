"""The report's figures, drawn with matplotlib (Agg) into PNG bytes from the run folder's records."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from dragontrainer.monitor.diagnose import RunRecords

TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#d62728"


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def curves(run: RunRecords) -> bytes | None:
    """Loss (per step and per epoch) and accuracy, train vs validation, the gap shaded."""
    if not run.val:
        return None
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps_per_epoch = max(run.train[0]["step"] / max(run.train[0]["epoch"], 1), 1)
    step_losses = [(r["step"] / steps_per_epoch, r["loss"]) for r in run.steps if r["loss"] is not None]
    if step_losses:
        x, y = zip(*step_losses, strict=True)
        loss_ax.plot(x, y, color=TRAIN_COLOUR, alpha=0.25, linewidth=0.8, label="train (per step)")
    epochs = [r["epoch"] for r in run.val]
    train_by_epoch = {r["epoch"]: r for r in run.train}
    train_loss = [train_by_epoch[e]["loss"] for e in epochs]
    val_loss = [r["loss"] for r in run.val]
    loss_ax.plot(epochs, train_loss, "o-", color=TRAIN_COLOUR, markersize=3, label="train (epoch mean)")
    loss_ax.plot(epochs, val_loss, "o-", color=VAL_COLOUR, markersize=3, label="validation")
    loss_ax.axhline(run.expected_initial_loss, color="grey", linestyle=":", linewidth=1, label="ln C (chance)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend(fontsize=8)
    train_acc = [train_by_epoch[e]["accuracy"] for e in epochs]
    val_acc = [r["accuracy"] for r in run.val]
    acc_ax.plot(epochs, train_acc, "o-", color=TRAIN_COLOUR, markersize=3, label="train")
    acc_ax.plot(epochs, val_acc, "o-", color=VAL_COLOUR, markersize=3, label="validation")
    acc_ax.fill_between(epochs, train_acc, val_acc, color="orange", alpha=0.25, label="gap")
    acc_ax.axhline(run.chance, color="grey", linestyle=":", linewidth=1, label="chance")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    acc_ax.legend(fontsize=8, loc="lower right")
    return png(figure)


def learning_rate(run: RunRecords) -> bytes | None:
    points = [(r["step"], r["lr"]) for r in run.steps]
    if not points:
        return None
    figure, ax = plt.subplots(figsize=(5.5, 3))
    ax.plot(*zip(*points, strict=True), color="#2ca02c")
    for event in run.kind("rollback"):
        ax.axvline(event["step"], color=VAL_COLOUR, linestyle="--", linewidth=1)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate per step")
    return png(figure)


def layer_heatmap(
    run: RunRecords, section: str, value: Any, title: str, *, log: bool = False, cmap: str = "viridis"
) -> bytes | None:
    """Layers down, samples across: one statistic over time ("colorful dimension" style)."""
    samples = [r for r in run.layers if r.get(section)]
    if not samples:
        return None
    names = list(samples[-1][section])
    grid = np.full((len(names), len(samples)), np.nan)
    for j, record in enumerate(samples):
        for i, name in enumerate(names):
            entry = record[section].get(name)
            v = value(entry) if entry else None
            if v is not None and (not log or v > 0):
                grid[i, j] = math.log10(v) if log else v
    figure, ax = plt.subplots(figsize=(5.5, 0.3 * len(names) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(samples) - 1, min(len(samples), 6)).astype(int)
    ax.set_xticks(ticks, [samples[t]["step"] for t in ticks], fontsize=7)
    ax.set(xlabel="step", title=title)
    figure.colorbar(image, ax=ax, label=("log10 " if log else "") + title.split(" (")[0])
    return png(figure)


def per_layer_lines(run: RunRecords, section: str, field: str, missing: float) -> tuple[Figure, Any] | None:
    """One line per layer of a sampled statistic over the steps (a layer's gap shows as `missing`)."""
    samples = [r for r in run.layers if r.get(section)]
    if not samples:
        return None
    figure, ax = plt.subplots(figsize=(5.5, 3))
    steps = [r["step"] for r in samples]
    for name in samples[-1][section]:
        ax.plot(steps, [r[section].get(name, {}).get(field) or missing for r in samples], label=name, linewidth=1)
    return figure, ax


def dead_fractions(run: RunRecords) -> bytes | None:
    drawn = per_layer_lines(run, "activations", "dead", 0.0)
    if drawn is None:
        return None
    figure, ax = drawn
    ax.set(
        xlabel="step", ylabel="fraction of channels", title="dead units (≤ 0 on every probe image)", ylim=(-0.02, 1.02)
    )
    ax.legend(fontsize=6, ncol=2)
    return png(figure)


def update_ratios(run: RunRecords) -> bytes | None:
    drawn = per_layer_lines(run, "params", "update_ratio", np.nan)  # no zero on a log axis
    if drawn is None:
        return None
    figure, ax = drawn
    ax.axhspan(3e-4, 3e-3, color="green", alpha=0.12, label="≈ 1e-3 (healthy)")
    ax.axhline(1e-3, color="green", linewidth=1, linestyle=":")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="‖Δθ‖ / ‖θ‖", title="update / weight ratio per layer")
    ax.legend(fontsize=6, ncol=2)
    return png(figure)


def filters(weight: np.ndarray, image_shape: Sequence[int]) -> bytes | None:
    """First-layer filters as an image grid: conv kernels (out, in, k, k), or rows of a dense first
    layer shown as images when they have the input's shape. Each filter is scaled to [0, 1] alone."""
    channels, height, width = image_shape
    if weight.ndim == 4:
        tiles = weight
    elif weight.ndim == 2 and weight.shape[1] == channels * height * width:
        tiles = weight.reshape(-1, channels, height, width)
    else:
        return None
    tiles = tiles[:64]
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    high = tiles.max(axis=(1, 2, 3), keepdims=True)
    tiles = (tiles - low) / np.maximum(high - low, 1e-12)
    columns = min(16, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.6, rows * 0.6 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles, strict=False):
        image = tile.transpose(1, 2, 0)
        ax.imshow(image[..., 0] if image.shape[2] == 1 else image[..., :3], cmap="gray", interpolation="nearest")
    figure.suptitle("first-layer filters", fontsize=9)
    return png(figure)


def confusion(matrix: list[list[int]], classes: Sequence[str]) -> bytes:
    values = np.array(matrix, dtype=float)
    rows = values / np.maximum(values.sum(1, keepdims=True), 1)
    size = min(0.45 * len(classes) + 2, 12)
    figure, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    labels = [str(c)[:12] for c in classes]
    if len(classes) <= 30:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if len(classes) <= 15:
            for (i, j), count in np.ndenumerate(values):
                if count:
                    ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    ax.set(xlabel="predicted", ylabel="true", title="validation confusion matrix (row-normalised)")
    figure.colorbar(image, ax=ax)
    return png(figure)


def image_grid(images: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """uint8 images (N, C, H, W) with their labels."""
    columns = min(8, len(images))
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels, strict=False):
        pixels = image.transpose(1, 2, 0)
        ax.imshow(pixels[..., 0] if pixels.shape[2] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
        ax.set_title(str(label)[:12], fontsize=7)
    figure.suptitle(title, fontsize=9)
    return png(figure)
