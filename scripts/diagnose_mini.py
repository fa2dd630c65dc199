"""Where Mini-Unlearning's error comes from, on one digits run (benchmarks/RESULTS.md, "What was
wrong with the first version"). Our formulation (DESIGN section 6): e_{t+1} = (I - eta_t H) e_t -
eta_t delta(w_t), delta(w) = r/(n-r) (grad L_D(w) - grad L_F(w)).

    PYTHONPATH=. python scripts/diagnose_mini.py [--setting history-logreg] [--seed 100] [--ratio 0.1]

Prints d/d0 (against the same-seed retrain) for the linear response with, in turn, everything
exact per step, the exact retained Hessian at w* only, K = 5 anchors with DESIGN's constant
end-of-segment drift or the interpolated drift, and the single step -Lambda delta_K. The exact
Hessian is built densely (d x d): use it on logreg (d = 650), not on the MLPs.
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
from torch.func import hessian

import unlearn_ext as ue
from unlearn_ext.evaluate import settings
from unlearn_ext.mini.curvature import HessianOperator
from unlearn_ext.mini.record import anchor_epochs
from unlearn_ext.mini.vectors import FlatModel


def trajectory(init, data, config):
    """The weights before every step, and w* after the last (flat, float32)."""
    model = copy.deepcopy(init)
    flat = FlatModel(model, data)
    weights = []
    ue.train_sgd(model, data, config, on_step=lambda t, ids, m: weights.append(flat.flat()))
    return weights + [flat.flat()], flat


def propagate(H, etas, drift_at_step):
    """e after the steps: e <- e - eta_t (H(e) + drift_at_step(t)); H a matrix or a callable of (t, e)."""
    e = None
    for t, eta in enumerate(etas.tolist()):
        d = drift_at_step(t)
        e = torch.zeros_like(d) if e is None else e
        He = H(t, e) if callable(H) else H @ e
        e = e - eta * (He + d)
    return e


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="history-logreg", choices=list(settings.SETTINGS))
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data, init, config = settings.get(args.setting).training(args.seed)
    weights, flat = trajectory(init, data, config)
    n, T, spe = len(data), len(weights) - 1, math.ceil(len(data) / config.batch_size)
    r = max(1, round(args.ratio * n))
    g = torch.Generator().manual_seed(10_000 * args.seed + int(args.ratio * 1000))  # as the eval script
    forget = data.ids[torch.randperm(n, generator=g)[:r]].sort().values
    retained = data.without(forget)
    w_star = weights[-1].double()
    w_retrain = FlatModel(ue.retrain(init, data, config, forget), data).flat().double()
    d0 = float((w_star - w_retrain).norm())
    etas = torch.tensor([config.lr_at(t) for t in range(T)], dtype=torch.float64)

    def drift(w):  # both gradients without weight decay: it cancels in the difference
        return r / (n - r) * (flat.mean_loss_grad(w, data.ids).double() - flat.mean_loss_grad(w, forget).double())

    def report(label, e):
        print(f"{label:62s} d/d0 {float((w_star + e - w_retrain).norm()) / d0:.3f}", flush=True)

    x, y = data.batch(retained)
    H = hessian(lambda w: flat.loss_sum(w, x, y) / retained.numel())(w_star.float()).double()
    H = (H + H.T) / 2 + config.weight_decay * torch.eye(flat.dim, dtype=torch.float64)
    drifts = [drift(w) for w in weights[:-1]]
    ops = {}

    def H_path(t, e):  # the retained Hessian at w_t (one HVP per step)
        op = ops.setdefault(t, HessianOperator(flat, weights[t], retained, config.weight_decay))
        return op(e)

    report("exact per step: H(w_t), delta(w_t)", propagate(H_path, etas, lambda t: drifts[t]))
    report("H(w*) at every step, delta(w_t)", propagate(H, etas, lambda t: drifts[t]))
    ends = [a * spe for a in anchor_epochs(config.epochs, 5)]
    anchor_drift = {t: drift(weights[t]) for t in ends}

    def segment(t):  # (start, end) anchors of the segment holding step t
        end = next(b for b in ends if b > t)
        return ends[ends.index(end) - 1], end

    def interp(t):
        a, b = segment(t)
        alpha = (t - a) / (b - a)
        return (1 - alpha) * anchor_drift[a] + alpha * anchor_drift[b]

    report("H(w*), K = 5 anchors, delta_k constant over its segment (DESIGN)",
           propagate(H, etas, lambda t: anchor_drift[segment(t)[1]]))
    report("H(w*), K = 5 anchors, delta interpolated between anchors", propagate(H, etas, interp))
    report("single step -Lambda delta_K", -float(etas.sum()) * anchor_drift[ends[-1]])


if __name__ == "__main__":
    main()
