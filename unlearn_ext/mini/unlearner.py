"""Mini-Unlearning as an `Unlearner` (docs/design.md §6; our formulation: linear response of SGD).

    store = mini_store(model)                                   # fp32 anchors (or codec="int8")
    train_recording_anchors(model, data, config, store)         # K = 5 geometric anchors + epoch 0
    mini = MiniUnlearner(model, data, store)
    report = mini.unlearn(ids)          # model <- w* + e; report.details: Ritz values, Lambda, ||e||

Unlearning F (every id forgotten so far: a later request recomputes from the original weights
with the union, so sequential requests equal one combined request):
  1. delta_k = r/(n-r) (g_k - grad L_F(w_{a_k})) at every anchor closing a segment (K anchors,
     not epoch 0; cost K * r);
  2. curvature of the retained objective at w* from a uniform random subsample of m retained
     samples, k Lanczos steps from delta_K (cost 2 m k; m and k by default from a budget of 0.30
     of retraining's cost, our rule: mini/budget.py); curvature='anchors' (our experiment on
     the open problem of docs/design.md §6) takes it at each segment's end anchor instead, start
     vector that anchor's delta (cost K times more); curvature='exact' builds the whole Hessian
     (tests, small models);
  3. spectral propagation segment by segment (propagate.py), segment k (epochs a_{k-1}+1..a_k)
     driven by delta_k, constant (the default; delta_rule="interp" is the experiment that lost);
     With momentum (heavy ball / Nesterov) the gaps of the weights and of the momentum buffer are
     propagated together (our derivation, mini/propagate.py);
  4. safety checks — eta_t * max theta < 2 at every step (with momentum mu: 2 (1 + mu) for heavy
     ball, 2 (1 + mu) / (1 + 2 mu) for Nesterov), ||e|| <= Lambda * max_k ||delta_k|| (with momentum
     Lambda / (1 - mu), ours), e finite, and (ours) the retained objective on the curvature subsample rises by at most 25%
     at w* + e — else fallback: training resumes without F from the stored weights at step 0
     (exactly retraining), status 'fallback' with the reason.
"""
from __future__ import annotations

import torch

from ..data import TrainingData
from ..history import HistoryStore
from ..loading import checked_seed
from ..model_state import load_model_state_, model_state
from ..parameters import parameter_shapes, trainable
from ..policy import refuse_training_batch_norm
from ..unlearner import Unlearner, UnlearnReport
from .budget import DEFAULT_BUDGET, DESIGN_SAMPLES, curvature_plan
from .curvature import HessianOperator, exact_spectrum, lanczos_spectrum, subsample
from .history_digest import history_sha256
from .options import auto_or_positive, check_limits, positive_number
from .propagate import (DELTA_RULES, UNSTABLE, edge_directions, gap_bound_factor, propagate_segment,
                        propagate_segment_momentum, stability_bound)
from .record import FULL_GRAD, check_replayable_sgd
from .resume import resume_from
from .safety import DEFAULT_LOSS_RISE_LIMIT, retained_loss_rise
from .sharpness import recorded_edge
from .vectors import FlatModel, StoredVector, stored_vector

CURVATURE = ("final", "anchors", "exact")


