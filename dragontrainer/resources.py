"""How much memory there is, and whether a data set or a model will fit — checked before allocating.

Sizes that a file declares (array shapes, IDX headers) and sizes the recipe implies
(`data.image_size`, `model.widths`) are turned into byte counts with Python integers (no overflow)
and compared with the memory available, so a bad number is a clear error instead of a crash.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import ModelSpec

MAX_CLASSES = 100_000  # more than any public classification set (ImageNet-21k: 21,841)


def available_memory() -> int:
    """Bytes this process may still allocate: the least of MemAvailable, the cgroup's room and RLIMIT_AS."""
    limits = [meminfo_available()]
    limits.append(cgroup_room())
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(soft - process_virtual_size(), 0))
    return min(x for x in limits if x is not None)


def meminfo_available() -> int:
    found = proc_kib("/proc/meminfo", "MemAvailable:")
    return 1 << 62 if found is None else found  # unknown: do not refuse on a guess


def proc_kib(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None when absent or unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def process_virtual_size() -> int:
    return proc_kib("/proc/self/status", "VmSize:") or 0


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:,.1f} MiB"


def array_bytes(shape: Iterable[int], itemsize: int) -> int:
    """Exact size of an array of `shape` (Python integers: products never overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def check_fits(nbytes: int, what: str, *, error: type[DataError] | type[RecipeError] = DataError) -> None:
    """Refuse, naming the estimate and the available memory, when `nbytes` cannot be allocated."""
    room = available_memory()
    if nbytes > room:
        raise error(f"{what} needs about {gib(nbytes)}, but only {gib(room)} of memory is available")


def count_classes(labels: torch.Tensor | object, origin: str) -> int:
    """Classes implied by integer labels 0..C-1, refusing label sets that would blow up the head or
    the confusion matrix (a stray label of 10⁶ is a data error, not a million classes)."""
    import numpy as np

    y = np.asarray(labels)
    if y.size == 0:
        return 0
    largest, distinct = int(y.max()), len(np.unique(y))
    if largest >= MAX_CLASSES or largest + 1 > 10 * distinct + 100:
        raise DataError(
            f"{origin}: largest label {largest} but only {distinct} distinct labels; labels must be 0..C-1 "
            f"(at most {MAX_CLASSES:,} classes): renumber them"
        )
    return largest + 1


def check_model_fits(
    spec: ModelSpec, *, in_channels: int, num_classes: int, image_size: int, batch_size: int, device: torch.device
) -> None:
    """Refuse a model (model.widths, data.image_size, train.batch_size) that cannot be trained in the
    memory there is, before a single weight is allocated."""
    from dragontrainer.nn.models import model_factory
    from dragontrainer.nn.user import is_import_path

    build = lambda: model_factory(spec.name)(spec, in_channels, num_classes, image_size)  # uninitialised: shapes only
    try:
        parameters, activations = model_memory(build, (batch_size, in_channels, image_size, image_size))
    except Exception:
        if is_import_path(spec.name):
            return  # a user's model may not build on the meta device: it cannot be estimated, only tried
        raise
    need = training_bytes(parameters, activations)
    room = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    if need > room:
        raise RecipeError(
            f"recipe fields model.widths / data.image_size / train.batch_size: the model has {parameters:,} "
            f"parameters and {activations:,} activation values per batch; training needs about {gib(need)}, "
            f"but only {gib(room)} of {device.type} memory is available"
        )


def model_memory(
    model_factory: Callable[[], torch.nn.Module], input_shape: tuple[int, int, int, int]
) -> tuple[int, int]:
    """(parameters, activation values per batch) of the model, measured on the meta device: shapes
    only, nothing allocated, so a model of 10¹¹ weights is measured in milliseconds."""
    with torch.device("meta"):
        model = model_factory()
    parameters = sum(p.numel() for p in model.parameters())
    activations = [0]

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            activations[0] += output.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.device("meta"), torch.no_grad():
            model(torch.empty(input_shape, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return parameters, activations[0]


def training_bytes(parameters: int, activations: int) -> int:
    """A lower bound on training memory in float32: weights, gradients, two optimiser moments and the
    initial copy the monitor keeps; each activation stored for backward and its gradient."""
    return 4 * (5 * parameters + 2 * activations)
