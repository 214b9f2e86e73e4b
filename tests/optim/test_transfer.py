"""transfer.rules: freezing, lr/decay multipliers, stop-gradient, frozen batch norm, the group table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import RecipeError, train
from dragontrainer.nn.models import create_model
from dragontrainer.optim.optimizers import create_optimizer
from dragontrainer.optim.transfer import apply_transfer, build_transfer_groups, depth_multipliers
from dragontrainer.recipe import ModelSpec, OptimSpec, Recipe, TransferSpec
from tests.conftest import TINY, make_npz


def vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelSpec(name="vgg", widths=[4, 8, 8], depth=1), in_channels=1, num_classes=3, image_size=8)


def spec(*rules: dict) -> TransferSpec:
    return TransferSpec(rules=list(rules))


def backward_once(model: torch.nn.Module) -> None:
    model(torch.randn(6, 1, 8, 8)).square().mean().backward()


def test_stop_grad_cuts_every_gradient_below_while_freezing_alone_lets_them_flow() -> None:
    frozen_middle = vgg()
    apply_transfer(frozen_middle, spec({"match": "blocks.1", "lr_mult": 0}))
    backward_once(frozen_middle)
    assert frozen_middle.blocks[1][1][0].weight.grad is None  # frozen: no gradient of its own
    assert frozen_middle.stem[0].weight.grad.abs().sum() > 0  # ... but the stem below still learns

    stopped = vgg()
    apply_transfer(stopped, spec({"match": "blocks.1", "stop_grad": True}))
    backward_once(stopped)
    below = [p for name, p in stopped.named_parameters() if name.startswith(("stem", "blocks.0"))]
    assert below and all(p.grad is None for p in below)
    assert stopped.blocks[1][1][0].weight.grad.abs().sum() > 0  # the stage itself still learns


def test_groups_carry_lr_and_decay_multipliers_and_leave_frozen_tensors_out() -> None:
    model = vgg()
    transfer = spec({"match": "stem|blocks.0", "lr_mult": 0}, {"match": "blocks.1", "lr_mult": 0.1, "decay_mult": 2.0})
    apply_transfer(model, transfer)
    groups, rows = build_transfer_groups(model, 5e-4, transfer)
    optimizer = create_optimizer(groups, OptimSpec(), lr=0.2)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["blocks.1 decay"]["base_lr"] == pytest.approx(0.02)
    assert by_name["blocks.1 decay"]["weight_decay"] == pytest.approx(1e-3)
    assert by_name["blocks.1 no_decay"]["weight_decay"] == 0.0
    assert by_name["(no rule) decay"]["base_lr"] == pytest.approx(0.2)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [p for n, p in model.named_parameters() if n.startswith(("stem", "blocks.0"))]
    assert frozen and not any(id(p) in in_optimizer for p in frozen)
    assert {r.pattern for r in rows if r.frozen} == {"stem|blocks.0"}


def test_freeze_bn_keeps_running_statistics_in_training_mode() -> None:
    model = vgg()
    apply_transfer(model, spec({"match": "stem", "lr_mult": 0, "freeze_bn": True}))
    model.train()
    norm = model.stem[1]
    before = norm.running_mean.clone()
    model(torch.randn(6, 1, 8, 8) * 3 + 2)
    assert torch.equal(norm.running_mean, before)
    assert not torch.equal(model.blocks[1][1][1].running_mean, torch.zeros(8))  # unfrozen norms do update


def test_rules_that_cannot_work_are_refused() -> None:
    with pytest.raises(RecipeError, match="decides for no parameter"):
        apply_transfer(vgg(), spec({"match": "layer9.*", "lr_mult": 0}))
    with pytest.raises(RecipeError, match="every parameter is frozen"):
        apply_transfer(vgg(), spec({"match": ".*", "lr_mult": 0}))
    with pytest.raises(RecipeError, match="transfer.rules"):
        Recipe.load(overrides=["transfer.rules=[{match: '(unclosed', lr_mult: 0}]"])
    with pytest.raises(RecipeError, match="lr_mult"):
        Recipe.load(overrides=["transfer.rules=[{match: stem, lr_mult: -1}]"])


def test_rules_from_the_command_line_as_a_yaml_flow_list() -> None:
    recipe = Recipe.load(overrides=['transfer.rules=[{match: "stem.*", lr_mult: 0}, {match: head, decay_mult: 0}]'])
    assert [(r.match, r.lr_mult, r.decay_mult) for r in recipe.transfer.rules] == [("stem.*", 0, 1), ("head", 1, 0)]


def test_depth_multipliers_are_geometric_from_stem_to_head() -> None:
    mults = [r.lr_mult for r in depth_multipliers(["stem", "blocks.0", "head"], lowest=0.01)]
    assert mults == pytest.approx([0.01, 0.1, 1.0])


def test_a_frozen_stem_stays_bitwise_equal_and_the_source_preprocessing_comes_along(tmp_path: Path) -> None:
    source = train(overrides=[*TINY, "train.epochs=1", f"run.dir={tmp_path / 'source'}"])
    data = make_npz(tmp_path / "other.npz", n=60, classes=3, size=8)
    target = train(overrides=[
        *TINY, "train.epochs=1", "data.source=npz", f"data.path={data}", f"model.weights={source.run_dir}",
        "transfer.rules=[{match: stem, lr_mult: 0}]", f"run.dir={tmp_path / 'target'}",
    ])  # fmt: skip
    before = load_file(str(source.run_dir / "checkpoints" / "best" / "model.safetensors"))
    after = load_file(str(target.run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert torch.equal(before["stem.1.0.weight"], after["stem.1.0.weight"])
    assert not torch.equal(before["head.weight"][:3], after["head.weight"])  # a new 3-class head that trained
    source_stats = load_file(str(source.run_dir / "preprocess.safetensors"))
    target_stats = load_file(str(target.run_dir / "preprocess.safetensors"))
    assert all(torch.equal(source_stats[k], target_stats[k]) for k in source_stats)
    table = json.loads((target.run_dir / "param_groups.json").read_text())["groups"]
    assert {(g["pattern"], g["frozen"]) for g in table} == {("stem", True), ("(no rule)", False)}
    refit = train(overrides=[
        *TINY, "train.epochs=1", "data.source=npz", f"data.path={data}", f"model.weights={source.run_dir}",
        "transfer.preprocess=refit", f"run.dir={tmp_path / 'refit'}",
    ])  # fmt: skip
    refit_stats = load_file(str(refit.run_dir / "preprocess.safetensors"))
    assert not all(torch.equal(source_stats[k], refit_stats[k]) for k in source_stats)


def test_stage_rules_reach_every_task_tower_of_soft_sharing() -> None:
    """`stem` freezes the stem of every task's tower; `towers.1.head` addresses one tower only."""
    from dragontrainer.nn.multitask import create_multitask_model
    from dragontrainer.recipe import MultitaskSpec

    model = create_multitask_model(
        ModelSpec(name="vgg", widths=[4, 8], depth=1), MultitaskSpec(tasks=["a", "b"], sharing="soft"),
        in_channels=1, task_sizes=[3, 2, 2], image_size=8,
    )  # fmt: skip
    apply_transfer(model, spec({"match": "stem", "lr_mult": 0}, {"match": "towers.1.head", "lr_mult": 0}))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and {name.split(".")[2] for name in frozen} == {"stem", "head"}
    assert {name.split(".")[1] for name in frozen if ".stem." in name} == {"0", "1", "2"}
    assert {name.split(".")[1] for name in frozen if ".head." in name} == {"1"}
