"""The distribution decision, made in one place: one process, or one rank of several (torch.distributed).

A run launched by torchrun (`torchrun --nproc_per_node N -m dragontrainer train ...`, or the shortcut
`dragon train --nproc N`) finds RANK/WORLD_SIZE/LOCAL_RANK in its environment: it joins the process
group (gloo on CPU, nccl on CUDA with the device cuda:LOCAL_RANK) and trains its shard of every global
batch under DistributedDataParallel. One process is world 1: no process group, no collective, no cost.

The contract that makes the rank count irrelevant to the run: `train.batch_size` is the GLOBAL batch;
rank r of W takes `order[lo:hi][r::W]` of every global batch (data/loader.py, data/stream.py), so steps
per epoch, `global_step` and the sample order do not depend on W, and a run resumes with any W.
Only rank 0 writes the run folder, runs the monitor and prints; the others see a `FollowerRun`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dragontrainer.errors import DragonError, RecipeError, RunError
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir
from dragontrainer.train.callbacks import Callback

T = TypeVar("T")
NO_STEP = 2**62  # "no rank saw a non-finite loss" in the MIN reduction of the first bad step


@dataclass(frozen=True)
class Distributed:
    """Which rank of how many this process is; `fit` passes it on. World 1 makes every method free."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""  # gloo | nccl; empty without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK when training on CUDA with several ranks."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def _device(self) -> torch.device:
        """Where collective tensors live: nccl reduces CUDA tensors only."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum device tensors over the ranks, in place (each rank ends with the total)."""
        if self.active:
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value` (a stop request's signal number; 0 = none)."""
        if not self.active:
            return value
        tensor = torch.tensor(value, dtype=torch.int64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def first_bad(self, step: torch.Tensor, lr: torch.Tensor) -> tuple[int, float]:
        """The earliest non-finite step any rank recorded (-1: none) and its learning rate: every rank
        raises the same divergence at the same check, so none is left waiting in a collective."""
        if not self.active:
            return int(step), float(lr)
        local = int(step)
        earliest = torch.tensor(local if local >= 0 else NO_STEP, dtype=torch.int64, device=self._device)
        dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        first = int(earliest)
        if first == NO_STEP:
            return -1, 0.0
        rate = torch.tensor(float(lr) if local == first else 0.0, dtype=torch.float64, device=self._device)
        dist.all_reduce(rate, op=dist.ReduceOp.MAX)
        return first, float(rate)

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (a path, a result, the epoch's logs: small picklable things)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def fold_meter(self, meter: Any) -> None:
        """Sum the epoch meter's counters over the ranks into rank 0 (the others restart from zero), so
        rank 0 reads and saves the global loss/accuracy/images and a later fold adds only what is new."""
        if not self.active:
            return
        tensors = [value for value in vars(meter).values() if isinstance(value, torch.Tensor)]
        seen = torch.tensor(meter.seen, dtype=torch.int64, device=self._device)
        self.sum_(*tensors, seen)
        if self.is_main:
            meter.seen = int(seen)
        else:
            seconds = meter.seconds
            meter.reset()
            meter.seconds = seconds

    def gradient_sync(self, model: nn.Module | None, stepping: bool) -> AbstractContextManager[Any]:
        """DDP's `no_sync()` for a micro-batch that does not step the optimiser (gradient accumulation):
        the gradients are averaged once, with the stepping micro-batch."""
        if model is None or stepping or not isinstance(model, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return model.no_sync()


SINGLE = Distributed()


def current() -> Distributed:
    """The process group this process belongs to (from `session`), or SINGLE."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       dist.get_backend())  # fmt: skip


def launched_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise RecipeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected a whole number (torchrun sets it)"
        ) from None


def is_follower() -> bool:
    """A rank other than 0 of a torchrun launch: it prints nothing (rank 0 speaks for the run)."""
    return launched_world() > 1 and os.environ.get("RANK", "0") != "0"


@contextmanager
def session(device_name: str) -> Iterator[Distributed]:
    """Join the process group of a torchrun launch for the length of one run, and leave it after;
    one process (no WORLD_SIZE, or 1) gets SINGLE and nothing else happens."""
    if launched_world() == 1 or dist.is_initialized():
        yield current()
        return
    from dragontrainer.train.device import resolve_device

    cuda = resolve_device(device_name).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- the run folder


class FollowerRun(RunDir):
    """The run folder as a rank other than 0 sees it: read (recipe, checkpoints to resume from), never
    written; every write helper is a no-op, so nothing but rank 0 creates or changes a file."""

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.file(name)

    def append_lines(self, path: Path, records: list[dict[str, Any]]) -> None:
        return None

    def keep_metrics_through(self, epoch: int) -> None:
        return None

    def keep_stats_through(self, step: int) -> None:
        return None

    def write_metrics_csv(self) -> None:
        return None

    def discard_if_unstarted(self) -> None:
        return None

    def remove_stale_temporaries(self) -> list[Path]:
        return []

    @contextmanager
    def lock(self) -> Iterator[None]:
        yield  # rank 0 holds the folder's lock for the whole job


def create_run(recipe: Recipe, where: Distributed) -> RunDir:
    """A new run folder: rank 0 creates it (a timestamped default name included) and tells the others
    its path; a refusal (a non-empty run.dir) stops every rank with the same one line."""
    if not where.active:
        return RunDir.create(recipe)
    if where.is_main:
        try:
            run = RunDir.create(recipe)
        except DragonError as exc:
            where.broadcast((None, str(exc)))
            raise
        where.broadcast((str(run.path), None))
        return run
    path, error = where.broadcast((None, None))
    if error is not None:
        raise RunError(error)
    return FollowerRun(Path(path))


def open_run(path: str | Path, where: Distributed) -> RunDir:
    """An existing run folder (resume): rank 0 may write it, the others only read it."""
    return RunDir.open(path) if where.is_main else FollowerRun.open(path)


def main_only_callbacks(callbacks: Sequence[Callback], where: Distributed) -> list[Callback]:
    """Drop, on ranks other than 0, the callbacks that only write files (snapshots, averaged weights,
    MLflow); the ones that steer training (plateau, two-stage switch, the user's) run on every rank."""
    if where.is_main:
        return list(callbacks)
    from dragontrainer.monitor.mlflow import MlflowTracker
    from dragontrainer.train.snapshots import SnapshotSaver, WeightAverager

    return [c for c in callbacks if not isinstance(c, (SnapshotSaver, WeightAverager, MlflowTracker))]


# ------------------------------------------------------------------------------------------------------ the model


def wrap_model(model: nn.Module, where: Distributed, *, sync_batchnorm: bool) -> nn.Module | None:
    """The DistributedDataParallel wrapper the training step runs through (None for one process). It
    starts every rank from rank 0's weights and buffers. With `sync_batchnorm`, batch norm computes its
    statistics over the global batch (SyncBatchNorm; the parameters stay the same objects, so the
    optimiser is untouched). Everything else (monitor, evaluation, checkpoints) uses `model` itself."""
    if not where.active:
        return None
    device = next(model.parameters()).device
    if sync_batchnorm and device.type != "cuda":
        raise RecipeError(
            "recipe field train.sync_batchnorm: SyncBatchNorm runs on CUDA only (a torch limit); on CPU ranks "
            "batch norm uses each rank's shard: set it false (or use model.norm=group / layer)"
        )
    if sync_batchnorm:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model or not isinstance(model, nn.modules.batchnorm._BatchNorm)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def shard_weight(local: int, global_count: int, where: Distributed) -> float:
    """The factor on this rank's mean loss so that DDP's average of the ranks' gradients equals the
    gradient of the mean over the whole global batch, also when the shards are uneven (the last batch):
    local·W/N. Exactly 1 for one process."""
    if not where.active:
        return 1.0
    return local * where.world / max(global_count, 1)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank`'s own random streams (augmentation, dropout, mixup): ranks drawing the same
    numbers for different images would make the global batch's augmentation W times less varied."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**62


