"""KEY=VALUE,... options of the command line (`--pcmu`, `--perturb`): split into pairs and each
value read as a number of its key's kind, every refusal naming the option and the key."""
from __future__ import annotations

import math


def split_pairs(text: str, what: str, example: str, error: type[ValueError]) -> dict[str, str]:
    """'a=1,b-c=2' -> {'a': '1', 'b_c': '2'}; refuses a pair without '=', a key given twice and no pair."""
    pairs = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise error(f"{what}s are KEY=VALUE pairs separated by commas, got {item!r}")
        if key in pairs:
            raise error(f"{what} {key} given twice")
        pairs[key] = value.strip()
    if not pairs:
        raise error(f"give at least one {what}, e.g. {example}")
    return pairs


def number(key: str, value, kind, least, inclusive: bool, what: str, error: type[ValueError]):
    """`value` as `kind` (int or float), finite and above `least` (or at it, if inclusive)."""
    bound = f"{'>=' if inclusive else '>'} {least:g}"
    words = "an integer" if kind is int else "a finite number"
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        parsed = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or (kind is float and not math.isfinite(parsed)) or \
            (parsed < least if inclusive else parsed <= least):
        raise error(f"{what} {key} must be {words} {bound}, got {value!r}")
    return parsed
