"""Datasets of the evaluation harness. Bundled: the handwritten digits (sklearn; 1x8x8 images, or
the 64-feature table for table models), `digits-pixels` (the same pixels / 16, unstandardized:
the calibration data of the history settings), MNIST-1D (1x40 signals generated locally by the
`mnist1d` package's make_dataset; never its downloading get_dataset), `tokens` (a synthetic
token-sequence task, evaluate/tokens.py), `corpus` (synthetic documents for a causal language
model, evaluate/corpus.py: targets are the next tokens, each document one item with its corpus
id). The user's: an `.npz`, an image folder, or the CIFAR-10 /
CIFAR-100 python batches (`cifar10:PATH`, `cifar100:PATH`), read by data_files.py. Nothing downloads.

The model decides the form (`form`): 'table' flattens images and signals to n x d and standardizes
each feature; 'grid' keeps images (C x H x W) and signals (C x L) and standardizes each channel;
'tokens' keeps integer token ids; 'documents' is the corpus only; None (a user's model factory) takes
the data as they come. Statistics are the training split's. Labels must be 0..C-1 with every class
in the training set, test labels among them; anything the harness could not evaluate is refused
with the reason."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data import TrainingData
from . import corpus, data_files, language, tokens
from .data_files import DataFileError

NAMES = ("digits", "digits-pixels", "mnist1d", "tokens", "corpus")
FORMS = ("table", "grid", "tokens", "documents")
MAX_TOKEN_IDS = 1 << 20  # the embedding table grows with the largest id


@dataclass
class Dataset:
    name: str
    x: torch.Tensor        # training inputs: float32 (standardized) or int64 token ids
    y: torch.Tensor        # int64 labels 0..classes-1 (documents: next-token ids, corpus.IGNORE where padded)
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str = "table"    # table | image | signal | tokens | documents
    vocab: int | None = None  # tokens, documents: the token count
    ids: torch.Tensor | None = None  # the training items' ids (documents: corpus ids); None: 0..n-1

    @property
    def classes(self) -> int:
        """The model's outputs: the classes, or for documents the vocabulary (one logit per token id)."""
        if self.kind == "documents":
            return int(self.vocab)
        return int(max(int(self.y.max()), int(self.y_test.max()) if self.y_test.numel() else 0)) + 1

    def training_data(self) -> TrainingData:
        """What every method trains, retrains and forgets on: one item per row with its id, and the
        per-item loss (documents: language.per_sequence_cross_entropy)."""
        if self.kind == "documents":
            return TrainingData(self.x, self.y, ids=self.ids, loss=language.per_sequence_cross_entropy)
        return TrainingData(self.x, self.y, ids=self.ids)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def features(self) -> int:
        return int(np.prod(self.input_shape))


class DatasetError(ValueError):
    """A dataset that cannot be used, with what is wrong in the message."""


