"""Checks of the history methods' option values (Mini-Unlearning and DeltaGrad share them): a value
no request could use is refused by name when the unlearner is built and, through each unlearner's
check_options, when make_unlearnable wraps the loop (before training)."""
from __future__ import annotations

import numbers

from ..checks import is_whole_number


def positive_number(name: str, value, meaning: str = "") -> float:
    """The value as a float > 0 (a bool, a string or a value <= 0 refused by name)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number{meaning}, got {value!r}")
    return float(value)


def threshold(name: str, value) -> float:
    """A check's limit as a float: any real number (a limit no answer can meet makes every request
    fall back, which tests and cautious users ask for on purpose), but not a bool, a string or NaN
    (a comparison with NaN never fires: the check would be off without saying so)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_limits(stability_limit, loss_rise_limit) -> tuple[float, float]:
    """The history methods' two check limits (Mini-Unlearning's and DeltaGrad's alike): thresholds,
    any real number. A loss_rise_limit <= 0 asks every request whose retained loss rises at all (or
    does not fall by that much) to fall back: a cautious setting, and how tests force the fallback."""
    return threshold("stability_limit", stability_limit), threshold("loss_rise_limit", loss_rise_limit)


def whole_number(name: str, value, least: int) -> int:
    """The value as an int >= least (a bool, a float or a smaller value refused by name)."""
    if not is_whole_number(value, least):
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


def positive_integer(name: str, value) -> int:
    """The value as an int >= 1 (a count such as epochs or a batch size)."""
    if not is_whole_number(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def auto_or_positive(name: str, value) -> int | str:
    """'auto', or the value as a positive int (a clear error otherwise)."""
    if isinstance(value, str) and value == "auto":
        return value
    if not is_whole_number(value, 1):
        raise ValueError(f"{name} must be a positive int or 'auto', got {value!r}")
    return int(value)
