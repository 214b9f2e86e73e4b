"""One exception root, so the CLI can print a clear line instead of a traceback."""

from __future__ import annotations


class DragonError(Exception):
    """Any problem the user can fix: bad recipe, bad data, missing run folder.

    The message is always one line (texts quoted from libraries may carry newlines).
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class RecipeError(DragonError):
    """A recipe key, type or value is wrong."""


class DataError(DragonError):
    """A data file or folder is missing, unreadable or inconsistent."""


class RunError(DragonError):
    """A run folder is missing, incomplete or already in use."""
