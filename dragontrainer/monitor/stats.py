"""Cheap watching of a run, written to `stats.jsonl` for the diagnosis rules and the report.

Three kinds of lines, each with the optimiser `step` it belongs to (so a resumed run drops what
came after its checkpoint):
- `step`: every optimiser step — loss, learning rate, global gradient norm, classes in the batch.
  Kept on the device and written at the end of the epoch (one sync per epoch, not per step).
- `layers`: every `every` steps — per weight tensor the gradient norm, weight norm, the update the
  optimiser applied ‖Δθ‖/‖θ‖ and the distance from initialisation; per activation module the
  mean, std, percentiles, dead and saturated fractions on a fixed probe batch (eval mode, no
  gradient: the probe changes neither weights, batch-norm statistics nor any RNG); at every 8th
  sample the gradient noise scale from gradients at two batch sizes (McCandlish et al. 2018).
- `epoch`: per-class validation accuracy and the confusion matrix.
Plus one `probe` line at the start: the statistics of the network's input after preprocessing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dragontrainer.nn.activations import ReferenceRReLU
from dragontrainer.nn.layers import DropConnectLinear
from dragontrainer.recipe import MonitorSpec

ACTIVATION_TYPES = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", ReferenceRReLU: "rrelu",
    nn.ELU: "elu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
}  # fmt: skip
# outputs beyond these have a local gradient below ~0.02: the unit is saturated (CS231n, "Activation functions")
SATURATION = {"sigmoid": (0.01, 0.99), "tanh": (-0.99, 0.99)}
PERCENTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, DropConnectLinear)
QUANTILE_SAMPLE = 4096  # activations subsampled for percentiles: ±1% of rank, a fraction of the cost
ACTIVATION_FIELDS = ("mean", "std", "p01", "p25", "p50", "p75", "p99", "dead", "saturated")
PARAM_FIELDS = ("grad_norm", "weight_norm", "update_ratio", "dist_init")
NOISE_SCALE_CHUNKS = 2
NOISE_SCALE_EVERY = 8  # layer samples between noise-scale estimates (each costs about half a step)


def sample_every(spec: MonitorSpec, steps_per_epoch: int) -> int:
    """Steps between layer samples: as set, or about four per epoch but never more often than every
    20 steps. With the per-step series this is 3.2–3.4% of the default digits run's training time, timed
    inside the loop (bench/throughput.py --monitor-overhead measures it from outside)."""
    return spec.every or max(20, steps_per_epoch // 4)


def watched_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv kernels and linear weights (tensors with a fan-in): the layers whose health matters."""
    return {name.removesuffix(".weight"): p for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def watched_activations(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {
        name: (module, ACTIVATION_TYPES[type(module)])
        for name, module in model.named_modules()
        if type(module) in ACTIVATION_TYPES
    }


def activation_summary(output: torch.Tensor, kind: str) -> torch.Tensor:
    """[mean, std, p01, p25, p50, p75, p99, dead, saturated] of one layer's output on the probe batch.
    A channel (unit) is dead when it is ≤ 0 for every sample and position."""
    x = output.detach().float()
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[:: flat.numel() // QUANTILE_SAMPLE + 1]
    quantiles = torch.quantile(flat, torch.tensor(PERCENTILES, device=x.device))
    per_channel_max = x.amax(dim=[d for d in range(x.ndim) if d != 1]) if x.ndim > 1 else x.amax().reshape(1)
    dead = (per_channel_max <= 0).float().mean()
    if kind in SATURATION:
        low, high = SATURATION[kind]
        saturated = ((x < low) | (x > high)).float().mean()
    else:
        saturated = torch.full((), float("nan"), device=x.device)
    return torch.cat([x.mean().reshape(1), x.std().reshape(1), quantiles, dead.reshape(1), saturated.reshape(1)])


@dataclass
class Pending:
    """Lines measured but not yet written: device tensors until the flush's single sync."""

    steps: list[tuple[int, int, float, torch.Tensor]] = field(default_factory=list)
    layers: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


class Monitor:
    """Measures the run at sampled steps; `flush` writes everything measured so far to stats.jsonl."""

    def __init__(
        self,
        model: nn.Module,
        spec: MonitorSpec,
        *,
        steps_per_epoch: int,
        probe: torch.Tensor,
        noise_batch: Any,
        criterion: nn.Module,
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.every = sample_every(spec, steps_per_epoch)
        self.probe = probe  # preprocessed float inputs
        self.noise_batch = noise_batch  # step -> (inputs, labels): random training images for the noise scale
        self.criterion = criterion
        self.params = watched_parameters(model)
        self.activations = watched_activations(model)
        initial = initial or {name: p.detach().clone() for name, p in self.params.items()}
        self.initial = [initial[name] for name in self.params]  # network order, as the statistics
        self.initial_norms = torch.stack(torch._foreach_norm(self.initial)).clamp_min(1e-12)  # constant: once
        self.pending = Pending()
        self.samples = 0
        self.before: list[torch.Tensor] | None = None
        self.grad_norms: torch.Tensor | None = None

    # ------------------------------------------------------------------------------ per step

    def record_step(self, step: int, epoch: int, lr: float, values: torch.Tensor) -> None:
        """`values` = [loss, gradient norm, distinct classes in the batch], still on the device."""
        self.pending.steps.append((step, epoch, lr, values.detach()))

    def sampling(self, step: int) -> bool:
        """Whether the optimiser step about to be taken (numbered `step` + 1) is sampled."""
        return (step + 1) % self.every == 0 or step == 0

    def before_update(self) -> None:
        """Gradients and weights just before the optimiser step of a sampled step."""
        params = list(self.params.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.grad_norms = torch.stack(torch._foreach_norm(grads))
        self.before = [p.detach().clone() for p in params]

    def after_update(self, step: int, epoch: int) -> None:
        """The update the optimiser applied, then the activations on the probe batch."""
        assert self.before is not None and self.grad_norms is not None
        params = [p.detach() for p in self.params.values()]
        weight_norms = torch.stack(torch._foreach_norm(params))
        update_norms = torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.before)))
        dist_init = torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.initial))) / self.initial_norms
        before_norms = torch.stack(torch._foreach_norm(self.before)).clamp_min(1e-12)
        param_stats = torch.stack([self.grad_norms, weight_norms, update_norms / before_norms, dist_init], 1)
        self.before = None
        activation_stats = self.probe_activations()
        noise = self.noise_scale(step) if self.spec.noise_scale and self.samples % NOISE_SCALE_EVERY == 0 else None
        self.samples += 1
        self.pending.layers.append((step, epoch, param_stats, activation_stats, noise))

    @torch.no_grad()
    def probe_activations(self) -> torch.Tensor:
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str, kind: str) -> Any:
            return lambda module, inputs, output: outputs.__setitem__(name, activation_summary(output, kind))

        handles = [module.register_forward_hook(keep(name, kind)) for name, (module, kind) in self.activations.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.probe)
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
        if not outputs:
            return torch.zeros((0, len(ACTIVATION_FIELDS)), device=self.probe.device)
        return torch.stack([outputs[name] for name in self.activations])

    def noise_scale(self, step: int) -> torch.Tensor:
        """[|G|², S] from gradients of `NOISE_SCALE_CHUNKS` small batches and of their union (the simple
        estimator of McCandlish et al. 2018, appendix A); B_noise = S / |G|² once averaged over samples.
        Eval mode and `autograd.grad`: neither the training gradients nor any statistics are touched."""
        inputs, labels = self.noise_batch(step)
        params = list(self.params.values())
        was_training = self.model.training
        self.model.eval()
        try:
            chunk_grads = [
                torch.autograd.grad(self.criterion(self.model(x), y), params, allow_unused=True)
                for x, y in zip(inputs.chunk(NOISE_SCALE_CHUNKS), labels.chunk(NOISE_SCALE_CHUNKS), strict=True)
            ]
        finally:
            self.model.train(was_training)
        chunk_grads = [
            [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params, strict=True)] for gs in chunk_grads
        ]
        small = len(inputs) // NOISE_SCALE_CHUNKS
        big = small * NOISE_SCALE_CHUNKS
        small_sq = torch.stack([sum(n**2 for n in torch._foreach_norm(gs)) for gs in chunk_grads]).mean()
        mean_grads = [torch.stack(parts).mean(0) for parts in zip(*chunk_grads, strict=True)]
        big_sq = sum(n**2 for n in torch._foreach_norm(mean_grads))
        true_sq = (big * big_sq - small * small_sq) / (big - small)
        trace = (small_sq - big_sq) / (1 / small - 1 / big)
        return torch.stack([true_sq, trace])

    # ------------------------------------------------------------------------------ records

    def add_record(self, record: dict[str, Any]) -> None:
        self.pending.records.append(record)

    def probe_record(self, num_classes: int, labels: torch.Tensor) -> dict[str, Any]:
        return {
            "kind": "probe", "step": 0, "images": len(self.probe), **input_summary(self.probe),
            "classes": torch.bincount(labels.cpu(), minlength=num_classes).tolist(),
            "initial_loss": finite(self.initial_loss(labels)),
        }  # fmt: skip

    @torch.no_grad()
    def initial_loss(self, labels: torch.Tensor) -> float:
        """The loss at initialisation on the probe batch with dropout off: what the weights alone give
        (dropout's 1/(1−p) scaling inflates the first training loss without saying anything about the
        initialisation). A copy runs in train mode, so batch norm normalises as in the first step and
        the model's own running statistics and RNG streams stay untouched."""
        model = copy.deepcopy(self.model).train()
        for module in model.modules():
            if isinstance(module, DROPOUT_TYPES):
                module.eval()
        return float(nn.functional.cross_entropy(model(self.probe).float(), labels))

    def flush(self) -> list[dict[str, Any]]:
        """Everything pending as JSON-ready lines (the device syncs happen here, once per epoch)."""
        lines: list[dict[str, Any]] = []
        if self.pending.steps:
            values = torch.stack([v for *_, v in self.pending.steps]).tolist()
            for (step, epoch, lr, _), (loss, grad_norm, classes) in zip(self.pending.steps, values, strict=True):
                lines.append({
                    "kind": "step", "step": step, "epoch": epoch, "lr": lr, "loss": finite(loss),
                    "grad_norm": finite(grad_norm), "batch_classes": int(classes),
                })  # fmt: skip
        names = list(self.params)
        activation_names = list(self.activations)
        for step, epoch, param_stats, activation_stats, noise in self.pending.layers:
            record: dict[str, Any] = {"kind": "layers", "step": step, "epoch": epoch}
            record["params"] = {n: dict(zip(PARAM_FIELDS, map(finite, row), strict=True))
                                for n, row in zip(names, param_stats.tolist(), strict=True)}  # fmt: skip
            record["activations"] = {
                n: {"type": self.activations[n][1], **dict(zip(ACTIVATION_FIELDS, map(finite, row), strict=True))}
                for n, row in zip(activation_names, activation_stats.tolist(), strict=True)
            }
            if noise is not None:
                true_sq, trace = noise.tolist()
                record["noise"] = {"g2": finite(true_sq), "trace": finite(trace)}
            lines.append(record)
        lines.extend(self.pending.records)
        lines.sort(key=lambda r: (r["step"], r["kind"] != "step"))
        self.pending = Pending()
        return lines


