"""Data larger than memory: the decoded cache and the streamed loader, measured.

An image folder of `--count` generated JPEGs (default 20,000 at 128×128, 2 classes) is written once
into `--folder` (reused when it already holds them), then:

1. cache build: images/s of `open_cache` (worker processes) into a fresh cache vs a plain
   single-process Pillow loop (`Image.open(p).convert("RGB")` + `np.asarray`) over the same files;
2. training: images/s of the same small CNN trained on the streamed loader (rows read from the
   cache by the background thread) vs the resident loader (the same images as one tensor), on data
   that fits; the two sides alternate `--repeats` times and each rate is a median;
3. memory: a subprocess streams `--epochs` epochs of training (a pooled linear model, so that every
   image goes through in seconds: it is the data path's memory that is measured) over the whole folder
   and reports its peak RSS (VmHWM) above the baseline taken after importing torch and a warm-up step,
   against `--cap-mib` and the decoded size.

    python bench/streaming.py --folder /tmp/dragon-jpegs
    python bench/streaming.py --folder /tmp/dragon-jpegs --count 2000 --repeats 2   # a quick look

The last line is `ratio=<streamed / resident training images/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dragontrainer.data.cache import open_cache
from dragontrainer.data.image_folder import list_folder
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.stream import StreamLoader
from dragontrainer.recipe import DataSpec

MIB = 1 << 20


def write_jpegs(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    folder, start, stop, size = args
    rng = np.random.default_rng(start)
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float32) / (2 * size)
    for i in range(start, stop):
        label = i % 2
        base = ramp if label else ramp.T
        pixels = np.stack([base * rng.uniform(100, 255), base[::-1] * 200, rng.uniform(0, 1) * 255 * base], -1)
        pixels += rng.normal(0, 12, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"class_{label}" / f"{i:06d}.jpg", quality=90)


def make_folder(folder: Path, count: int, size: int) -> None:
    if folder.is_dir() and len(list(folder.glob("class_*/*.jpg"))) == count:
        return
    for label in (0, 1):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
    step = 500
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_jpegs, [(folder, s, min(s + step, count), size) for s in range(0, count, step)]))


def pillow_loop(files: list[Path], limit: int) -> float:
    """Images/s of a plain single-process decode loop over the first `limit` files."""
    from PIL import Image

    start = time.perf_counter()
    for path in files[:limit]:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))
    return min(limit, len(files)) / (time.perf_counter() - start)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )  # fmt: skip


def train_rate(loader: DeviceLoader | StreamLoader, steps: int, device: torch.device) -> float:
    """Training images/s over `steps` steps after two warm-up steps (the same model and seed each time)."""
    torch.manual_seed(0)
    model = small_cnn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen, start = 0, 0.0
    for step, (x, y) in enumerate(loader.batches(0)):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen, start = 0, time.perf_counter()
        if step == steps + 2:
            break
        loss = nn.functional.cross_entropy(model(x.float().div_(255)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def read_rate(loader: DeviceLoader | StreamLoader, steps: int) -> float:
    """Images/s of the loader alone (each batch converted to float, as a step would), after one batch."""
    seen, start = 0, time.perf_counter()
    for step, (x, _) in enumerate(loader.batches(1)):
        if step == 1:
            seen, start = 0, time.perf_counter()
        if step == steps + 1:
            break
        x.float()
        seen += len(x)
    return seen / (time.perf_counter() - start)


CAPPED = """
import json, sys
from pathlib import Path
import numpy as np, torch
from torch import nn
from dragontrainer.data.residency import load_for_training
from dragontrainer.data.stream import StreamLoader
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import proc_kib

