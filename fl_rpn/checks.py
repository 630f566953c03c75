"""Validators of config values, a leaf module (it imports nothing of the package).

Each config key is checked once, by the code that owns it (``fl_rpn.engine.validate.validate_config`` calls the
owners), before any data is read, so a typo costs seconds, not hours. A failed check raises
``ValueError("config key rpn.gamma=-1: must be a number >= 0")``: the key, its value and the requirement.

``check_*`` check a value now; ``number``, ``integer``, ``one_of`` and ``optional`` make a check to run later,
``check(key, value)``, e.g. as the ``Annotated`` metadata of a builder's keyword (``fl_rpn.modeling.rpn_registry``).
"""

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "Check", "check", "is_number", "check_number", "check_int", "check_bool", "check_choice", "number", "integer",
    "one_of", "optional",
]  # fmt: skip

Check = Callable[[str, Any], None]  # (key, value) -> None, or ValueError("config key <key>=<value>: ...")


def check(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ValueError(f"config key {key}={value!r}: {requirement}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(key: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """``value`` must be a finite int or float (not a string, bool, NaN or inf) and satisfy ``ok``."""
    check(not is_number(value) or math.isfinite(value), key, value, f"must be a finite number {requirement}")
    check(is_number(value) and ok(value), key, value, f"must be a number {requirement}")


def check_int(key: str, value: Any, minimum: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value,
          f"must be an integer >= {minimum}")  # fmt: skip


def check_bool(key: str, value: Any) -> None:
    check(isinstance(value, bool), key, value, "must be true or false")


def check_choice(key: str, value: Any, choices) -> None:
    check(value in choices, key, value, "must be " + " or ".join(map(repr, choices)))


def number(ok: Callable[[float], bool], requirement: str) -> Check:
    """A finite int or float (not a bool, string, NaN or inf) with ``ok(value)``; ``requirement`` says which."""
    return lambda key, value: check_number(key, value, ok, requirement)


def integer(minimum: int) -> Check:
    return lambda key, value: check_int(key, value, minimum)


def one_of(*choices: Any) -> Check:
    return lambda key, value: check_choice(key, value, choices)


def optional(inner: Check) -> Check:
    """``null`` or what ``inner`` accepts."""
    return lambda key, value: None if value is None else inner(key, value)
