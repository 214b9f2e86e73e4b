"""User strings on the terminal and in files: the one place they are made safe.

Paths, class names, labels and recipe values come from users. Printed through rich they must be
text, not markup (`runs/a[/]b` is a folder name, not a closing tag), and names that are not valid
UTF-8 (a Latin-1 folder name arrives as surrogate escapes) are shown escaped (`caf\\xe9`) instead
of crashing the encoder. Inside the program such names stay as they are: nothing is lost.
"""

from __future__ import annotations

from rich.markup import escape


def printable(value: object) -> str:
    """`value` as a string that encodes as UTF-8: undecodable bytes shown as \\xNN."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def text(value: object) -> str:
    """A user's value for a rich markup template: printable, with markup escaped."""
    return escape(printable(value))
