from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import Recipe, parse_override, schema_keys


def test_defaults_are_the_reference_summary_recipe() -> None:
    recipe = Recipe()
    assert recipe.model.activation == "relu" and recipe.model.init == "he" and recipe.model.norm == "batch"
    assert recipe.optim.name == "sgd" and recipe.optim.nesterov and recipe.optim.momentum == 0.9
    assert recipe.optim.weight_decay == 5e-4 and recipe.train.label_smoothing == 0.1
    assert recipe.schedule.name == "cosine" and recipe.schedule.warmup_epochs == "auto"
    assert recipe.train.batch_size == 128 and recipe.preprocess.name == "standardize"


def test_yaml_round_trip_gives_an_equal_recipe(tmp_path: Path) -> None:
    recipe = Recipe.load(overrides=["optim.lr=0.03", "model.widths=[8,16]", "train.epochs=7", "data.test_fraction=0.1"])
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 4\n")
    recipe = Recipe.load(path, ["train.epochs=9"])
    assert recipe.optim.lr == 0.5 and recipe.train.epochs == 9


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(RecipeError, match=r"unknown key optim\.lrr, did you mean optim\.lr\?"):
        Recipe.load(overrides=["optim.lrr=0.1"])


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(RecipeError, match="unknown key trian, did you mean train"):
        Recipe.load(path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lr=-1", "optim.lr: input should be greater than 0"),
        ("model.dropout=1.0", "model.dropout: input should be less than 1"),
        ("optim.momentum=1", "optim.momentum: input should be less than 1"),
        ("train.epochs=abc", "train.epochs: input should be a valid integer"),
        ("train.batch_size=0", "train.batch_size: input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_field_and_range(override: str, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment):
        Recipe.load(overrides=[override])


def test_unknown_component_name_suggests_a_registered_one() -> None:
    with pytest.raises(RecipeError, match="unknown optimizer 'adm'. Did you mean 'adam'"):
        Recipe.load(overrides=["optim.name=adm"])


def test_recipe_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping of sections"):
        Recipe.load(path)


def test_warmup_longer_than_the_run_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"warmup_epochs \(5.0\) must be shorter than train.epochs \(3\)"):
        Recipe.load(overrides=["train.epochs=3", "schedule.warmup_epochs=5"])


def test_override_values_are_read_as_yaml() -> None:
    assert parse_override("model.widths=[1, 2]") == ("model.widths", [1, 2])
    assert parse_override("run.dir=null") == ("run.dir", None)
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        parse_override("optim.lr")


def test_every_schema_key_is_settable_by_override() -> None:
    recipe = Recipe()
    for key, section in schema_keys().items():
        if section is None:
            node = recipe
            for part in key.split("."):
                node = getattr(node, part)
            assert recipe.with_overrides({key: node}) == recipe, key


def test_yaml_on_off_words_are_kept_as_switch_values() -> None:
    """YAML 1.1 reads `on`/`off` as booleans; the switches take them back as words."""
    recipe = Recipe.load(overrides=["train.amp=on", "monitor.tensorboard=off"])  # train.amp: now train.precision
    assert recipe.train.precision == "bf16" and recipe.monitor.tensorboard == "off"
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 20,000 values through aliases"):
        Recipe.load(path)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(RecipeError, match="expands to more than"):
        Recipe.load(overrides=["model.widths=" + billion_laughs(6).replace("\n", ", ").join("{}")])


def test_small_aliases_still_work_and_recursive_or_deep_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  widths: &w [8, 16]\n  name: vgg\n")
    assert Recipe.load(path).model.widths == [8, 16]
    path.write_text("a: &a [*a]\n")
    with pytest.raises(RecipeError, match="refers to itself"):
        Recipe.load(path)
    path.write_text("x: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        Recipe.load(path)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"d.yaml: duplicate key 'lr' \(lines 2 and 4\)"):
        Recipe.load(path)


@pytest.mark.parametrize("item", ["optim.lr=" + "x" * 5000, "y" * 5000 + "=1", "model.widths=[" + "0," * 3000 + "]"])
def test_messages_never_echo_more_than_about_200_characters_of_a_value(item: str) -> None:
    with pytest.raises(RecipeError) as caught:
        Recipe.load(overrides=[item])
    message = str(caught.value)
    assert len(message) < 700 and "more characters" in message
