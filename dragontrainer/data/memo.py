"""Images loaded once per process while a search worker (or any long-lived caller) asks for it.

A search trains many runs on the same data; decoding the images again for each trial would be paid
per trial. Inside `remember_images()`, `load_images_once` keeps each loaded ImageSet keyed by the
fields of `data` that decide which images are read (not how they are split).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dragontrainer.data.sources import ImageSet, load_images
from dragontrainer.recipe import DataSpec

SPLIT_FIELDS = {"val_fraction", "test_fraction", "split_seed", "folds", "fold"}
_remembered: dict[str, ImageSet] | None = None


@contextmanager
def remember_images() -> Iterator[None]:
    """Within this block, each distinct data source is loaded once; memory is freed at the end."""
    global _remembered
    outer = _remembered
    _remembered = {} if outer is None else outer
    try:
        yield
    finally:
        _remembered = outer


def load_images_once(spec: DataSpec) -> ImageSet:
    """`load_images(spec)`, from memory when remembered. The ImageSet is shared: callers copy, never write."""
    if _remembered is None:
        return load_images(spec)
    key = spec.model_dump_json(exclude=SPLIT_FIELDS)
    if key not in _remembered:
        _remembered[key] = load_images(spec)
    return _remembered[key]
