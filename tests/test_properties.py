"""Property-based tests (hypothesis): whatever the input, the outcome is a success or a clear
DragonError — never another exception, never a traceback for the user."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragontrainer.data.sources import load_images
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import DataSpec, Recipe, schema_keys

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = sorted(schema_keys())

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=4),
)  # fmt: skip
keys = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20))


@SETTINGS
@given(st.lists(st.tuples(keys, st.one_of(values.map(str), st.text(max_size=15))), max_size=5))
def test_random_overrides_give_a_recipe_or_a_recipe_error(pairs: list[tuple[str, str]]) -> None:
    try:
        Recipe.load(overrides=[f"{key}={value}" for key, value in pairs])
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)


SECTIONS = ["data", "model", "optim", "train", "augment", "hflip"]
mappings = st.recursive(
    st.dictionaries(st.sampled_from([k.rpartition(".")[2] for k in KEYS] + ["x"]), values, max_size=4),
    lambda children: st.dictionaries(st.sampled_from(SECTIONS), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@SETTINGS
@given(st.one_of(mappings, values))
def test_random_recipe_documents_give_a_recipe_or_a_recipe_error(document: object) -> None:
    try:
        Recipe.from_dict(document)  # type: ignore[arg-type]
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)


def write_and_load(source: str, name: str, payload: bytes, folder: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if source == "image-folder":
            (root / "a").mkdir()
            (root / "a" / name).write_bytes(payload)
            path = root
        elif folder:
            (root / name).write_bytes(payload)
            path = root
        else:
            path = root / name
            path.write_bytes(payload)
        try:
            load_images(DataSpec(source=source, path=path, image_size=8))
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_as_an_image_file(payload: bytes) -> None:
    write_and_load("image-folder", "x.png", payload)


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_as_an_npz_file(payload: bytes) -> None:
    write_and_load("npz", "x.npz", payload)


@SETTINGS
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_as_idx_files(payload: bytes, gz: bool) -> None:
    data = gzip.compress(payload) if gz else payload
    suffix = ".gz" if gz else ""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"train-images-idx3-ubyte{suffix}").write_bytes(data)
        (root / f"train-labels-idx1-ubyte{suffix}").write_bytes(data[: len(data) // 2])
        try:
            load_images(DataSpec(source="mnist-idx", path=root))
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(["data_batch_1", "data_batch_1.bin", "train", "train.bin"]))
def test_random_bytes_as_cifar_batches(payload: bytes, name: str) -> None:
    write_and_load("cifar", name, payload, folder=True)


@SETTINGS
@given(
    st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.sampled_from([np.uint8, np.float32, np.int64, np.bool_])
)
def test_random_array_shapes_and_dtypes_in_npz(n: int, h: int, w: int, dtype: type) -> None:
    rng = np.random.default_rng(n * 31 + h * 7 + w)
    x = (rng.random((n, h, w)) * 300 - 20).astype(dtype)
    y = rng.integers(-1, 4, size=n)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "a.npz", x=x, y=y)
        try:
            images = load_images(DataSpec(source="npz", path=Path(tmp) / "a.npz"))
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert images.x.dtype == np.uint8 and images.y.min() >= 0
