"""`dragon --version`, `dragontrainer.__version__` and the one-line `dragon components` listing."""

from __future__ import annotations

from importlib import metadata

import pytest

import dragontrainer
from dragontrainer.cli import main, short_description
from dragontrainer.registry import all_components


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert dragontrainer.__version__ == metadata.version("dragontrainer")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dragon {dragontrainer.__version__}"


def test_components_prints_one_line_per_component(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["components"]) == 0
    lines = capsys.readouterr().out.splitlines()
    components = all_components()
    assert len(lines) == sum(len(entries) for entries in components.values())
    assert all(len(line) <= 130 for line in lines)
    kind, name, _ = lines[0].split(maxsplit=2)
    first_kind = next(iter(components))
    assert (kind, name) == (first_kind, next(iter(components[first_kind])))
    assert main(["components", "--verbose"]) == 0  # the full descriptions, in a table
    verbose = capsys.readouterr().out
    longest = max((d for entries in components.values() for d in entries.values()), key=len)
    assert longest.split()[-1] in verbose


def test_short_description_cuts_at_a_word() -> None:
    assert short_description("short one.") == "short one."
    cut = short_description("word " * 40, limit=30)
    assert len(cut) <= 30 and cut.endswith("word…")
