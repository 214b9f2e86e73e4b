"""Several ranks (torch.distributed, gloo on CPU): sharding of the global batch, the collectives of
train/distributed.py, a 2-rank run against one process, rank-0-only writing, and a rank killed mid-run
then resumed with 1 and with 2 ranks.

Equivalence runs use `model.norm=none` (batch norm on CPU ranks normalises each rank's shard: a different
computation, and SyncBatchNorm is CUDA-only in torch) and no random augmentation, so one process and two
ranks compute the same thing and must agree to float rounding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import Recipe, resume, train
from dragontrainer.cli import main
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.sampler import BALANCE_MODES
from dragontrainer.data.stream import StreamLoader
from dragontrainer.errors import RecipeError
from dragontrainer.run import RunDir
from dragontrainer.train.distributed import Distributed, FollowerRun, check_last_batch, shard_weight
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
EXACT = ["model.norm=none", "augment.crop.p=0", "augment.hflip.p=0", "train.precision=fp32", "monitor.report=false",
         "monitor.mlflow=off", "monitor.tensorboard=off"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ sharding


def imbalanced_labels() -> torch.Tensor:
    return torch.tensor([0] * 37 + [1] * 11 + [2] * 5)


@pytest.mark.parametrize("mode", BALANCE_MODES)
@pytest.mark.parametrize("world", [2, 3])
def test_shards_interleave_the_global_batch(mode: str, world: int) -> None:
    """Rank r takes order[lo:hi][r::W]: the ranks' batches together are the one-process batch, step by
    step; the length does not depend on W; without sampling every image comes exactly once per epoch."""
    labels = imbalanced_labels()
    x = torch.arange(len(labels))  # each "image" is its own index
    whole = DeviceLoader(x, labels, 8, shuffle=True, seed=3, balance=mode, switch_epoch=1)
    ranks = [whole.sharded((r, world)) for r in range(world)]
    for epoch in (0, 1):
        seen = []
        batches = list(whole.batches(epoch))
        parts = [list(loader.batches(epoch)) for loader in ranks]
        assert all(len(loader) == len(whole) for loader in ranks)
        for step, (images, _) in enumerate(batches):
            for r in range(world):
                assert torch.equal(parts[r][step][0], images[r::world])
                assert torch.equal(parts[r][step][1], labels[images[r::world]])
            seen.append(torch.cat([parts[r][step][0] for r in range(world)]))
        seen_all = torch.cat(seen)
        assert sorted(seen_all.tolist()) == sorted(whole.order(epoch)[: len(seen_all)].tolist())
        if mode in ("none", "class_weights"):
            assert len(seen_all) == len(labels) and len(set(seen_all.tolist())) == len(labels)  # exactly once


def test_resumed_shard_continues_mid_epoch() -> None:
    labels = imbalanced_labels()
    loader = DeviceLoader(torch.arange(len(labels)), labels, 8, shuffle=True, seed=5, shard=(1, 2))
    full = list(loader.batches(2))
    assert [b[0].tolist() for b in loader.batches(2, start_step=3)] == [b[0].tolist() for b in full[3:]]


@pytest.mark.parametrize("mode", ["none", "oversample"])
def test_stream_and_device_loaders_give_each_rank_the_same_batches(mode: str) -> None:
    labels = imbalanced_labels()
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    for rank in (0, 1):
        device = DeviceLoader(torch.from_numpy(images), labels, 8, shuffle=True, seed=9, balance=mode,
                              shard=(rank, 2))  # fmt: skip
        stream = StreamLoader(images, labels.numpy(), np.arange(len(labels)), 8, shuffle=True, seed=9,
                              balance=mode, shard=(rank, 2))  # fmt: skip
        pairs = list(zip(device.batches(1), stream.batches(1), strict=True))
        assert pairs and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def test_shard_weight_makes_the_average_the_global_gradient() -> None:
    """Uneven shards (3 and 2 of 5): DDP averages the ranks' gradients; scaled by n·W/N the average is
    the gradient of the mean loss over the whole global batch."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, requires_grad=True)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])

    def gradient(rows: slice, scale: float) -> torch.Tensor:
        weight.grad = None
        (torch.nn.functional.cross_entropy(x[rows] @ weight, y[rows]) * scale).backward()
        return weight.grad.clone()

    full = gradient(slice(0, 5), 1.0)
    shards = [gradient(slice(0, 3), shard_weight(3, 5, Distributed(0, 2))),
              gradient(slice(3, 5), shard_weight(2, 5, Distributed(1, 2)))]  # fmt: skip
    torch.testing.assert_close((shards[0] + shards[1]) / 2, full)
    assert shard_weight(7, 9, Distributed()) == 1.0


