"""Which PCMU training settings the harness uses for a model, and the user's overrides of them.

PCMU trains with its own quantized steps (docs/design.md §4), so it needs its own batch size, clip
norm C, step lr, quantizer (tau, sigma), epochs and M (max_request: the most removed ids per batch
the per-request check covers). Two profiles:

  tabular  logreg, mlp, mlp-wide: the digits logistic-regression example's settings
           (pcmu_examples.py, chosen on a held-out split there).
  network  cnn, resnet, transformer, causal-lm and users' factories: chosen on digits + cnn and
           mnist1d + cnn with seeds 100-102 by the rule of benchmarks/pcmu_networks_rule.md, written
           before its grid ran. The tabular setting's threshold (beta = 0.004 for tau 0.006, sigma
           0.01) sits above almost every coordinate of a network's clipped-mean gradient, so the
           weights barely move; the network profile lowers it and takes more, smaller steps.

Overrides are KEY=VALUE pairs over the profile (`unlearn-ext eval --pcmu lr=0.01,epochs=10`);
every value is checked here, before any training.
"""
from __future__ import annotations

from ..pcmu.smoothing import check_smoothing_config
from . import key_values
from .models import TABULAR
from .pcmu_examples import SETTINGS as EXAMPLE_SETTINGS

PROFILES = {
    "tabular": {k: v for k, v in EXAMPLE_SETTINGS["digits"].items() if k != "plain_lr"},
    # benchmarks/pcmu_networks_rule.md's choice (benchmarks/pcmu_networks/grid/choice.txt): the most
    # accurate of 48 configurations within 3x plain SGD's CPU time; M covers the most ids a 1% or 5%
    # forget set put in one batch on the choosing runs (9).
    "network": dict(batch_size=64, clip_norm=1.0, lr=0.02, tau=0.0015, sigma=0.0025, max_request=12, epochs=20),
}

# key: (kind, smallest allowed value, whether the smallest is allowed), in the trainer's own names
KEYS = {
    "batch_size": (int, 1, True),
    "epochs": (int, 1, True),
    "max_request": (int, 0, True),
    "clip_norm": (float, 0.0, False),
    "lr": (float, 0.0, False),
    "tau": (float, 0.0, True),
    "sigma": (float, 0.0, False),
}


class PCMUSettingError(ValueError):
    """A PCMU override that cannot be trained with, naming the key in the message."""


def profile_of(model: str) -> str:
    """The PROFILES entry that serves `model` (a harness model name or package.module:factory)."""
    return "tabular" if model in TABULAR else "network"


def settings_for(model: str, overrides: dict | None = None) -> dict:
    """The PCMU settings of a run on `model`: its profile with `overrides` on top, checked."""
    settings = {**PROFILES[profile_of(model)], **check_overrides(overrides or {})}
    try:  # the quantizer's own refusals, named as the option
        check_smoothing_config(settings["tau"], settings["sigma"])
    except ValueError as exc:
        raise PCMUSettingError(f"PCMU tau={settings['tau']}, sigma={settings['sigma']}: {exc}") from None
    return settings


def check_overrides(overrides: dict) -> dict:
    """`overrides` with each value of its key's kind; refuses unknown keys and values out of range."""
    out = {}
    for key, value in overrides.items():
        if key not in KEYS:
            raise PCMUSettingError(f"unknown PCMU setting {key!r}; choose from {', '.join(KEYS)}")
        kind, least, inclusive = KEYS[key]
        out[key] = key_values.number(key, value, kind, least, inclusive, "PCMU setting", PCMUSettingError)
    return out


def parse(text: str) -> dict:
    """'lr=0.01,epochs=10' -> {'lr': 0.01, 'epochs': 10}, checked (check_overrides)."""
    pairs = key_values.split_pairs(text, "PCMU setting", "lr=0.01", PCMUSettingError)
    return check_overrides(pairs)
