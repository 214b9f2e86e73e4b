"""One exception root, so the CLI can print a clear line instead of a traceback."""

from __future__ import annotations


class DragonError(Exception):
    """Any problem the user can fix: bad recipe, bad data, missing run folder."""


class RecipeError(DragonError):
    """A recipe key, type or value is wrong."""


class DataError(DragonError):
    """A data file or folder is missing, unreadable or inconsistent."""


class RunError(DragonError):
    """A run folder is missing, incomplete or already in use."""
