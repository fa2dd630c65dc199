"""A synthetic document corpus for a causal language model (our own generator, seeded; no files).

The setting language-model unlearning users bring: a fine-tuning corpus of documents, a deletion
request names whole documents. Every document has a corpus id (its place in the generator's
stream) and is one training item: its tokens are `BOS w_1 ... w_L` with L drawn from
[MIN_WORDS, LENGTH]; the model reads `BOS w_1 ... w_{L-1}` and predicts `w_1 ... w_L` (next
token). Shorter documents are padded to LENGTH: inputs with PAD, targets with IGNORE (no loss,
no accuracy there).

Words follow one of TOPICS bigram tables (each word has SUCCESSORS likely next words per topic,
taken with probability FOLLOW, any word otherwise): the topic's tables are learnable from the
whole corpus, the uniform draws are each document's own, so a model trained long on few documents
memorizes them (the membership signal the per-document loss MIA reads)."""
from __future__ import annotations

import numpy as np

PAD, BOS = 0, 1          # token ids never predicted as targets
FIRST_WORD = 2           # words are FIRST_WORD..VOCAB-1
IGNORE = -100            # target of a padded position (torch's cross_entropy ignore_index default)
VOCAB, LENGTH, MIN_WORDS, TOPICS, SUCCESSORS, FOLLOW = 32, 16, 6, 2, 2, 0.9


def generate(n: int, seed: int, *, vocab: int = VOCAB, length: int = LENGTH, min_words: int = MIN_WORDS,
             topics: int = TOPICS):
    """(inputs int64 n x length, targets int64 n x length): document i of the stream of `seed`."""
    words = vocab - FIRST_WORD
    if words < SUCCESSORS + 1 or not 1 <= min_words <= length:
        raise ValueError("the corpus needs more words than successors and 1 <= min_words <= length")
    tables = np.random.default_rng([seed, 41])  # the topics' bigram tables: shared by every document
    successors = np.stack([np.stack([tables.choice(words, SUCCESSORS, replace=False) for _ in range(words)])
                           for _ in range(topics)])  # [topic, word, SUCCESSORS]
    rng = np.random.default_rng([seed, 43])
    inputs = np.full((n, length), PAD, dtype=np.int64)
    targets = np.full((n, length), IGNORE, dtype=np.int64)
    for i in range(n):
        topic, count = rng.integers(topics), rng.integers(min_words, length + 1)
        sequence, word = [BOS], rng.integers(words)
        for _ in range(count):
            sequence.append(FIRST_WORD + word)
            follow = rng.random() < FOLLOW
            word = successors[topic, word, rng.integers(SUCCESSORS)] if follow else rng.integers(words)
        inputs[i, :count] = sequence[:-1]
        targets[i, :count] = sequence[1:]
    return inputs, targets


def load(seed: int = 0, n_train: int = 240, n_test: int = 120):
    """(x, y, ids, x_test, y_test): one stream of n_train + n_test documents split at random into a
    fine-tuning corpus and held-out documents; the training documents keep their corpus ids."""
    x, y = generate(n_train + n_test, seed)
    order = np.random.default_rng([seed, 47]).permutation(len(x))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    return x[train], y[train], train.astype(np.int64), x[test], y[test]
