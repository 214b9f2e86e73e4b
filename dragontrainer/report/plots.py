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
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

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
    legend_below(loss_ax)
    train_acc = [train_by_epoch[e]["accuracy"] for e in epochs]
    val_acc = [r["accuracy"] for r in run.val]
    acc_ax.plot(epochs, train_acc, "o-", color=TRAIN_COLOUR, markersize=3, label="train")
    acc_ax.plot(epochs, val_acc, "o-", color=VAL_COLOUR, markersize=3, label="validation")
    acc_ax.fill_between(epochs, train_acc, val_acc, color="orange", alpha=0.25, label="gap")
    acc_ax.axhline(run.chance, color="grey", linestyle=":", linewidth=1, label="chance")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    legend_below(acc_ax)
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(figure)


def legend_below(ax: Any, columns: int = 3) -> None:
    """The legend under the axes, never over the curves (the figure grows to fit it)."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=columns, frameon=False)


def legend_beside(ax: Any) -> None:
    """Many entries (one per layer): a column right of the axes, never over the lines."""
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def readable_names(names: Sequence[str], kinds: dict[str, str]) -> list[str]:
    """`blocks.1.0` -> `conv 2 (blocks.1.0)`: the layer's type, its position among layers of that
    type, and its path in the model (what transfer rules and findings name)."""
    counts: dict[str, int] = {}
    labels = []
    for name in names:
        kind = kinds.get(name, "layer")
        counts[kind] = counts.get(kind, 0) + 1
        labels.append(f"{kind} {counts[kind]} ({name})")
    return labels


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


def layer_kinds(run: RunRecords, section: str, shapes: dict[str, Sequence[int]] | None = None) -> dict[str, str]:
    """Layer name -> short type: activations carry theirs (`relu`); weights are `conv` (4-D kernels)
    or `linear` (2-D), read from the checkpoint's tensor shapes when given."""
    samples = [r for r in run.layers if r.get(section)]
    if not samples:
        return {}
    if section == "activations":
        return {name: entry.get("type", "act") for name, entry in samples[-1][section].items()}
    kinds = {}
    for name in samples[-1][section]:
        shape = (shapes or {}).get(f"{name}.weight") or (shapes or {}).get(name)
        kinds[name] = {4: "conv", 2: "linear"}.get(len(shape), "layer") if shape else "layer"
    return kinds


def layer_heatmap(
    run: RunRecords, section: str, value: Any, title: str, *, log: bool = False, cmap: str = "viridis",
    kinds: dict[str, str] | None = None,
) -> bytes | None:  # fmt: skip
    """Layers down, samples across: one statistic over time ("colorful dimension" style).

    A cell with nothing to colour is hatched, not left to look like a low value: 0 on a log scale
    (a dead layer: its outputs, or gradients, are all zero — labelled on the row) or not measured.
    """
    samples = [r for r in run.layers if r.get(section)]
    if not samples:
        return None
    names = list(samples[-1][section])
    grid = np.full((len(names), len(samples)), np.nan)
    zero = np.zeros(grid.shape, dtype=bool)
    for j, record in enumerate(samples):
        for i, name in enumerate(names):
            entry = record[section].get(name)
            v = value(entry) if entry else None
            if v is not None and (not log or v > 0):
                grid[i, j] = math.log10(v) if log else v
            zero[i, j] = v is not None and v == 0
    figure, ax = plt.subplots(figsize=(6.5, 0.3 * len(names) + 1.6))
    ax.add_patch(Rectangle((-0.5, -0.5), len(samples), len(names), facecolor="#f0f0f0", edgecolor="#bbbbbb",
                           hatch="///", linewidth=0, zorder=0))  # fmt: skip
    colours = plt.get_cmap(cmap).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # blank cells show the hatching
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=colours, interpolation="nearest", zorder=1)
    ax.set_yticks(range(len(names)), readable_names(names, kinds or {}), fontsize=7)
    note = {"va": "center", "ha": "left", "fontsize": 7, "color": "#b71c1c", "zorder": 2,
            "bbox": {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}}  # fmt: skip
    for i in range(len(names)):
        if zero[i].any():
            ax.text(int(np.flatnonzero(zero[i])[0]), i, " 0: dead from here", **note)
        elif np.isnan(grid[i]).all():
            ax.text(0, i, " no value: zero weights, or never measured", **note)
    ticks = np.linspace(0, len(samples) - 1, min(len(samples), 6)).astype(int)
    ax.set_xticks(ticks, [samples[t]["step"] for t in ticks], fontsize=7)
    ax.set(xlabel="step", ylabel="layer (type, position, path)", title=title)
    figure.colorbar(image, ax=ax, label=("log10 " if log else "") + title.split(" (")[0])
    return png(figure)


