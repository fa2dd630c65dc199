"""The user's overrides of Top-K / Random-k's settings on the command line (`unlearn-ext eval
--perturb k=0.1,guard=0.01`): keys in the unlearners' own names, every value checked here, before
any training. They apply over the model family's settings (methods.PERTURB_SETTINGS) to every
perturbation method of the run; a key a selected method would not read is refused
(methods.perturb_keys_ignored: finetune reads repair_epochs only, the adaptive K its repair only, the
guard's options need the guard)."""
from __future__ import annotations

from . import key_values

# key: (kind, smallest allowed value, whether the smallest is allowed)
KEYS = {
    "k": (float, 0.0, False),               # a fraction of the trainable coordinates, at most 1
    "repair_epochs": (int, 0, True),
    "repair_lr_factor": (float, 0.0, False),
    "guard": (float, 0.0, True),            # the largest accuracy drop allowed, below 1; off: no guard
    "guard_rounds": (int, 0, True),
    "guard_halvings": (int, 0, True),
    "guard_size": (int, 1, True),
    "guard_budget": (float, 0.0, False),    # a multiple of retraining's cost; none: no cost cap
}
# the guard's own options: read only while the guard is on (guard set)
GUARD_OPTIONS = ("guard_rounds", "guard_halvings", "guard_size", "guard_budget")
# keys that also take a word for "not set"
UNSET = {"guard": "off", "guard_budget": "none"}
# keys whose values must also stay below (or at) a bound: key: (bound, whether the bound is allowed)
MOST = {"k": (1.0, True), "guard": (1.0, False)}


class PerturbSettingError(ValueError):
    """A Top-K / Random-k override no request could use, naming the key in the message."""


def check_overrides(overrides: dict) -> dict:
    """`overrides` with each value of its key's kind; refuses unknown keys and values out of range."""
    out = {}
    for key, value in overrides.items():
        if key not in KEYS:
            raise PerturbSettingError(f"unknown perturbation setting {key!r}; choose from {', '.join(KEYS)}")
        if key in UNSET and (value is None or str(value).lower() == UNSET[key]):
            out[key] = None
            continue
        out[key] = key_values.number(key, value, *KEYS[key], "perturbation setting", PerturbSettingError)
        if key in MOST:
            most, allowed = MOST[key]
            if out[key] > most or (out[key] == most and not allowed):
                raise PerturbSettingError(f"perturbation setting {key} must be {'<=' if allowed else '<'} "
                                          f"{most:g}, got {value!r}")
    return out


def parse(text: str) -> dict:
    """'k=0.1,guard=0.01' -> {'k': 0.1, 'guard': 0.01}, checked (check_overrides)."""
    return check_overrides(key_values.split_pairs(text, "perturbation setting", "k=0.1", PerturbSettingError))
