"""dragon doctor: a healthy recipe passes; each planted problem fails (or warns on) its check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from dragontrainer import doctor
from dragontrainer.cli import main
from dragontrainer.monitor.doctor import Patient, gradient_flow
from tests.monitor.scenarios import digits, digits_with

SMALL = ["model.widths=[16,32,32]"]


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_healthy_recipe_passes_every_check_quickly() -> None:
    report = doctor(overrides=SMALL)
    assert statuses(report) == dict.fromkeys(
        ["input_statistics", "class_balance", "flip_meaning", "batch_labels", "split_overlap", "label_consistency",
         "initial_loss",
         "gradient_flow", "overfit_batch", "lr_probe"], "pass")  # fmt: skip
    assert not report.failed and report.seconds < 60
    assert report.check("label_consistency").numbers["agreement"] > 0.9


def test_unnormalised_inputs_are_caught() -> None:
    report = doctor(overrides=[*SMALL, "preprocess.name=none"])
    check = report.check("input_statistics")
    assert check.status == "warn" and "not zero-centred" in check.message and "standardize" in check.message


def test_shuffled_labels_fail_and_exit_1(tmp_path: Path, capsys) -> None:
    overrides = [*SMALL, *digits_with("shuffled_labels", tmp_path)]
    report = doctor(overrides=overrides)
    assert report.check("label_consistency").status == "fail" and report.failed
    assert "unrelated" in report.check("label_consistency").message
    assert report.check("overfit_batch").status == "pass"  # memorising still works: only the labels are wrong
    assert main(["doctor", *overrides, "--json"]) == 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["ok"] is False and {c["name"] for c in printed["checks"]} >= {"label_consistency"}


def test_data_ordered_by_label_without_shuffling_fails(tmp_path: Path) -> None:
    report = doctor(overrides=[*SMALL, *digits_with("sorted_by_label", tmp_path), "train.shuffle=false"])
    assert report.check("batch_labels").status == "fail"
    assert doctor(overrides=[*SMALL, *digits_with("sorted_by_label", tmp_path)]).check("batch_labels").status == "pass"


def test_duplicates_across_splits_fail(tmp_path: Path) -> None:
    x, y = np.stack(digits()[0]), digits()[1]
    np.savez(tmp_path / "twice.npz", x=np.concatenate([x, x]), y=np.concatenate([y, y]))
    report = doctor(overrides=[*SMALL, "data.source=npz", f"data.path={tmp_path / 'twice.npz'}"])
    check = report.check("split_overlap")
    assert check.status == "fail" and check.numbers["duplicates"] > 100


def test_oversized_initial_weights_fail_the_initial_loss() -> None:
    report = doctor(overrides=[*SMALL, "model.norm=none", "model.init=normal", "model.init_std=1.0"])
    assert report.check("initial_loss").status == "fail" and "ln 10" in report.check("initial_loss").message


def test_imbalanced_classes_warn(tmp_path: Path) -> None:
    report = doctor(overrides=[*SMALL, *digits_with("imbalanced", tmp_path)])
    assert report.check("class_balance").status == "warn"


def test_gradient_flow_names_unused_parameters() -> None:
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.recipe import Recipe
    from dragontrainer.train.device import resolve_device

    recipe = Recipe.load(overrides=["model.name=mlp", "model.widths=[16]"])
    device = resolve_device("cpu")
    patient = Patient(recipe, prepare_data(recipe, device), device)
    build = patient.model

    def with_unused() -> nn.Module:
        model = build()
        model.unused = nn.Linear(3, 3)
        return model

    patient.model = with_unused  # type: ignore[method-assign]
    check = gradient_flow(patient)
    assert check.status == "fail" and "unused.weight" in check.message


@pytest.mark.parametrize("argv", [["doctor", "model.lrr=1"], ["doctor", "missing.yaml"]])
def test_bad_recipe_is_a_one_line_error(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_doctor_warns_when_flipping_changes_what_images_are(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from dragontrainer.api import doctor

    bunch = load_digits()  # digits as a user's npz: flips are on (auto) although a mirrored 3 is not a 3
    np.savez(tmp_path / "d.npz", x=(bunch.images * 255 / 16).astype(np.uint8), y=bunch.target)
    report = doctor(overrides=[f"data.path={tmp_path / 'd.npz'}", "model.name=mlp", "model.widths=[32]"])
    check = report.check("flip_meaning")
    assert check.status == "warn" and "augment.hflip.p=0" in check.message
    symmetric = np.random.default_rng(0).integers(0, 255, size=(200, 8, 4), dtype=np.uint8)
    symmetric = np.concatenate([symmetric, symmetric[:, :, ::-1]], axis=2)  # every image its own mirror
    np.savez(tmp_path / "s.npz", x=symmetric, y=np.arange(200) % 2)
    report = doctor(overrides=[f"data.path={tmp_path / 's.npz'}", "model.name=mlp", "model.widths=[32]"])
    assert report.check("flip_meaning").status == "pass"
