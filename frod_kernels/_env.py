"""The package's version and its one parser of ``FROD_*`` environment variables: every switch accepts the same
spellings, and a bad value is an error that names the variable."""

from __future__ import annotations

import os
from typing import Optional

VERSION = "0.1.0"

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def flag(name: str, default: bool, *, extra: tuple[str, ...] = ()) -> "bool | str":
    """``$name`` as a bool (1/true/on/yes, 0/false/off/no; unset or empty: ``default``), or one of the words in
    ``extra`` (lower-cased) where a switch has a third state."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value == "":
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value in extra:
        return value
    words = "/".join(sorted(_TRUE)) + ", " + "/".join(sorted(_FALSE)) + "".join(f", {w}" for w in extra)
    raise ValueError(f"{name}: expected one of {words}, got {raw!r}")


def path(name: str) -> Optional[str]:
    """``$name`` as a path, or None when it is unset or empty."""
    return os.environ.get(name) or None