def load(name_or_path: str, *, form: str | None = "table", split_seed: int = 0, test_fraction: float = 0.2,
         label_noise: float = 0.0, noise_seed: int = 0, limit: int | None = None) -> Dataset:
    """A bundled name, `cifar10:PATH` / `cifar100:PATH`, a folder of class subfolders of images, or
    a path to an .npz with x and y (optionally x_test / y_test, else a seeded 80/20 split).
    label_noise flips that fraction of the training labels to another class (the memorizing setting
    of docs/design.md §8); limit keeps the first training rows."""
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None, got {form!r}")
    if name_or_path == "corpus":
        return _corpus(form, split_seed, label_noise, limit)
    if form == "documents":
        raise DatasetError(f"{name_or_path}: the model reads documents with next-token targets; use --data corpus")
    try:
        x_tr, y_tr, x_te, y_te, kind, standardize, name = _read(name_or_path, split_seed, test_fraction)
    except DataFileError as exc:
        raise DatasetError(str(exc)) from None
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    y_tr, y_te = _check_labels(name, y_tr, y_te)
    if label_noise > 0:
        y_tr = _flip_labels(y_tr, label_noise, noise_seed, int(max(y_tr.max(), y_te.max())) + 1)
    kind, x_tr, x_te = _shape_for(form, name, kind, x_tr, x_te)
    vocab = None
    if kind == "tokens":
        vocab = _check_tokens(name, x_tr, x_te)
    elif standardize:
        x_tr, x_te = _standardize(name, kind, x_tr, x_te)
    as_tensor = (lambda a: torch.from_numpy(a.astype(np.int64))) if kind == "tokens" else \
        (lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
    return Dataset(name, as_tensor(x_tr), torch.from_numpy(y_tr), as_tensor(x_te), torch.from_numpy(y_te), kind, vocab)


def per_seed(name_or_path: str, *, label_noise: float = 0.0, **kwargs):
    """What the harness trains on for each training seed: with label noise, a function seed ->
    Dataset whose flips are drawn with noise_seed = seed (so means over seeds also average over
    which labels were flipped; our choice); without, the one Dataset."""
    if label_noise > 0:
        return lambda seed: load(name_or_path, label_noise=label_noise, noise_seed=seed, **kwargs)
    return load(name_or_path, **kwargs)


def _corpus(form, split_seed: int, label_noise: float, limit: int | None) -> Dataset:
    if form not in ("documents", None):
        wants = {"table": "a table (n x d) or images", "grid": "images (n x C x H x W) or signals (n x C x L)",
                 "tokens": "integer token sequences (n x T) with one class label each"}[form]
        raise DatasetError(f"corpus: the model reads {wants}, but the data are documents for a causal language "
                           "model (use --model causal-lm or your own factory)")
    if label_noise > 0:
        raise DatasetError("corpus: label noise flips class labels; documents have next-token targets, not labels")
    x, y, ids, x_te, y_te = corpus.load(split_seed)
    if limit is not None:
        x, y, ids = x[:limit], y[:limit], ids[:limit]
    t = torch.from_numpy
    return Dataset("corpus", t(x), t(y), t(x_te), t(y_te), "documents", corpus.VOCAB, t(ids))


# ---- sources: raw arrays, their natural kind, whether to standardize, a display name ----------------

def _read(source: str, split_seed: int, test_fraction: float):
    if source in ("digits", "digits-pixels"):
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.data.astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)
        if source == "digits":
            return (*_split(x, y, split_seed, test_fraction), "image", True, source)
        # The data the history methods' settings and PCMU's digits example were calibrated on: pixel intensities
        # / 16 in [0, 1], not standardized, sklearn's order (first 1400 train, the other 397 test).
        x = x / 16.0
        return x[:1400], y[:1400], x[1400:], y[1400:], "image", False, source
    if source == "mnist1d":
        x, y, x_te, y_te = _mnist1d(split_seed)
        return x[:, None], y, x_te[:, None], y_te, "signal", True, source
    if source == "tokens":
        return (*tokens.load(split_seed), "tokens", False, source)
    which, sep, path = source.partition(":")
    if sep and which in data_files.CIFAR_FILES:
        (x, y, x_te, y_te, kind), name = data_files.read_cifar(which, path), which
    elif os.path.isdir(source):
        (x, y, x_te, y_te, kind), name = data_files.read_image_folder(source), os.path.basename(os.path.normpath(source))
    elif source.endswith(".npz") or os.path.exists(source):
        (x, y, x_te, y_te, kind), name = data_files.read_npz(source), os.path.basename(source)
    else:
        raise DatasetError(f"unknown dataset {source!r}: use {', '.join(NAMES)}, cifar10:PATH, cifar100:PATH, "
                           "an image folder or a path to an .npz file")
    x = _check_inputs(name, x, "x", min_rows=10)
    y = _label_vector(name, y, "y", "x", len(x))
    if x_te is None:
        return (*_split(x, y, split_seed, test_fraction), kind, True, name)
    x_te = _check_inputs(name, x_te, "x_test", min_rows=1)
    if x_te.shape[1:] != x.shape[1:]:
        what = f"{x.shape[1]} features but x_test has {x_te.shape[1]}" if x.ndim == 2 else \
            f"samples of shape {x.shape[1:]} but x_test has {x_te.shape[1:]}"
        raise DatasetError(f"{name}: x has {what}")
    return x, y, x_te, _label_vector(name, y_te, "y_test", "x_test", len(x_te)), kind, True, name


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


# ---- checks ---------------------------------------------------------------------------------------