def input_summary(x: torch.Tensor) -> dict[str, Any]:
    """What the network's first layer sees: overall and per-channel mean and std, range."""
    x = x.float()
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    return {
        "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
        "channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist(),
    }  # fmt: skip


def input_problem(summary: dict[str, Any]) -> Literal["scale", "centre"] | None:
    """`scale`: the spread is far from 1; `centre`: a channel's mean is large against its spread
    (CS231n: zero-centre, then normalise). Shared by the diagnosis and `dragon doctor`."""
    if summary["std"] > 10 or summary["std"] < 0.05:
        return "scale"
    pairs = zip(summary["channel_mean"], summary["channel_std"], strict=True)
    if any(abs(m) > 0.5 * max(s, 1e-12) and abs(m) > 0.1 for m, s in pairs):
        return "centre"
    return None


def finite(value: float) -> float | None:
    """JSON has no NaN/Inf: a non-finite value is written as null."""
    return value if value == value and abs(value) != float("inf") else None


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted], on the device."""
    return add_to_confusion(None, labels, predictions, num_classes)


def add_to_confusion(
    confusion: torch.Tensor | None, labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """`confusion[true][predicted] += 1` for a batch, in place (torch.bincount would sync the host on
    CUDA to find its length, and allocate a C×C matrix per batch)."""
    if confusion is None:
        confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=labels.device)
    cells = labels * num_classes + predictions
    confusion.view(-1).index_put_((cells,), torch.ones_like(cells), accumulate=True)
    return confusion
