"""The precision decision, made in one place: which dtype autocast runs the model in, and whether the loss
is scaled.

- fp32: no autocast.
- bf16: bfloat16 autocast. It has fp32's exponent range, so no loss scaling is needed.
- fp16 (CUDA only): float16 autocast with a GradScaler, because fp16's 5-bit exponent flushes small
  gradients to zero.
- auto: measured, not assumed. Other trainers refuse bf16 on CPU or switch silently, yet on a CPU with
  bf16 instructions it can be 1.5–2× faster, and on some models slower. A short probe on the run's own
  model and first batch times forward+backward in fp32 and in bf16 and compares their losses and
  gradients. bf16 is chosen only when it is faster by `MIN_SPEEDUP` and agrees; the measurements and
  the reason go to `precision.json` in the run folder, and a resumed run reads its decision back.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dragontrainer.errors import RecipeError
from dragontrainer.run import RunDir

PRECISION_FILE = "precision.json"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_SPEEDUP = 1.10  # bf16 must save at least this much step time to be worth its rounding
LOSS_TOLERANCE = 0.02  # |loss_bf16 − loss_fp32| / |loss_fp32| on the same batch and weights
MIN_GRAD_COSINE = 0.99  # the bf16 gradient must point where the fp32 one does
MIN_PROBE_STEPS = 100  # shorter runs keep fp32: the probe (~16 forward+backward) costs more than bf16 saves
WARMUP, TIMED = 2, 5  # probe steps per precision: untimed (kernel selection, caches), then alternating timed


@dataclass(frozen=True)
class Precision:
    """What the loop runs in, and why (written to precision.json)."""

    name: str  # fp32 | bf16 | fp16
    reason: str
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None runs in full precision."""
        return DTYPES[self.name]

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler(device.type) if self.name == "fp16" else None

    def describe(self) -> str:
        return f"precision {self.name}: {self.reason}"


@dataclass(frozen=True)
class ProbeResult:
    """One precision's side of the probe: median forward+backward seconds, loss, flattened gradient."""

    seconds: float
    loss: float
    gradient: torch.Tensor


def check_precision(name: str, device: torch.device) -> None:
    """fp16 without a GPU is refused before any work (CPUs have no fast fp16 and no use for a GradScaler)."""
    if name == "fp16" and device.type != "cuda":
        raise RecipeError(
            f"recipe field train.precision: fp16 needs a CUDA device, and this run uses {device.type}; "
            "use bf16 (or auto, which measures it) or fp32"
        )


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype where no probe can run (the stand-alone lr range test): auto is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return DTYPES[name]


def choose(fp32: ProbeResult, bf16: ProbeResult) -> Precision:
    """The auto rule: bf16 when it agrees with fp32 AND is faster by MIN_SPEEDUP; otherwise fp32, saying why."""
    speedup = fp32.seconds / max(bf16.seconds, 1e-12)
    loss_gap = abs(bf16.loss - fp32.loss) / max(abs(fp32.loss), 1e-6)
    cosine = gradient_cosine(fp32.gradient, bf16.gradient)
    measured = {"fp32_seconds": fp32.seconds, "bf16_seconds": bf16.seconds, "speedup": speedup,
                "fp32_loss": fp32.loss, "bf16_loss": bf16.loss, "loss_gap": loss_gap,
                "gradient_cosine": cosine}  # fmt: skip
    seen = f"bf16 {speedup:.2f}× fp32's speed, loss {bf16.loss:.4g} vs {fp32.loss:.4g}, gradient cosine {cosine:.4f}"
    if not (math.isfinite(bf16.loss) and loss_gap <= LOSS_TOLERANCE and cosine >= MIN_GRAD_COSINE):
        return Precision("fp32", f"auto measured bf16 disagreeing with fp32 ({seen})", measured)
    if speedup < MIN_SPEEDUP:
        return Precision("fp32", f"auto measured bf16 not faster by {MIN_SPEEDUP:g}× ({seen})", measured)
    return Precision("bf16", f"auto measured bf16 faster and agreeing ({seen})", measured)