def test_a_global_batch_smaller_than_the_rank_count_is_refused() -> None:
    check_last_batch(100, 10, Distributed(0, 4), shuffle=True)
    with pytest.raises(RecipeError, match="train.batch_size"):
        check_last_batch(102, 10, Distributed(0, 4), shuffle=True)  # a last batch of 2 for 4 ranks
    check_last_batch(101, 10, Distributed(0, 4), shuffle=True)  # a lone last image waits for the next epoch


# ------------------------------------------------------------------------------------------ rank 0 writes alone


def test_a_follower_run_writes_nothing(tmp_path: Path) -> None:
    run = RunDir.create(Recipe.load(overrides=[f"run.dir={tmp_path / 'run'}"]))
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("*")}
    follower = FollowerRun.open(run.path)
    with follower.lock():
        follower.write_json("data.json", {"x": 1})
        follower.append_metrics({"epoch": 1})
        follower.append_stats([{"step": 1}])
        follower.keep_metrics_through(0)
        follower.keep_stats_through(0)
        follower.write_metrics_csv()
    assert {p: p.stat().st_mtime_ns for p in run.path.rglob("*")} == before


def test_bad_nproc_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for value, fragment in (("0", "at least 1"), ("-2", "at least 1"), ("4096", "more ranks than")):
        try:
            code = main(["train", *TINY, "--nproc", value])
        except SystemExit as exit_:  # argparse's own refusal (our one-line form)
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, err


# --------------------------------------------------------------------------------------------- real process groups