def decorrelate_rng(seed: int, where: Distributed, step: int, augment_generator: torch.Generator) -> None:
    """Give ranks other than 0 random streams of their own, derived from (seed, rank, step); rank 0
    keeps the run's recorded streams (what a checkpoint saves)."""
    if where.is_main:
        return
    from dragontrainer.train.state import seed_everything

    derived = rank_seed(seed, where.rank, step)
    seed_everything(derived)
    augment_generator.manual_seed(derived + 1)


def check_last_batch(epoch_images: int, batch_size: int, where: Distributed, *, shuffle: bool) -> None:
    """Every rank needs at least one image of every global batch (an empty shard has no mean loss)."""
    if not where.active:
        return
    rest = epoch_images % batch_size
    last = rest if rest > (1 if shuffle else 0) else batch_size
    if batch_size < where.world or last < where.world:
        raise RecipeError(
            f"recipe field train.batch_size: {batch_size} leaves a global batch of {min(last, batch_size)} "
            f"images for {where.world} ranks (an epoch has {epoch_images}); every rank needs at least one image "
            "per step: choose a batch size whose last batch is not smaller than the rank count"
        )


# ----------------------------------------------------------------------------------------------- launching ranks


def check_nproc(nproc: int, device_name: str) -> None:
    """More ranks than CPU cores (on CPU) or GPUs (on CUDA) is refused before anything starts."""
    from dragontrainer.train.device import resolve_device

    if nproc < 1:
        raise RecipeError(f"--nproc {nproc}: must be at least 1")
    if launched_world() > 1:
        raise RecipeError("--nproc: this process is already one rank of a torchrun launch; drop --nproc")
    if resolve_device(device_name).type == "cuda":
        available, what = torch.cuda.device_count(), "GPUs"
    else:
        available, what = len(os.sched_getaffinity(0)), "CPU cores"
    if nproc > available:
        raise RecipeError(f"--nproc {nproc}: more ranks than the {available} {what} of this machine")


def launch(arguments: Sequence[str], nproc: int) -> int:
    """Run `python -m dragontrainer ARGUMENTS` as `nproc` ranks on this machine (torchrun with a
    standalone rendezvous); returns torchrun's exit code. CPU ranks share the cores between them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(len(os.sched_getaffinity(0)) // nproc, 1)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dragontrainer", *arguments]  # fmt: skip
    child = subprocess.Popen(command, env=env)
    if threading.current_thread() is not threading.main_thread():
        return child.wait()
    # Ctrl-C reaches every process of the terminal's group (the ranks stop cleanly by themselves); a SIGTERM
    # sent to this process is handed to torchrun, which hands it to the ranks: they save `last` and stop
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