def per_layer_lines(
    run: RunRecords, section: str, field: str, missing: float, kinds: dict[str, str] | None = None
) -> tuple[Figure, Any] | None:
    """One line per layer of a sampled statistic over the steps (a layer's gap shows as `missing`)."""
    samples = [r for r in run.layers if r.get(section)]
    if not samples:
        return None
    figure, ax = plt.subplots(figsize=(5.5, 3))
    steps = [r["step"] for r in samples]
    names = list(samples[-1][section])
    for name, label in zip(names, readable_names(names, kinds or {}), strict=True):
        ax.plot(steps, [r[section].get(name, {}).get(field) or missing for r in samples], label=label, linewidth=1)
    return figure, ax


def dead_fractions(run: RunRecords) -> bytes | None:
    drawn = per_layer_lines(run, "activations", "dead", 0.0, layer_kinds(run, "activations"))
    if drawn is None:
        return None
    figure, ax = drawn
    ax.set(
        xlabel="step", ylabel="fraction of channels", title="dead units (≤ 0 on every probe image)", ylim=(-0.02, 1.02)
    )
    legend_beside(ax)
    return png(figure)


def update_ratios(run: RunRecords, kinds: dict[str, str] | None = None) -> bytes | None:
    drawn = per_layer_lines(run, "params", "update_ratio", np.nan, kinds)  # no zero on a log axis
    if drawn is None:
        return None
    figure, ax = drawn
    ax.axhspan(3e-4, 3e-3, color="green", alpha=0.12, label="≈ 1e-3 (healthy)")
    ax.axhline(1e-3, color="green", linewidth=1, linestyle=":")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="‖Δθ‖ / ‖θ‖", title="update / weight ratio per layer")
    legend_beside(ax)
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
    image, _ = mosaic(tiles.transpose(0, 2, 3, 1)[..., :3], columns, gap=max(1, tiles.shape[-1] // 3), fill=1.0)
    figure, ax = plt.subplots(figsize=(columns * 0.6, rows * 0.6 + 0.4))
    ax.axis("off")
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    figure.suptitle("first-layer filters", fontsize=9)
    return png(figure)


def mosaic(tiles: np.ndarray, columns: int, *, gap: int, fill: float, label_rows: int = 0) -> tuple[np.ndarray, list]:
    """Tiles (N, H, W, C) laid out in one image, `gap` pixels apart (and `label_rows` free above each row
    for a caption), and each tile's top-left corner: one imshow instead of an axes per tile, which is
    what made the report's grids slow to draw."""
    n, height, width, channels = tiles.shape
    rows = math.ceil(n / columns)
    step_y, step_x = height + gap + label_rows, width + gap
    image = np.full((rows * step_y - gap, columns * step_x - gap, channels), fill, dtype=tiles.dtype)
    corners = []
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * step_y + label_rows, (i % columns) * step_x
        image[top : top + height, left : left + width] = tile
        corners.append((top, left))
    return image, corners


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
    height, width = images.shape[2:]
    caption = max(2, math.ceil(0.3 * height))  # room above each image for its label
    grid, corners = mosaic(images.transpose(0, 2, 3, 1), columns, gap=max(1, width // 8), fill=255,
                           label_rows=caption)  # fmt: skip
    figure, ax = plt.subplots(figsize=(columns * 1.1, rows * 1.25))
    ax.axis("off")
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    for (top, left), label in zip(corners, labels, strict=False):
        ax.text(left + (width - 1) / 2, top - 1, str(label)[:12], fontsize=7, ha="center", va="bottom")
    figure.suptitle(title, fontsize=9)
    return png(figure)