def collectives(rank: int, world: int, folder: str) -> None:
    """One rank of the spawned group: exercises every collective `fit` relies on, writes what it saw."""
    import torch.distributed as dist

    from dragontrainer.train.distributed import create_run, current
    from dragontrainer.train.state import EpochMeter

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        where = current()
        seen: dict[str, object] = {"rank": where.rank, "world": where.world, "main": where.is_main}
        seen["broadcast"] = where.broadcast(f"from rank {rank}")
        seen["stop"] = where.max_int(15 if rank == 1 else 0)  # only rank 1 got SIGTERM
        seen["bad"] = where.first_bad(torch.tensor(9 if rank == 0 else 7), torch.tensor(0.1 if rank == 0 else 0.5))
        seen["no_bad"] = where.first_bad(torch.tensor(-1), torch.tensor(0.0))
        meter = EpochMeter(torch.device("cpu"))
        meter.update(torch.tensor(1.0 + rank), torch.eye(3)[[0, 1]], torch.tensor([0, rank]))  # 2 images
        where.fold_meter(meter)
        seen["meter"] = [float(meter.loss_sum), int(meter.correct), meter.seen]
        meter.update(torch.tensor(1.0), torch.eye(3)[[2]], torch.tensor([2]))  # 1 more image per rank
        where.fold_meter(meter)
        seen["meter_again"] = [float(meter.loss_sum), int(meter.correct), meter.seen]
        recipe = Recipe.load(overrides=[f"run.root={folder}/runs"])  # a timestamped default name
        run = create_run(recipe, where)
        seen["run"] = [str(run.path), type(run).__name__]
        try:
            create_run(recipe.with_overrides({"run.dir": str(run.path)}), where)  # not empty: refused
        except Exception as exc:
            seen["refused"] = [type(exc).__name__, str(exc)]
        Path(folder, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_collectives_agree_across_ranks(tmp_path: Path) -> None:
    """Two spawned gloo ranks: rank 0's values broadcast, a stop request seen by one rank stops both, the
    earliest divergence wins, the epoch meter's totals land on rank 0 once, the run folder (a timestamped
    default name) is rank 0's on both, and a refused run.dir stops both with the same line."""
    torch.multiprocessing.spawn(collectives, args=(2, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (zero["main"], one["main"]) == (True, False) and zero["world"] == one["world"] == 2
    assert zero["broadcast"] == one["broadcast"] == "from rank 0"
    assert zero["stop"] == one["stop"] == 15
    assert zero["bad"] == one["bad"] == [7, 0.5] and zero["no_bad"] == one["no_bad"] == [-1, 0.0]
    # losses 1 and 2 (mean of 2 images each), 3 correct of 4; then 1 more image per rank at loss 1, both right
    assert zero["meter"] == [6.0, 3, 4] and one["meter"] == [0.0, 0, 0]
    assert zero["meter_again"] == [8.0, 5, 6] and one["meter_again"] == [0.0, 0, 0]
    assert zero["run"][0] == one["run"][0] and (zero["run"][1], one["run"][1]) == ("RunDir", "FollowerRun")
    assert zero["refused"] == one["refused"] and "a run already exists here" in zero["refused"][1]
    assert sorted(p.name for p in Path(zero["run"][0]).iterdir()) == ["provenance.json", "recipe.yaml"]


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=1e-5, rtol=1e-4)


def test_two_ranks_match_one_process_and_only_rank_0_writes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`train(recipe, nproc=2)` (torchrun, gloo; gradient accumulation over 2 micro-batches, so DDP's
    no_sync is used) against one process with the same global batch: the same losses and weights to float
    rounding, the same run folder file for file, nothing else made, and one rank printing."""
    torch.set_num_threads(1)
    recipe = [*TINY, *EXACT, "train.epochs=2", "train.accumulate_steps=2"]
    one = train(Recipe.load(overrides=[*recipe, f"run.dir={tmp_path / 'one'}"]))
    capfd.readouterr()
    with monkeypatch_env(python_env()):
        two = train(Recipe.load(overrides=[*recipe, f"run.dir={tmp_path / 'two'}"]), nproc=2)
    assert capfd.readouterr().out.count("final validation accuracy") == 1  # rank 0 alone prints the result
    assert two.epochs == one.epochs == 2 and two.run_dir == tmp_path / "two"
    for a, b in zip(one.history, two.history, strict=True):
        assert (a["epoch"], a["split"], a.get("step"), a.get("images")) == (b["epoch"], b["split"], b.get("step"),
                                                                            b.get("images"))  # fmt: skip
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == pytest.approx(b["accuracy"])
    assert two.val_accuracy == pytest.approx(one.val_accuracy)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


@contextmanager
def monkeypatch_env(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


SLOW_MODEL = '''
import time
from torch import nn


class Slow(nn.Module):
    """A small MLP that takes its time in training, so a rank can be killed mid-run."""

    def __init__(self, inputs, classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        if self.training:
            time.sleep(0.015)
        return self.net(x)


def factory(spec, in_channels, num_classes, image_size):
    return Slow(in_channels * image_size * image_size, num_classes)
'''


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` among `launcher`'s children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def two_rank_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[subprocess.Popen, dict[str, str], list[str], Path, Path]:
    """A 2-rank torchrun training of the slow model, returned once its first `last` checkpoint exists:
    the job, its environment, its recipe, its run folder and the checkpoint's state.json."""
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**python_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{python_env()['PYTHONPATH']}"}
    recipe = [*TINY, *EXACT, "model.name=slow_model:factory", "train.epochs=3", "monitor.enabled=false"]
    run_dir = tmp_path / name
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dragontrainer",
         "train", *recipe, f"run.dir={run_dir}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    state = run_dir / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 120
    while job.poll() is None and time.time() < deadline and not state.is_file():
        time.sleep(0.02)
    return job, env, recipe, run_dir, state


def test_a_killed_rank_ends_the_job_and_the_run_resumes_with_one_or_two_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun with 2 ranks; rank 1 gets SIGKILL after the first epoch's checkpoint: the job ends
    (non-zero). The run then resumes with 1 rank (in this process) and with 2 ranks (`dragon resume
    --nproc 2`): both finish with the weights of an uninterrupted one-process run."""
    torch.set_num_threads(1)
    job, env, recipe, run_dir, state = two_rank_job(tmp_path, monkeypatch, "killed")
    victim = rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0, err.decode()[-2000:]
    saved = json.loads(state.read_text())["train"]
    assert saved["epoch"] >= 1 and saved["epoch"] < 3  # killed mid-run, after a checkpoint
    for name in ("one_rank", "two_ranks"):
        shutil.copytree(run_dir, tmp_path / name)

    resumed = resume(tmp_path / "one_rank")
    done = subprocess.run(
        [sys.executable, "-m", "dragontrainer", "resume", str(tmp_path / "two_ranks"), "--nproc", "2", "--quiet",
         "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed.epochs == json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 3
    reference = train(Recipe.load(overrides=[*recipe, f"run.dir={tmp_path / 'reference'}"]))
    for name in ("one_rank", "two_ranks"):
        assert_same_weights(tmp_path / name, reference.run_dir)
        history = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [(r["epoch"], r["split"], r["step"]) for r in history] == [
            (r["epoch"], r["split"], r["step"]) for r in reference.history
        ]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM reaches rank 1 only: the ranks agree on it (a reduced flag), both stop at the same step with
    `last` saved by rank 0 (no deadlock), and the run resumes to the end."""
    job, _, _, run_dir, state = two_rank_job(tmp_path, monkeypatch, "stopped")
    rank1 = rank_pid(job.pid, 1)
    assert rank1 is not None and job.poll() is None, "the job ended before the signal"
    os.kill(rank1, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    text = err.decode()
    assert job.returncode != 0 and text.count("SIGTERM: stopped at") == 1, text[-3000:]  # rank 0 says it, once
    saved = json.loads(state.read_text())["train"]
    assert saved["global_step"] % 10 == 0 and saved["step_in_epoch"] > 0  # stopped mid-epoch, at an agreed step
    assert resume(run_dir).epochs == 3
