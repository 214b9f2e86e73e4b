from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dragontrainer.data import cache
from dragontrainer.data.image_folder import list_folder
from dragontrainer.data.sources import load_images
from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from tests.conftest import make_image_folder


def spec_for(root: Path, tmp_path: Path, **fields: object) -> DataSpec:
    return DataSpec(path=root, cache=tmp_path / "cache", **fields)


def test_build_matches_the_decoded_folder_and_reuse_decodes_nothing(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=5, size=32)
    spec = spec_for(root, tmp_path)
    built = cache.open_cache(list_folder(root), spec, workers=2)
    reference = load_images(spec)
    assert built.decoded == 15 and built.images.shape == (15, 3, 32, 32)
    assert np.array_equal(built.images, reference.x) and np.array_equal(built.labels, reference.y)
    assert built.classes == reference.classes
    array_file = built.path / "images.npy"
    stamp = array_file.stat().st_mtime_ns
    again = cache.open_cache(list_folder(root), spec)
    assert again.decoded == 0 and again.path == built.path and array_file.stat().st_mtime_ns == stamp
    assert np.array_equal(again.images, reference.x)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries == sorted([cache.TAG_NAME, built.path.name, f"{built.path.name}.lock"])


def test_many_chunks_decoded_by_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 4)
    root = make_image_folder(tmp_path / "images", classes=2, per_class=9, size=16, fmt="JPEG")
    spec = spec_for(root, tmp_path, image_size=12)
    built = cache.open_cache(list_folder(root), spec, workers=2)
    assert built.decoded == 18
    assert np.array_equal(built.images, load_images(spec).x)


def test_a_changed_file_is_decoded_again_and_the_old_cache_removed(tmp_path: Path) -> None:
    from PIL import Image

    root = make_image_folder(tmp_path / "images", classes=2, per_class=4, size=16)
    spec = spec_for(root, tmp_path)
    first = cache.open_cache(list_folder(root), spec)
    changed = root / "class_1" / "2.png"
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = cache.open_cache(list_folder(root), spec)
    assert second.decoded == 8 and second.path != first.path and not first.path.exists()
    assert np.array_equal(second.images, load_images(spec).x)
    assert (second.images[6] == 7).all()  # class_1/2.png is the 7th file


def test_other_settings_are_other_caches(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=16)
    a = cache.open_cache(list_folder(root), spec_for(root, tmp_path))
    b = cache.open_cache(list_folder(root), spec_for(root, tmp_path, image_size=8))
    assert a.path != b.path and b.images.shape == (4, 3, 8, 8) and a.path.exists()


def test_cache_size_keeps_the_aspect_and_stores_the_centre_square(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        wide = np.zeros((20, 40, 3), dtype=np.uint8)
        wide[:, 8:32] = 200  # the centre (and a margin for the filter) bright, the sides dark
        Image.fromarray(wide).save(root / name / "wide.png")
        Image.fromarray(wide.transpose(1, 0, 2).copy()).save(root / name / "tall.png")
    built = cache.open_cache(list_folder(root), spec_for(root, tmp_path, image_size=8, cache_size=10))
    assert built.images.shape == (4, 3, 10, 10)
    assert built.images.min() >= 190  # only the bright centre square was kept, at 10×10


def test_gray_folder_is_stored_as_one_channel_like_the_resident_path(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(root / name / f"{i}.png")
    spec = spec_for(root, tmp_path)
    built = cache.open_cache(list_folder(root), spec)
    assert built.images.shape == (6, 1, 8, 8) and np.array_equal(built.images, load_images(spec).x)
    gray = spec_for(make_image_folder(tmp_path / "rgb", classes=2, per_class=2), tmp_path, color="gray")
    assert np.array_equal(cache.open_cache(list_folder(gray.path), gray).images, load_images(gray).x)


def test_a_corrupt_image_is_one_error_naming_it_and_no_cache(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=8)
    (root / "class_0" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"class_0/1\.png: not a readable image"):
        cache.open_cache(list_folder(root), spec_for(root, tmp_path))
    assert not any((tmp_path / "cache").glob("*/manifest.json"))


def test_a_folder_that_is_not_a_cache_is_refused_untouched(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a dragontrainer cache"):
        cache.open_cache(list_folder(root), DataSpec(path=root, cache=theirs))
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_a_full_disk_is_one_line_and_the_next_build_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    root = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache, "write_all", full)
    with pytest.raises(DataError, match=r"\.partial: cannot write the decoded cache \(No space left on device\)"):
        cache.open_cache(list_folder(root), spec_for(root, tmp_path), workers=1)
    monkeypatch.undo()
    assert cache.open_cache(list_folder(root), spec_for(root, tmp_path)).decoded == 4


def test_default_folder_honours_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_root() == tmp_path / "xdg" / "dragontrainer"


BUILDER = """
import sys, time
from pathlib import Path
from dragontrainer.data import cache
from dragontrainer.data.image_folder import list_folder
from dragontrainer.recipe import DataSpec

cache.CHUNK_IMAGES = 2
cache.RECORD_SECONDS = 0  # every finished chunk recorded at once
decode = cache.decode_chunk
def slow(task):
    time.sleep(0.3)  # time for the test to kill the build between chunks
    return decode(task)
cache.decode_chunk = slow
root, where = Path(sys.argv[1]), Path(sys.argv[2])
cache.open_cache(list_folder(root), DataSpec(path=root, cache=where), workers=1)
"""


def test_a_killed_build_is_never_used_and_continues_from_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=6, size=16)
    spec = spec_for(root, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(root), str(spec.cache)], env=env)
    chunks = None
    deadline = time.time() + 60
    while time.time() < deadline and builder.poll() is None:
        found = list(spec.cache.glob("*.partial/chunks.json"))
        if found and len(json.loads(found[0].read_text())) >= 2:
            chunks = found[0]
            break
        time.sleep(0.02)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert chunks is not None, "the builder finished or failed before it could be killed"
    assert not any(spec.cache.glob("*/manifest.json"))  # the half-written cache is not a cache
    done = len(json.loads(chunks.read_text()))
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 2)
    resumed = cache.open_cache(list_folder(root), spec)
    assert resumed.decoded == 12 - 2 * done
    assert np.array_equal(resumed.images, load_images(spec).x)
    assert not chunks.parent.exists() and not (resumed.path / "chunks.json").exists()
