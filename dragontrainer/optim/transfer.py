"""Transfer rules, Caffe style: per-stage learning-rate and weight-decay multipliers, freezing,
stop-gradient and frozen batch-norm statistics.

A rule's `match` is a regular expression that must fully match a parameter's name
(`blocks.1.0.branch.0.0.weight`, `layer1.0.conv1.weight`) or the name of the stage it belongs to
(`stem`, `blocks.N`, `head`). The first rule that matches a parameter decides for it; a parameter no
rule matches trains at the optimiser's learning rate and weight decay.

- `lr_mult: 0` freezes: `requires_grad` is turned off and the tensor is left out of the optimiser, but
  gradients still flow *through* the frozen layer to trainable layers below it.
- `stop_grad: true` detaches the activation entering the matched stage (Caffe's `propagate_down:
  false`): nothing below receives a gradient, whatever its learning rate.
- `freeze_bn: true` keeps the matched batch-norm layers in eval mode (running statistics are used and
  not updated), the usual companion of a frozen stage fine-tuned on small batches.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import TransferRule, TransferSpec

NO_RULE = "(no rule)"


@dataclass(frozen=True)
class GroupRow:
    """One line of the parameter-group table (frozen tensors included, though not in the optimiser)."""

    pattern: str
    kind: str  # decay | no_decay
    tensors: int
    parameters: int
    lr_mult: float
    weight_decay: float
    frozen: bool
    lr: float = 0.0

    def __str__(self) -> str:
        state = "frozen" if self.frozen else f"lr×{self.lr_mult:g}"
        return f"{self.pattern} {self.kind}: {self.tensors} tensors, {state}, weight_decay={self.weight_decay:g}"


def decays(param: torch.Tensor) -> bool:
    """Weight decay goes on conv kernels and weight matrices only (more than one value per output unit)."""
    return param.ndim >= 2 and param[0].numel() > 1


def stage_prefixes(model: nn.Module) -> dict[str, list[str]]:
    """Stage name -> module names it is made of; a model without named stages has none."""
    method = getattr(model, "stage_prefixes", None)
    return method() if callable(method) else {}


def stage_of(name: str, prefixes: dict[str, list[str]]) -> str | None:
    for stage, modules in prefixes.items():
        if any(name == m or name.startswith(f"{m}.") for m in modules):
            return stage
    return None


TOWER = re.compile(r"towers\.\d+\.")  # soft parameter sharing: one tower per task, each with the same stages


def rule_index(name: str, stage: str | None, rules: list[TransferRule]) -> int | None:
    """The first rule fully matching the name or its stage, also as named inside a task's tower
    (`stem` matches `towers.1.stem`; `towers.1.stem` matches that tower only)."""
    names = [n for n in (name, stage) if n is not None]
    names += [TOWER.sub("", n, count=1) for n in names if TOWER.match(n)]
    for i, rule in enumerate(rules):
        if any(re.fullmatch(rule.match, n) for n in names):
            return i
    return None


def detach_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def keep_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.training = False  # model.train() turned it back on: running statistics stay fixed


def apply_transfer(model: nn.Module, spec: TransferSpec) -> list[str]:
    """Freeze (lr_mult 0), hook stop-gradient stages and frozen batch norms; returns what was done, in words.
    Idempotent per fresh model: call once after the weights are loaded."""
    rules = spec.rules
    if not rules:
        return []
    prefixes = stage_prefixes(model)
    unused = set(range(len(rules)))
    for name, param in model.named_parameters():
        index = rule_index(name, stage_of(name, prefixes), rules)
        if index is not None:
            unused.discard(index)
            if rules[index].lr_mult == 0:
                param.requires_grad_(False)
    done = []
    stages = model.stages() if prefixes else {}
    for stage, entry in stages.items():
        index = rule_index(stage, stage, rules)
        if index is not None and rules[index].stop_grad:
            unused.discard(index)
            entry.register_forward_pre_hook(detach_input)
            done.append(f"gradient stopped at the input of {stage}")
    frozen_norms = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            index = rule_index(name, stage_of(name, prefixes), rules)
            if index is not None and rules[index].freeze_bn:
                module.register_forward_pre_hook(keep_eval)
                frozen_norms.append(name)
    if frozen_norms:
        done.append(f"{len(frozen_norms)} batch-norm layers keep their running statistics")
    if unused:
        names = ", ".join(repr(rules[i].match) for i in sorted(unused))
        raise RecipeError(
            f"recipe field transfer.rules: {names} decides for no parameter or stage (it matches none, or an "
            f"earlier rule takes all it matches; "
            f"stages: {', '.join(prefixes) or 'none'}; parameters like {next(iter(dict(model.named_parameters())))})"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError("recipe field transfer.rules: every parameter is frozen (lr_mult 0), nothing would learn")
    return done


def build_transfer_groups(
    model: nn.Module, weight_decay: float, spec: TransferSpec
) -> tuple[list[dict[str, Any]], list[GroupRow]]:
    """Optimiser groups per (rule, decay or not), each with its `lr_mult` and weight decay × `decay_mult`;
    frozen parameters appear in the table but not in the groups."""
    prefixes = stage_prefixes(model)
    buckets: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    frozen: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (rule_index(name, stage_of(name, prefixes), spec.rules), decays(param))
        (buckets if param.requires_grad else frozen).setdefault(key, []).append(param)
    groups, rows = [], []
    for bucket, is_frozen in ((buckets, False), (frozen, True)):
        for (index, decaying), params in bucket.items():
            rule = spec.rules[index] if index is not None else None
            lr_mult = rule.lr_mult if rule else 1.0
            decay = weight_decay * (rule.decay_mult if rule else 1.0) if decaying else 0.0
            pattern, kind = rule.match if rule else NO_RULE, "decay" if decaying else "no_decay"
            if not is_frozen:
                groups.append(
                    {"name": f"{pattern} {kind}", "params": params, "weight_decay": decay, "lr_mult": lr_mult}
                )
            row = GroupRow(pattern, kind, len(params), sum(p.numel() for p in params), lr_mult, decay, is_frozen)
            rows.append(row)
    return groups, rows


def with_lr(rows: list[GroupRow], lr: float) -> list[GroupRow]:
    return [GroupRow(**{**asdict(r), "lr": 0.0 if r.frozen else lr * r.lr_mult}) for r in rows]


def print_group_table(console: Console, rows: list[GroupRow]) -> None:
    table = Table("rule (match)", "kind", "tensors", "params", "lr", "weight decay", "frozen", title="parameter groups")
    for r in rows:
        table.add_row(
            r.pattern, r.kind, str(r.tensors), f"{r.parameters:,}", f"{r.lr:.3g}", f"{r.weight_decay:g}",
            "yes" if r.frozen else "",
        )  # fmt: skip
    console.print(table)


def record_group_table(run: Any, console: Console, rows: list[GroupRow], notes: list[str]) -> list[str]:
    """Print the table at the start of the run and keep it in the run folder (param_groups.json);
    returns the short summary for the start line."""
    print_group_table(console, rows)
    for note in notes:
        console.print(note)
    run.write_json("param_groups.json", {"groups": [asdict(r) for r in rows], "notes": notes})  # tracked by the run
    trained = sum(r.parameters for r in rows if not r.frozen)
    return [f"{len(rows)} groups in param_groups.json, {trained:,} of {sum(r.parameters for r in rows):,} params train"]


def with_head_group(spec: TransferSpec) -> TransferSpec:
    """The rules plus a last one that puts the head's parameters in groups of their own (two-stage
    training lowers every other group's learning rate to 0 at its switch)."""
    return spec.model_copy(update={"rules": [*spec.rules, TransferRule(match="head")]})


def depth_multipliers(stages: list[str], lowest: float = 0.1) -> list[TransferRule]:
    """`full` fine-tuning: lr_mult geometric in depth, 1 at the head down to `lowest` at the stem."""
    n = len(stages)
    return [
        TransferRule(match=re.escape(stage), lr_mult=round(lowest ** ((n - 1 - i) / max(n - 1, 1)), 4))
        for i, stage in enumerate(stages)
    ]
