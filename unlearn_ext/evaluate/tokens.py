"""A synthetic token-sequence classification task (our own generator, seeded; no files).

Each class owns `markers` tokens of the vocabulary; a sequence is `length` background tokens
(drawn uniformly from the tokens no class owns) with `per_sequence` of its class's markers
written at random positions. A model must find the markers wherever they sit: a bag of tokens
suffices, position does not matter, so a small encoder learns it in a few epochs."""
from __future__ import annotations

import numpy as np

VOCAB, LENGTH, CLASSES, MARKERS, PER_SEQUENCE = 32, 16, 4, 3, 3


def generate(n: int, seed: int, *, vocab: int = VOCAB, length: int = LENGTH, classes: int = CLASSES,
             markers: int = MARKERS, per_sequence: int = PER_SEQUENCE):
    """(tokens int64 n x length, labels int64 n): labels balanced, order shuffled."""
    if classes * markers >= vocab or per_sequence > length:
        raise ValueError("the markers must leave background tokens and fit in a sequence")
    rng = np.random.default_rng([seed, 31])
    labels = rng.permutation(np.arange(n) % classes)
    tokens = rng.integers(classes * markers, vocab, size=(n, length))
    for i, c in enumerate(labels):
        where = rng.choice(length, per_sequence, replace=False)
        tokens[i, where] = c * markers + rng.integers(0, markers, per_sequence)
    return tokens.astype(np.int64), labels.astype(np.int64)


def load(seed: int = 0, n_train: int = 1000, n_test: int = 250):
    """Training and test sequences, drawn from independent streams of the same seed."""
    x, y = generate(n_train, seed)
    x_te, y_te = generate(n_test, seed + 1_000_003)
    return x, y, x_te, y_te
