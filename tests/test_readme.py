"""The README's catalogue is the registries' own description: regenerate it when a part changes."""

from __future__ import annotations

from pathlib import Path

from dragontrainer.registry import components_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_catalogue_matches_the_registries() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- catalogue:start -->\n", 1)[1].split("<!-- catalogue:end -->", 1)[0]
    assert section == components_markdown(), "run `dragon components --markdown` and paste it into README.md"
