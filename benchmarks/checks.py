"""The number checks every benchmark setting makes, in one place: a finite number, an integer, positive.

Each settings class raises its own error type (so a caller catches what it knows), with the message made here.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def is_int(value: object) -> bool:
    """An int, not a bool."""
    return not isinstance(value, bool) and isinstance(value, int)


def positive(name: str, value: object, error: type[ValueError], integer: bool = False, unit: str = "") -> None:
    """Raise `error` unless `value` is a positive number (an integer with `integer`); `unit` ends the message
    ("seconds", "requests per second")."""
    if (is_int(value) if integer else is_number(value)) and value > 0:  # type: ignore[operator]
        return
    what = "a positive integer" if integer else "a positive number"
    raise error(f"{name} must be {what}{' of ' + unit if unit else ''}, got {value!r}")


def json_object(parser: argparse.ArgumentParser, flag: str, text: str) -> dict[str, Any]:
    """A command-line option's JSON object; a usage error naming `flag` when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"{flag} is not valid JSON: {exc.msg}")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object")
    return value
