"""The package version, from the installed package's metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """`0.1.0` when installed (also editable); `0+unknown` when run from a bare checkout."""
    try:
        return metadata.version("dragontrainer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = package_version()
