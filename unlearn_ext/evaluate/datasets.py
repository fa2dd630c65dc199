"""Datasets of the evaluation harness: the bundled digits (sklearn), MNIST-1D (generated locally
by the `mnist1d` package's make_dataset; never its downloading get_dataset), and a user's `.npz`.
Nothing downloads. Every dataset comes back standardized with the training split's statistics."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

NAMES = ("digits", "digits-pixels", "mnist1d")


@dataclass
class Dataset:
    name: str
    x: torch.Tensor        # training inputs (float32, standardized)
    y: torch.Tensor        # int64 labels 0..classes-1
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(max(int(self.y.max()), int(self.y_test.max()) if self.y_test.numel() else 0)) + 1

    @property
    def features(self) -> int:
        return int(self.x.shape[1])


class DatasetError(ValueError):
    """A dataset that cannot be used, with what is wrong in the message."""


def load(name_or_path: str, *, split_seed: int = 0, test_fraction: float = 0.2,
         label_noise: float = 0.0, noise_seed: int = 0, limit: int | None = None) -> Dataset:
    """digits | digits-pixels | mnist1d | a path to an .npz with x (n x d float), y (n ints) and optionally
    x_test / y_test (else a seeded split). label_noise flips that fraction of the training labels
    to another class (the memorizing setting of docs/design.md §8); limit keeps the first training rows."""
    standardize = True
    if name_or_path == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.data.astype(np.float32), d.target.astype(np.int64)
        x_tr, y_tr, x_te, y_te = _split(x, y, split_seed, test_fraction)
    elif name_or_path == "digits-pixels":
        # The data the history methods' settings and PCMU's digits example were calibrated on: pixel intensities
        # / 16 in [0, 1], not standardized, sklearn's order (first 1400 train, the other 397 test).
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
        standardize = False
    elif name_or_path == "mnist1d":
        x_tr, y_tr, x_te, y_te = _mnist1d(split_seed)
    elif name_or_path.endswith(".npz") or os.path.exists(name_or_path):
        x_tr, y_tr, x_te, y_te = _npz(name_or_path, split_seed, test_fraction)
    else:
        raise DatasetError(f"unknown dataset {name_or_path!r}: use digits, mnist1d or a path to an .npz file")
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    if label_noise > 0:
        y_tr = _flip_labels(y_tr, label_noise, noise_seed, int(max(y_tr.max(), y_te.max())) + 1)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0  # constant features stay constant (zero after centering)
    if not standardize:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    norm = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    name = os.path.basename(name_or_path) if name_or_path not in NAMES else name_or_path
    return Dataset(name, norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te))


def per_seed(name_or_path: str, *, label_noise: float = 0.0, **kwargs):
    """What the harness trains on for each training seed: with label noise, a function seed ->
    Dataset whose flips are drawn with noise_seed = seed (so means over seeds also average over
    which labels were flipped; our choice); without, the one Dataset."""
    if label_noise > 0:
        return lambda seed: load(name_or_path, label_noise=label_noise, noise_seed=seed, **kwargs)
    return load(name_or_path, **kwargs)


def _split(x, y, seed, test_fraction):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _mnist1d(seed):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DatasetError("mnist1d needs the `mnist1d` package (pip install mnist1d)") from exc
    args = get_dataset_args()
    args.seed = seed
    state = np.random.get_state()  # make_dataset seeds numpy's global generator: keep ours intact
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return (d["x"].astype(np.float32), d["y"].astype(np.int64), d["x_test"].astype(np.float32),
            d["y_test"].astype(np.int64))


def _npz(path, seed, test_fraction):
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file")
    try:
        # allow_pickle=False: an .npz must never run code when loaded.
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile / format errors come in many types
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing array {key!r} (found {sorted(arrays)}); expected x (n x d float) "
                               "and y (n integer labels), optionally x_test and y_test")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"{path}: give both x_test and y_test, or neither")
    x, y = _check_xy(path, arrays["x"], arrays["y"], "x", "y", min_rows=10)
    if "x_test" in arrays:
        x_te, y_te = _check_xy(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test", min_rows=1)
        if x_te.shape[1] != x.shape[1]:
            raise DatasetError(f"{path}: x has {x.shape[1]} features but x_test has {x_te.shape[1]}")
        return x, y, x_te, y_te
    return _split(x, y, seed, test_fraction)


def _check_xy(path, x, y, xn, yn, min_rows):
    if x.ndim != 2:
        raise DatasetError(f"{path}: {xn} must be a 2-D array (n x d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{path}: {xn} must hold real numbers, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{path}: {yn} must be 1-D with one label per row of {xn} ({len(x)}), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{path}: {yn} must hold integer class labels")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: {yn} must hold integer class labels, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise DatasetError(f"{path}: {yn} has negative labels; use 0..classes-1")
    if len(x) < min_rows:
        raise DatasetError(f"{path}: {xn} has {len(x)} rows; need at least {min_rows}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: {xn} holds NaN or infinite values")
    return x, y.astype(np.int64)


def _flip_labels(y, fraction, seed, classes):
    rng = np.random.default_rng([seed, 7])
    y = y.copy()
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, classes, len(idx))) % classes  # always another class
    return y