class MiniUnlearner(Unlearner):
    method = "mini"
    hessian = HessianOperator  # the curvature's operator (distributed/history_methods.py sums it across ranks)

    def __init__(self, model: torch.nn.Module, data: TrainingData, store: HistoryStore, *,
                 curvature_samples: int | str = "auto", lanczos_steps: int | str = "auto", curvature: str = "final",
                 seed: int = 0, stability_limit: float = 2.0, delta_rule: str = "end",
                 loss_rise_limit: float = DEFAULT_LOSS_RISE_LIMIT, curvature_budget: float = DEFAULT_BUDGET,
                 unstable: str = "refuse"):
        """model: the trained model (its weights are w*); store: what MiniRecorder recorded.
        curvature_samples (m), lanczos_steps (k): "auto" (default) aims a request at
        `curvature_budget` (a fraction of retraining's sample-gradients): the default m = 1024, k = 10
        where the budget affords them, else k = 8 and the m in [256, 1024] it affords (our rule,
        mini/budget.py; curvature="exact" takes m = 1024). Not a ceiling: where even m = 256 (or all
        retained samples) at k = 8 costs more, as on tiny data, and on a fallback the request spends
        more; report.sample_gradients says what it spent. Values given explicitly are used as given.
        delta_rule: "end" (the default: each segment uses the drift of the anchor closing it) or
        "interp" (linear between the bounding anchors; see mini/propagate.py).
        loss_rise_limit: the retained-loss check (ours) fires when the retained objective on the
        curvature subsample rises by more than this fraction at w* + e (see _retained_loss_rise).
        unstable: what a curvature direction at the edge of stability (eta_t * theta >= 2) does.
        "refuse" (the default): the request falls back to retraining, decided before any work
        when the recorded run's eta * lambda_max estimate (mini/sharpness.py) is already there, so
        such a fallback costs what retraining costs. "equilibrium" (ours, plain SGD only): those
        directions take the linear recursion's fixed point -delta / theta (mini/propagate.py); the
        request falls back only when the complement's curvature h_perp is at the edge too."""
        super().__init__(data)
        info = store.run_info
        refuse_training_batch_norm(model, "Mini-Unlearning")
        self.sgd = check_replayable_sgd(info, "Mini-Unlearning", len(trainable(model)))
        self.check_options(unstable=unstable, curvature=curvature, delta_rule=delta_rule,
                           curvature_samples=curvature_samples, lanczos_steps=lanczos_steps,
                           curvature_budget=curvature_budget, stability_limit=stability_limit,
                           loss_rise_limit=loss_rise_limit, momentum=self.sgd.momentum, seed=seed)
        self.delta_rule = delta_rule
        self.weight_decay = self.sgd.weight_decay
        self.unstable = unstable
        for key in ("lr_schedule", "steps_per_epoch", "n"):
            if key not in info:
                raise ValueError(f"the history lacks run metadata {key!r}: record it with MiniRecorder")
        if info["n"] != len(data):
            raise ValueError(f"the history was recorded on {info['n']} samples; this data set has {len(data)}")
        self.anchor_steps = list(store.steps)  # a Mini store records anchors only (MiniRecorder)
        if not self.anchor_steps:
            raise ValueError("the history holds no anchors (record them with MiniRecorder)")
        self.model, self.store, self.info = model, store, info
        self.lrs = torch.tensor(info["lr_schedule"], dtype=torch.float64)
        self.flat = FlatModel(model, data)
        self.original = self.flat.flat()
        self.curvature_samples = auto_or_positive("curvature_samples", curvature_samples)
        self.lanczos_steps = auto_or_positive("lanczos_steps", lanczos_steps)
        self.curvature_budget = float(curvature_budget)
        self.curvature, self.seed, self.stability_limit = curvature, int(seed), float(stability_limit)
        self.loss_rise_limit = float(loss_rise_limit)
        # Binds saved state to this history (mini/history_digest.py): every anchor's weights and gradient.
        self.history_sha256 = history_sha256(store, self.anchor_steps, ["params", FULL_GRAD], "Mini-Unlearning")

    @staticmethod
    def check_options(*, unstable, curvature, delta_rule, curvature_samples, lanczos_steps, curvature_budget,
                      stability_limit, loss_rise_limit, momentum, seed) -> None:
        """Refuses option values no request could use, naming the option; the constructor calls it,
        and make_unlearnable before training (the unlearner is built after it). momentum: the
        training run's SGD momentum (the recorded run's, or the wrapped optimizer's)."""
        if unstable not in UNSTABLE:
            raise ValueError(f"unstable must be one of {UNSTABLE}, got {unstable!r}")
        if unstable == "equilibrium" and momentum:
            raise ValueError("unstable='equilibrium' is derived for plain SGD; the training run uses momentum "
                             f"{momentum:g}: use unstable='refuse'")
        if curvature not in CURVATURE:
            raise ValueError(f"curvature must be one of {CURVATURE}, got {curvature!r}")
        if delta_rule not in DELTA_RULES:
            raise ValueError(f"delta_rule must be one of {DELTA_RULES}, got {delta_rule!r}")
        auto_or_positive("curvature_samples", curvature_samples)
        auto_or_positive("lanczos_steps", lanczos_steps)
        positive_number("curvature_budget", curvature_budget, " (a fraction of retraining's cost)")
        check_limits(stability_limit, loss_rise_limit)
        checked_seed(seed)

    # ---- unlearning -----------------------------------------------------------------------------

    def _read_anchors(self):
        """(step, weights, full gradient) of the anchors whose drift the propagation uses: with
        the "end" rule the anchor at step 0 closes no segment (it is kept for the fallback)."""
        out = []
        steps = self.anchor_steps if self.delta_rule == "interp" else [t for t in self.anchor_steps if t > 0]
        for t in steps or self.anchor_steps:
            out.append((t, self._stored(t, "params").whole(), self._stored(t, FULL_GRAD)))
        return out

    def _stored(self, step: int, name: str) -> StoredVector:
        """A recorded field (the distributed unlearner reads a sharded history shard by shard)."""
        return stored_vector(self.store, step, name)

    def _curvature_plan(self, retrain_sample_gradients: int, anchor_cost: int, spectra: int,
                        retained: int) -> tuple[int, int]:
        """(m, k) for this request: the user's, else the budget rule's (mini/budget.py)."""
        given_m = None if self.curvature_samples == "auto" else self.curvature_samples
        given_k = None if self.lanczos_steps == "auto" else self.lanczos_steps
        if self.curvature == "exact":  # d HVPs, a test / diagnostic mode: no budget applies (k unused)
            return given_m or DESIGN_SAMPLES, given_k or 0
        return curvature_plan(retrain_sample_gradients, anchor_cost, spectra, self.curvature_budget, given_m, given_k,
                              retained)

    def _spectrum(self, w, start, retained, m, k):
        ids = subsample(retained, m, self.seed)
        if self.curvature == "exact":
            return exact_spectrum(self.flat, w, ids, self.weight_decay, self.hessian)
        return lanczos_spectrum(self.flat, w, ids, self.weight_decay, start, k, self.seed, self.hessian)

    def _forget(self, new: torch.Tensor, report: UnlearnReport) -> None:
        refuse_training_batch_norm(self.model, "Mini-Unlearning")
        union = torch.cat([self.forgotten, new]).unique()
        n, r = len(self.data), int(union.numel())
        if r == n:
            # Nothing is retained: retraining makes no update and returns the initial weights (the
            # drift r/(n-r) of the linear response is undefined).
            report.sample_gradients = self._fallback(union)
            report.status, report.how, report.weights_changed = "retrained", "every sample forgotten", True
            report.reason = "every training sample is forgotten: retraining returns the stored initial weights"
            self._set_forgotten(union)
            return
        retained = self.data.without(union)
        T = int(self.lrs.numel())
        stable_below = stability_bound(self.sgd.momentum, self.sgd.nesterov, self.stability_limit)
        edge = recorded_edge(self.info)
        if self.unstable == "refuse" and edge is not None and edge[0] >= stable_below:
            # Decided before any work: the fallback then costs exactly what retraining costs.
            report.sample_gradients = self._fallback(union)
            report.status, report.how = "fallback", "resumed from step 0 (stored initial weights)"
            report.reason = (f"the run recorded eta_t * lambda_max = {edge[0]:.3g} >= {stable_below:g} at step "
                             f"{edge[1]} during training: the linear response would not contract, so training "
                             "resumed without the ids before any other work, which equals retraining")
            report.details = {"recorded_eta_lambda_max": edge[0], "stability_bound": stable_below,
                              "unstable": self.unstable, **self.sgd.describe()}
            report.weights_changed = True
            self._set_forgotten(union)
            return
        read_before = self.store.bytes_read
        anchors = self._read_anchors()
        # 1. delta_k = r/(n-r) (g_k - grad L_F(w_k)); both gradients carry weight_decay * w.
        deltas = []
        for _, w, g in anchors:
            g_forget = self.flat.mean_loss_grad(w, union) + self.weight_decay * w
            deltas.append(-(r / (n - r)) * g.subtracted_from(g_forget.double()))  # (r/(n-r)) (g - g_forget)
        cost = len(anchors) * r
        # 2. curvature (once at w*, or per segment at its end anchor) on m retained samples.
        m, k = self._curvature_plan(self.retrain_cost(union), cost,
                                    len(anchors) if self.curvature == "anchors" else 1, n - r)
        spectra = {}
        if self.curvature == "anchors":
            for (t, w, _), d in zip(anchors, deltas):
                spectra[t] = self._spectrum(w, d, retained, m, k)
        else:
            shared = self._spectrum(self.original, deltas[-1], retained, m, k)
        # 3. propagate over the segments between consecutive boundaries (0, the anchors, T); a
        # boundary without an anchor takes its neighbour's delta (constant drift there).
        bounds = sorted({0, T} | {t for t, _, _ in anchors if t <= T})
        delta_at = {t: d for (t, _, _), d in zip(anchors, deltas)}
        steps_sorted = sorted(delta_at)

        def delta_of(t):
            if t in delta_at:
                return delta_at[t]
            return delta_at[min(steps_sorted, key=lambda a: abs(a - t))]

        e = torch.zeros(self.flat.dim, dtype=torch.float64)
        f = torch.zeros_like(e)  # the momentum buffer's gap (read only with momentum)
        mu, nesterov = self.sgd.momentum, self.sgd.nesterov
        max_eta_theta, used, at_edge = 0.0, [], 0
        edge_limit = self.stability_limit if self.unstable == "equilibrium" else None
        for a, b in zip(bounds[:-1], bounds[1:]):
            spec = shared if self.curvature != "anchors" else spectra[min((s for s in steps_sorted if s >= b),
                                                                          default=steps_sorted[-1])]
            if all(spec is not u for u in used):
                used.append(spec)
            etas = self.lrs[a:b]
            thetas = spec.thetas
            if edge_limit is not None and etas.numel():  # the directions at the edge take the fixed point
                on_edge = edge_directions(spec, etas, edge_limit)
                at_edge = max(at_edge, int(on_edge.sum()))
                thetas = thetas[~on_edge]
            top = max(float(thetas.max()) if thetas.numel() else 0.0, spec.h_perp)
            if etas.numel():
                max_eta_theta = max(max_eta_theta, float(etas.max()) * top)
            delta_start = delta_of(a) if self.delta_rule == "interp" else None
            if mu:
                e, f = propagate_segment_momentum(e, f, spec, etas, delta_start, delta_of(b), mu, nesterov,
                                                  self.delta_rule)
            else:
                e = propagate_segment(e, spec, etas, delta_start, delta_of(b), self.delta_rule, edge_limit)
        cost += sum(s.sample_gradients for s in used)
        Lambda = float(self.lrs.sum())
        bound = Lambda * gap_bound_factor(mu) * max(float(d.norm()) for d in deltas)
        norm_e = float(e.norm())
        report.history_bytes_read = self.store.bytes_read - read_before
        report.details = {
            "anchor_steps": self.anchor_steps, "delta_steps": [t for t, _, _ in anchors],
            "ritz_values": [s.ritz for s in used],
            "h_perp": [s.h_perp for s in used], "Lambda": Lambda, "norm_e": norm_e, "bound": bound,
            "max_eta_theta": max_eta_theta, "curvature": self.curvature,
            "curvature_samples": min(m, n - r), "lanczos_steps": k, "curvature_budget": self.curvature_budget,
            "delta_norms": [float(d.norm()) for d in deltas], "stability_bound": stable_below,
            "unstable": self.unstable, "edge_directions": at_edge,
            "recorded_eta_lambda_max": None if edge is None else edge[0],
            **self.sgd.describe()}
        # 4. safety checks.
        reason = ""
        if not torch.isfinite(e).all():
            reason = "the propagated gap e is not finite"
        elif max_eta_theta >= stable_below:
            reason = (f"eta_t * max theta = {max_eta_theta:.3g} >= {stable_below:g}: the linear response "
                      "is not a contraction (the step amplifies the gap)")
        elif norm_e > bound * (1 + 1e-6):
            lam = "Lambda" if not mu else f"Lambda / (1 - {mu:g})"
            reason = f"||e|| = {norm_e:.3g} exceeds {lam} * max ||delta_k|| = {bound:.3g}"
        else:
            rise, check_cost = self._retained_loss_rise(e, retained, m)
            cost += check_cost
            report.details["retained_loss_rise"] = rise
            if rise > self.loss_rise_limit:
                reason = (f"the retained loss on the curvature subsample rises by {rise:.1%} at w* + e "
                          f"(limit {self.loss_rise_limit:.0%}): retraining lowers it, so e left the region "
                          "where the linear response holds")
        if reason:
            cost += self._fallback(union)
            report.status, report.how = "fallback", "resumed from step 0 (stored initial weights)"
            report.reason = f"safety check fired: {reason}; training resumed without the ids, which equals retraining"
        else:
            self.flat.load_((self.original.double() + e).float())
            report.status, report.how = "unlearned", f"linear response over {len(bounds) - 1} segments"
            report.reason = (f"w* + e with ||e|| = {norm_e:.3g} (bound {bound:.3g}), max eta*theta = "
                             f"{max_eta_theta:.3g}")
        report.sample_gradients = cost
        report.weights_changed = True
        self._set_forgotten(union)

    def _retained_loss_rise(self, e: torch.Tensor, retained: torch.Tensor, m: int) -> tuple[float, int]:
        """The rise of the retained objective on the curvature subsample S at w* + e relative to w*
        (mini/safety.py: our check, with its calibration), and its cost (two forward passes,
        counted as |S| sample-gradients)."""
        ids = subsample(retained, m, self.seed)
        w0 = self.original.double()
        return retained_loss_rise(self.flat, ids, w0, w0 + e, self.weight_decay), int(ids.numel())

    def _fallback(self, union: torch.Tensor) -> int:
        if 0 not in self.anchor_steps:
            raise RuntimeError("a safety check fired and the history holds no weights at step 0 to resume from "
                               "(record an anchor at epoch 0)")
        w0 = self._stored(0, "params").whole()
        return resume_from(self.model, self.data, self.info, self.sgd, 0, w0, self.flat, union)

    def training_epochs(self) -> int:
        # Older run records name no epochs: the recorded schedule's steps over steps per epoch.
        return int(self.info.get("epochs", self.lrs.numel() // max(self.info["steps_per_epoch"], 1)))

    # ---- persistence ----------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {"shapes": parameter_shapes(self.model), "anchor_steps": self.anchor_steps,
                "steps": int(self.lrs.numel()), "weight_decay": self.weight_decay, **self.sgd.describe(),
                "codecs": {k: v.codec for k, v in self.store.fields.items()}, "curvature": self.curvature,
                "delta_rule": self.delta_rule, "curvature_samples": self.curvature_samples,
                "lanczos_steps": self.lanczos_steps, "curvature_budget": self.curvature_budget,
                "seed": self.seed, "loss_rise_limit": self.loss_rise_limit, "unstable": self.unstable, "history_sha256": self.history_sha256,
                **self.data.fingerprint()}

    def state_dict(self) -> dict:
        # w* (what every request recomputes from) by parameter name, like the model's weights
        original = {k: v.clone() for k, v in zip(self.flat.names, self.flat.split(self.original))}
        return {**model_state(self.model), "original": original, "forgotten": self.forgotten.clone()}

    def load_state_dict(self, state: dict) -> None:
        load_model_state_(self.model, state)
        self.original = self.flat.join([state["original"][k] for k in self.flat.names])
        self._set_forgotten(state["forgotten"])