def _check_inputs(name, x, xn, min_rows):
    """Real numbers (or integer token ids), no empty sample dimension, enough rows, finite in float32."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{name}: {xn} must hold real numbers, got {x.dtype}")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise DatasetError(f"{name}: {xn} has samples of shape {x.shape[1:]}: every sample needs at least one value")
    if len(x) < min_rows:
        raise DatasetError(f"{name}: {xn} has {len(x)} rows; need at least {min_rows}")
    if np.issubdtype(x.dtype, np.integer):
        return x
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{name}: {xn} holds NaN or infinite values")
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise DatasetError(f"{name}: {xn} holds values beyond float32's range (up to {np.abs(x).max():.3g})")
    return x.astype(np.float32)


def _label_vector(name, y, yn, xn, rows):
    if y.ndim != 1 or len(y) != rows:
        raise DatasetError(f"{name}: {yn} must be 1-D with one label per row of {xn} ({rows}), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{name}: {yn} must hold integer class labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{name}: {yn} must hold integer class labels, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise DatasetError(f"{name}: {yn} has negative labels; use 0..classes-1")
    return y


def _check_labels(name, y_tr, y_te):
    """Labels 0..C-1, every class in the training set (a class never trained on cannot be judged,
    and a label like 1e9 would size the output layer), test labels among the training classes.
    Checked on the raw values (uint64 >= 2^63 would turn negative as int64)."""
    seen = np.unique(y_tr)
    if len(seen) < 2:
        raise DatasetError(f"{name}: the training labels hold {len(seen)} class(es) ({_few(seen)}); "
                           "unlearning is judged on a classifier of at least 2 classes")
    unseen_test = np.setdiff1d(np.unique(y_te), seen)
    if len(unseen_test):
        raise DatasetError(f"{name}: test labels never in the training labels: {_few(unseen_test)}")
    if seen[-1] != len(seen) - 1:  # sorted, unique, >= 0: 0..C-1 exactly when the largest is C-1
        raise DatasetError(f"{name}: labels must be 0..C-1 with every class in the training set; the training "
                           f"labels are {_few(seen)} ({len(seen)} classes, largest {int(seen[-1])}): renumber them "
                           f"0..{len(seen) - 1}")
    return y_tr.astype(np.int64), y_te.astype(np.int64)


def _few(values, at_most: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:at_most])
    return "{" + shown + (f", ... {len(values) - at_most} more" if len(values) > at_most else "") + "}"


def _shape_for(form, name, kind, x_tr, x_te):
    """The arrays in the form the model reads, or a refusal naming both. An integer table is token
    ids for a model that reads tokens (and for a user's factory), features for a table model."""
    integers = kind == "table" and np.issubdtype(x_tr.dtype, np.integer)
    if form is None:
        return ("tokens" if integers else kind), x_tr, x_te
    if form == "grid" and kind in ("image", "signal"):
        return kind, x_tr, x_te
    if form == "table" and kind != "tokens":
        flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
        return "table", flat(x_tr), flat(x_te)
    if form == "tokens" and (kind == "tokens" or integers):
        return "tokens", x_tr, x_te
    wants = {"table": "a table (n x d) or images", "grid": "images (n x C x H x W) or signals (n x C x L)",
             "tokens": "integer token sequences (n x T)"}[form]
    has = {"table": f"a table of shape {x_tr.shape}", "image": f"images of shape {x_tr.shape[1:]}",
           "signal": f"signals of shape {x_tr.shape[1:]}", "tokens": f"token sequences of shape {x_tr.shape}"}[kind]
    if kind == "table" and form == "tokens":
        has = f"a table of {x_tr.dtype} values (token ids must be stored as integers)"
    raise DatasetError(f"{name}: the model reads {wants}, but the data are {has}")


def _check_tokens(name, x_tr, x_te):
    both = [x_tr, x_te]
    low, high = min(int(a.min()) for a in both), max(int(a.max()) for a in both)
    if low < 0:
        raise DatasetError(f"{name}: token ids must be >= 0, got {low}")
    if high >= MAX_TOKEN_IDS:
        raise DatasetError(f"{name}: token ids up to {high}; at most {MAX_TOKEN_IDS} ids (renumber them 0..V-1)")
    return high + 1


def _standardize(name, kind, x_tr, x_te):
    axes = (0,) if kind == "table" else (0, *range(2, x_tr.ndim))  # per feature, or per channel
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below, with the reason
        mean, std = x_tr.mean(axes, keepdims=True), x_tr.std(axes, keepdims=True)
        std[std == 0] = 1.0  # constant features stay constant (zero after centering)
        out = (x_tr - mean) / std, (x_te - mean) / std
    if not all(np.all(np.isfinite(a)) for a in out):
        raise DatasetError(f"{name}: standardizing the inputs overflowed float32 (values up to "
                           f"{float(np.abs(x_tr).max()):.3g}); rescale them")
    return out


def _flip_labels(y, fraction, seed, classes):
    rng = np.random.default_rng([seed, 7])
    y = y.copy()
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, classes, len(idx))) % classes  # always another class
    return y