def gradient_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norms = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0  # a model with no gradient yet agrees with itself
    value = float(torch.dot(a, b)) / norms
    return value if math.isfinite(value) else 0.0


def decide_precision(
    name: str, run: RunDir, model: nn.Module, batch: Callable[[], tuple[torch.Tensor, Any]], criterion: nn.Module,
    device: torch.device, console: Console, *, total_steps: int, resume: bool,
) -> Precision:  # fmt: skip
    """`train.precision` for this run: explicit names as asked; auto from the run's record when resumed
    (the decision must not change mid-run), else measured by `probe`. Recorded in precision.json.
    `fit` has refused fp16 without CUDA already (check_precision, before any work)."""
    saved = run.file(PRECISION_FILE)
    if resume:
        if saved.is_file():
            record = json.loads(saved.read_text(encoding="utf-8"))
            if record.get("precision") in DTYPES:
                return Precision(record["precision"], record.get("reason", "as recorded"), record.get("measured", {}))
        if name == "auto":  # a run from before precision.json: the old auto (bf16 on CUDA only)
            return Precision("bf16" if device.type == "cuda" else "fp32", "auto, as runs before the probe decided")
    if name != "auto":
        precision = Precision(name, f"train.precision={name}")
    elif total_steps < MIN_PROBE_STEPS:
        precision = Precision("fp32", f"auto: a run of {total_steps} steps is too short for bf16 to repay its probe")
    else:
        inputs, targets = batch()
        precision = choose(*probe(model, criterion, inputs, targets, device))
    run.write_json(PRECISION_FILE, {"precision": precision.name, "reason": precision.reason,
                                   "measured": precision.measured})  # fmt: skip
    return precision


def probe(
    model: nn.Module, criterion: nn.Module, inputs: torch.Tensor, targets: Any, device: torch.device
) -> tuple[ProbeResult, ProbeResult]:
    """Forward+backward on one batch in fp32 and in bf16, from the same weights, dropout off (so both see
    the same network), timed alternately. Weights, batch-norm statistics, gradients and every random
    state are restored: an auto run that keeps fp32 trains exactly as an explicit fp32 run."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for module in dropouts:
        module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        sides: dict[str, list[tuple[float, float]]] = {"fp32": [], "bf16": []}
        gradients: dict[str, torch.Tensor] = {}
        for step in range(WARMUP + TIMED):
            for name in sides:
                model.load_state_dict(saved)  # every step from the same weights and statistics
                seconds, loss = timed_step(model, criterion, inputs, targets, device, DTYPES[name] or torch.float32,
                                           params)  # fmt: skip
                if step >= WARMUP:
                    sides[name].append((seconds, loss))
                if step == 0:
                    gradients[name] = torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])
            if step >= WARMUP and clearly_slower([s for s, _ in sides["bf16"]], [s for s, _ in sides["fp32"]]):
                break  # no need to measure the rest: bf16 will not be chosen
        results = [
            ProbeResult(statistics.median(s for s, _ in sides[name]), sides[name][0][1], gradients[name])
            for name in ("fp32", "bf16")
        ]
    finally:
        for p in params:
            p.grad = None
        model.load_state_dict(saved)
        for module in dropouts:
            module.train()
        model.train(was_training)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    return results[0], results[1]


def clearly_slower(bf16: list[float], fp32: list[float]) -> bool:
    """Every bf16 step slower than every fp32 step by half again: the probe can stop early."""
    return min(bf16) > 1.5 * max(fp32)


def timed_step(
    model: nn.Module, criterion: nn.Module, inputs: torch.Tensor, targets: Any, device: torch.device,
    dtype: torch.dtype, params: list[nn.Parameter],
) -> tuple[float, float]:  # fmt: skip
    for p in params:
        p.grad = None
    synchronize(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(inputs)
    loss = criterion(logits.float(), targets)
    loss.backward()
    synchronize(device)
    return time.perf_counter() - started, float(loss.detach())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
