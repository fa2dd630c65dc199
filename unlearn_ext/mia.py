"""Membership inference against an unlearned model (docs/design.md §8). The ideal after unlearning
is the retrained model's value, not 0.5 or 1: report the gap to retraining per run.

* `loss_auc`: the loss-threshold attack's ROC AUC for telling forget samples (members of the
  original training set) from held-out test samples: P(loss(f) < loss(t)) + P(tie)/2 over all
  pairs. 0.5 = indistinguishable; a model that memorized F scores near 1.
* `efficacy`: the classifier attack of unlearning papers: a logistic regression on per-sample
  features [loss, confidence, entropy] fit to separate retained samples (members) from test
  samples, then applied to the forget set; the value is the fraction of F it calls members.
"""
from __future__ import annotations

import numpy as np
import torch

from .forward import outputs


def loss_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """AUC of the rule 'lower loss = member' (Mann-Whitney U with ties counted half)."""
    m = member_losses.detach().cpu().double().reshape(-1)  # numpy ranks them: on the CPU
    t = nonmember_losses.detach().cpu().double().reshape(-1)
    if m.numel() == 0 or t.numel() == 0:
        return float("nan")
    both = torch.cat([m, t])
    # Average ranks of the negated losses (higher rank = more member-like), ties averaged.
    order = np.argsort(-both.numpy(), kind="mergesort")
    ranks = np.empty(both.numel(), dtype=np.float64)
    sorted_vals = (-both.numpy())[order]
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[:m.numel()].sum()
    return float((rank_sum - m.numel() * (m.numel() + 1) / 2) / (m.numel() * t.numel()))


def features(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """[loss, confidence in the true class, prediction entropy] per sample."""
    logits = outputs(model, x).double()
    logp = torch.log_softmax(logits, 1)
    loss = -logp.gather(1, y.reshape(-1, 1)).squeeze(1)
    conf = logp.exp().gather(1, y.reshape(-1, 1)).squeeze(1)
    entropy = -(logp.exp() * logp).sum(1)
    return torch.stack([loss, conf, entropy], 1).cpu().numpy()


def efficacy(model, retain: tuple, test: tuple, forget: tuple, max_per_class: int = 2000, seed: int = 0,
             features=features) -> float:
    """Fraction of the forget set a retain-vs-test membership classifier calls members.
    features(model, x, y) -> one row of features per sample (default: `features` above)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    fr, ft = features(model, *retain), features(model, *test)
    k = min(len(fr), len(ft), max_per_class)  # balanced classes, so 0.5 means "no signal"
    if k == 0 or forget[0].shape[0] == 0:
        return float("nan")
    fr, ft = fr[rng.choice(len(fr), k, replace=False)], ft[rng.choice(len(ft), k, replace=False)]
    clf = LogisticRegression(max_iter=1000).fit(np.concatenate([fr, ft]), np.r_[np.ones(k), np.zeros(k)])
    return float(clf.predict(features(model, *forget)).mean())