folder, cache, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
epochs, batch = int(sys.argv[5]), int(sys.argv[6])
model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 16 * 16, 2))  # cheap: every image in seconds
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
def step(x, y):
    loss = nn.functional.cross_entropy(model(x.float().div_(255)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
step(torch.zeros(batch, 3, 128, 128, dtype=torch.uint8), torch.zeros(batch, dtype=torch.int64))
Path("/proc/self/clear_refs").write_text("5")
baseline = proc_kib("/proc/self/status", "VmHWM:")
loaded = load_for_training(DataSpec(path=folder, cache=cache), torch.device("cpu"), room=cap)
x, y = loaded.images.x, loaded.images.y
train = StreamLoader(x, y, np.arange(len(y)), batch, shuffle=True, read_rows=loaded.read_rows)
seen = 0
for epoch in range(epochs):
    for xb, yb in train.batches(epoch):
        step(xb, yb)
        seen += len(yb)
peak = proc_kib("/proc/self/status", "VmHWM:") - baseline
print(json.dumps({"mode": loaded.residency.mode, "reason": loaded.residency.reason,
                  "decoded": loaded.residency.decoded_bytes, "peak": peak, "seen": seen}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None, help="where the JPEGs are (written once)")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pillow-images", type=int, default=2000, help="files the plain Pillow loop decodes")
    parser.add_argument("--cap-mib", type=int, default=256, help="the memory cap the streamed run must stay under")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the capped run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    folder = args.folder or Path(tempfile.gettempdir()) / f"dragon-jpegs-{args.count}-{args.size}"
    start = time.perf_counter()
    make_folder(folder, args.count, args.size)
    print(f"folder: {folder} ({args.count:,} JPEGs at {args.size}×{args.size}, {time.perf_counter() - start:.0f} s)")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(scratch) / "cache"
        spec = DataSpec(path=folder, cache=cache_dir)
        listing = list_folder(folder)
        start = time.perf_counter()
        cache = open_cache(listing, spec)
        build = len(listing.files) / (time.perf_counter() - start)
        start = time.perf_counter()
        reused = open_cache(list_folder(folder), spec)
        reuse_s = time.perf_counter() - start
        plain = pillow_loop(listing.files, args.pillow_images)
        decoded = cache.images.nbytes
        print(f"cache build: {build:,.0f} images/s on {cores} cores vs plain Pillow loop {plain:,.0f} images/s "
              f"(×{build / plain:.2f}); {decoded / MIB:,.0f} MiB decoded; reopening it: {reuse_s:.2f} s, "
              f"{reused.decoded} decoded")  # fmt: skip

        x, y = cache.images, cache.labels
        fits = min(len(y), max(args.batch * (args.steps + 3), 1))
        rows = np.arange(fits)
        resident = DeviceLoader(torch.from_numpy(np.array(x[:fits])).to(device),
                                torch.from_numpy(y[:fits]).to(device), args.batch, shuffle=True)  # fmt: skip
        streamed = StreamLoader(x, y, rows, args.batch, shuffle=True, device=device, read_rows=cache.rows.read)
        rates: dict[str, list[float]] = {"resident": [], "streamed": [], "resident read": [], "streamed read": []}
        for _ in range(args.repeats):
            rates["resident read"].append(read_rate(resident, args.steps))
            rates["streamed read"].append(read_rate(streamed, args.steps))
            rates["resident"].append(train_rate(resident, args.steps, device))
            rates["streamed"].append(train_rate(streamed, args.steps, device))
        resident_rate, streamed_rate = (statistics.median(rates[k]) for k in ("resident", "streamed"))
        print(f"loader alone: resident {statistics.median(rates['resident read']):,.0f} images/s, streamed "
              f"{statistics.median(rates['streamed read']):,.0f} images/s")  # fmt: skip
        print(f"training ({device}, batch {args.batch}, {fits:,} images that fit): resident {resident_rate:,.0f} "
              f"images/s, streamed {streamed_rate:,.0f} images/s (each side the median of {args.repeats})")  # fmt: skip

        capped = subprocess.run(
            [sys.executable, "-c", CAPPED, str(folder), str(cache_dir), str(args.cap_mib * MIB),
             str(Path(__file__).parent), str(args.epochs), str(args.batch)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        if capped.returncode != 0:
            print(capped.stderr[-3000:])
            raise SystemExit("the capped run failed")
        memory = json.loads(capped.stdout.strip().splitlines()[-1])
        verdict = "under" if memory["peak"] < args.cap_mib * MIB else "OVER"
        print(f"memory: {memory['seen']:,} images streamed ({memory['decoded'] / MIB:,.0f} MiB decoded, "
              f"{memory['mode']}: {memory['reason']}); peak RSS +{memory['peak'] / MIB:,.0f} MiB above the baseline, "
              f"{verdict} the {args.cap_mib} MiB cap")  # fmt: skip
    print(f"ratio={streamed_rate / resident_rate:.2f}")


if __name__ == "__main__":
    main()
