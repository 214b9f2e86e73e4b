"""One exception root, so the CLI can print a clear line instead of a traceback."""

from __future__ import annotations

MAX_MESSAGE = 1000  # a message quoting a huge value must still be one readable line


def shorten(text: object, limit: int = 200) -> str:
    """At most `limit` characters of a user's value in a message, with how much was left out."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


class DragonError(Exception):
    """Any problem the user can fix: bad recipe, bad data, missing run folder.

    The message is always one line (texts quoted from libraries may carry newlines) of bounded length.
    """

    def __init__(self, message: str) -> None:
        super().__init__(shorten(" ".join(str(message).split()), MAX_MESSAGE))


class RecipeError(DragonError):
    """A recipe key, type or value is wrong."""


class DataError(DragonError):
    """A data file or folder is missing, unreadable or inconsistent."""


class RunError(DragonError):
    """A run folder is missing, incomplete or already in use."""
