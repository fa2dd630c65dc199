"""DeltaGrad's replay as first written: one Python iteration per recorded step, each gradient
through FlatModel.mean_loss_grad (functional_call on the flat vector), each step's weights and batch
read on their own. The fast replay of unlearn_ext/mini/deltagrad.py batches and fuses that work; this
is the plain statement of the same arithmetic that tests/test_deltagrad_fast.py compares it with.

straightforward_replay(unlearner, union) returns what DeltaGradUnlearner._replay returns:
(w^I_T or None, sample-gradients, stats, reason the replay stopped or '').
"""
from __future__ import annotations

from collections import deque

import torch

from unlearn_ext.mini.deltagrad import CompactLBFGS, _MomentumReplay


def straightforward_replay(self, union: torch.Tensor):
    """Returns (w^I_T, sample_gradients, stats, reason why the replay stopped or '')."""
    flat, wd = self.flat, self.weight_decay
    momentum = _MomentumReplay(self.sgd.momentum, self.sgd.nesterov) if self.sgd.momentum else None
    pairs = deque(maxlen=self.memory)
    w, cost, exact_steps, worst, top_eta_lambda, damped = None, 0, 0, 0.0, 0.0, 0
    lambda_max = None  # of the current pairs' B (recomputed when a pair is added)
    model = None       # CompactLBFGS of the current pairs (rebuilt when a pair is added)

    def stats():
        return {"exact_steps": exact_steps, "worst_prediction_error": worst, "max_eta_lambda": top_eta_lambda,
                **({"damped_steps": damped} if self.unstable == "damp" else {})}
    for s in self.store.iter(names=["params"]):
        t, lr, batch = s.step, float(s.lr), s.batch_ids
        if batch is None:
            raise ValueError(f"step {t} of the history has no batch ids: DeltaGrad needs them")
        w_t = flat.join(s.tensors["params"])
        if w is None:
            w = w_t.clone()  # the stored initial weights
        gone = torch.isin(batch, union)
        kept, removed = batch[~gone], batch[gone]
        if kept.numel() == 0:
            continue  # retraining makes no update on an emptied batch
        g_rec = self.store.encoded(t, "grads")
        g_removed = flat.mean_loss_grad(w, removed) if removed.numel() else None
        cost += int(removed.numel())
        dw = w - w_t
        if self._exact_step(t) or not pairs:
            exact_steps += 1
            g_kept = flat.mean_loss_grad(w, kept)
            cost += int(kept.numel())
            # dg = grad L_B(w^I_t) - g_t, the recorded g_t taken off on its codes.
            dg = g_kept * kept.numel() / batch.numel()
            if g_removed is not None:
                dg += g_removed * removed.numel() / batch.numel()
            g_rec.axpy_(flat.split(dg), -1.0)
            if pairs and float(dg.norm()) > 0:
                if model is None:
                    model = CompactLBFGS(*(torch.stack(p, 1) for p in zip(*pairs)))
                err = float((model.product(dw) - dg.double()).norm() / dg.double().norm())
                worst = max(worst, err)
                if err > self.max_prediction_error:
                    return None, cost, stats(), (
                        f"the quasi-Newton prediction of the gradient change at exact step {t} is off by "
                        f"{err:.3g} (relative) > {self.max_prediction_error:g}")
            if float(torch.dot(dw.double(), dg.double())) > 1e-12 * float(dw.norm() * dg.norm()):
                pairs.append((dw.clone(), dg.clone()))
                lambda_max, model = None, None
            # the same arithmetic as data.sgd_step: g + wd * w, then w - lr * g
            step = g_kept + wd * w if wd else g_kept
            w = w - lr * step if momentum is None else momentum.step(w, step, lr)
        else:
            if model is None:
                model = CompactLBFGS(*(torch.stack(p, 1) for p in zip(*pairs)))
            if lambda_max is None:
                lambda_max = model.largest_eigenvalue()
            top_eta_lambda = max(top_eta_lambda, lr * lambda_max)
            if lr * lambda_max >= self.stable_below:
                if self.unstable == "refuse":
                    return None, cost, stats(), (
                        f"eta_t * lambda_max(B) = {lr * lambda_max:.3g} >= {self.stable_below:g} at step {t}: the "
                        "quasi-Newton replay amplifies the gap")
                damped += 1
                predicted = model.capped_product(dw, self.stable_below / lr, 1.0 / lr).float()
            else:
                predicted = model.product(dw).float()           # B (w^I_t - w_t)
            scale = batch.numel() / kept.numel()
            direction = scale * predicted
            if g_removed is not None:
                direction -= (removed.numel() / kept.numel()) * g_removed
            if wd:
                direction += wd * w
            if momentum is None:
                w = w - lr * direction
                g_rec.axpy_(flat.split(w), -lr * scale)    # - lr |B|/|B\F| g_t, on the codes
            else:  # the buffer needs the whole gradient: + |B|/|B\F| g_t, on the codes
                g_rec.axpy_(flat.split(direction), scale)
                w = momentum.step(w, direction, lr)
        if not torch.isfinite(w).all():
            return None, cost, stats(), (
                f"the replayed weights became non-finite at step {t}")
    return w, cost, stats(), ""

