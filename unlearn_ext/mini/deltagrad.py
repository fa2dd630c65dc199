"""DeltaGrad (Wu, Dobriban & Davidson, ICML 2020) as an `Unlearner`: the baseline of docs/design.md §6.

It replays all T recorded SGD steps from the stored initial weights, computing the retained run
w^I_t directly:
  * exact steps — during the burn-in (t < j0) and every T0 steps after it (t - j0 divisible by
    T0): the retained batch's gradient at w^I_t is computed exactly (|B_t \\ F| sample-gradients,
    plus |B_t & F| for the pair), and the pair (dw, dg) = (w^I_t - w_t, grad L_B(w^I_t) - g_t) is
    kept (the last m pairs, only those with positive curvature dw.dg > 0, as L-BFGS requires);
  * other steps — the batch gradient at w^I_t is predicted as g_t + B dw with B the L-BFGS
    compact-form Hessian approximation (Byrd, Nocedal & Schnabel 1994) of the kept pairs, and the
    forgotten samples' exact gradients are taken out:
        w^I_{t+1} = w^I_t - eta_t [(|B| (g_t + B dw) - sum_{i in B & F} grad l_i(w^I_t)) / |B \\ F| + wd w^I_t].
Weight decay is linear, so it is applied exactly rather than through the pairs. The recorded g_t
enter as y += alpha g_t rounded as the dequantize-axpy on their int8 codes (alpha g_t, then the sum),
from blocks of steps decoded in one call each (HistoryStore.read_flat_many; across ranks with a
sharded history, the axpy on each rank's codes). A batch left empty makes no update (as retraining).
The history bytes a request reports (history_bytes_read) are those the store read, read-ahead
included: a replay that stops early (a safety check fired mid-replay) has read the rest of its
block too, up to READ_AHEAD_STEPS - 1 steps past the step it stopped at.

Momentum (heavy ball or Nesterov, dampening 0): the replay carries the retained run's buffer b as
torch does: b <- mu b + g (b = g at the replay's first update), w <- w - eta b (heavy ball) or
w <- w - eta (g + mu b) (Nesterov), where g is the exact or quasi-Newton retained gradient above
(with weight decay). The pairs still model the loss gradient alone, which momentum does not change.
An emptied batch leaves b alone too, as an optimizer that is not stepped.

The exact prefix (the burn-in, and any step before the first pair: steps computed exactly on the
retained data from the stored initial weights) is retraining's first steps, so it is run as such:
through the same step function as `retrain` (mini/resume.py's RetainedRun, on a copy of the model),
with the removed samples' gradients for the pairs from the working copy; the approximate phase starts
from that run's weights and momentum buffer. A model with active dropout trains those steps with
retraining's masks, while the pairs' gradients, as every replayed gradient, are taken in eval mode:
the kept samples' gradient is taken again on the working copy (they are billed twice).

Safety checks (ours), any of which stops the replay and falls back to retraining: the prefix's run
continued without the ids over the remaining recorded batches and learning rates (or, before the
replay began, training resumed from the stored initial weights), so its weights are retraining's
bit for bit and the prefix is not paid twice; status 'fallback' with the reason:
  * stability: at a quasi-Newton step the gap evolves as dw <- (I - eta_t B) dw + ..., so
    eta_t * lambda_max(B) must stay below 2 (lambda_max on span(S, Y) and sigma outside it); with
    momentum below the momentum recursion's bound (mini/propagate.py: 2 (1 + mu) for heavy ball,
    2 (1 + mu) / (1 + 2 mu) for Nesterov);
  * prediction: at each exact step the quasi-Newton prediction B dw of dg is compared with the exact
    dg; a relative error above `max_prediction_error` (default 10) means the model is far off.
    (With SGD the pairs come from different batches, so errors ~1-2 are normal: measured on the
    tests' logistic regression, where the result is still within d/d0 ~0.1 of retraining.)
  * a non-finite iterate;
  * at the end, the retained objective on a subsample must not rise by more than loss_rise_limit
    relative to the weights before the request (mini/safety.py).
A late fallback costs retraining plus what the approximate phase spent before the check fired (its
exact steps' batches, the removed samples' gradients, the loss check's passes); the stability check
runs before a quasi-Newton step's gradient, so a step it refuses costs nothing.

Deciding before spending (ours): where the recorded run's eta * lambda_max estimate
(mini/sharpness.py) is already at the stability bound, the quasi-Newton replay would be refused
at its first unstable step, so the request goes straight to that retraining (`unstable="refuse"`,
the default).

Speed (ours): a replay takes one or two gradients per recorded step, each on a handful of rows, so
on small models the per-call bookkeeping used to cost more than the arithmetic. The replay pays it
once per request: one working copy of the model (mini/replay_model.py), one read of the schedule and
one membership test for the whole history, the rows and the recorded weights and gradients read
ahead in blocks (one decode call per block of steps), one forward pass for an exact step's retained
and removed gradients, the history's digest kept with the store (mini/history_digest.py); what is
left per step is what depends on the step before, made of as few tensor operations as the
arithmetic allows, issued from C++ where Python's per-call cost would dominate: a model of Linear
layers and elementwise activations takes its gradients without autograd's graph in one op call
(mini/layer_chain.py), and a quasi-Newton step (B dw, the direction, the weight and momentum update,
the recorded gradient's term) is one op call too (ops.deltagrad_qn_step_); the weights are updated
in place. Between two exact steps the L-BFGS matrices are fixed, so where that op covers the model
(ReplayModel.run_arguments: a float32 chain, in-memory rows, one process) the run of quasi-Newton
steps below the stability bound is one call (ops.deltagrad_qn_run_: per step the removed rows'
gradient, the recorded gradient's term and the step, the per-step path's calls in its order), or one
call per read-ahead block of steps where the run is longer (its recorded rows are held until the call).

Edge of stability (`unstable="damp"`, ours): at a quasi-Newton step, B's eigenvalues (on
span(S, Y), and sigma outside it) at or above the bound / eta_t are replaced by 1 / eta_t, the
critically damped value: (I - eta_t B) then removes the modelled gap along those directions in one
step instead of amplifying it, and the next exact step measures the true gradient there again.
What makes the plain replay unstable there is mostly sigma, the newest pair's curvature applied to
every direction outside span(S, Y): at the edge it is about lambda_max; a sigma at the edge is
replaced by the smallest positive in-span eigenvalue of B (as Mini's h_perp), at most 1 / eta_t.
Both follow from the recursion, not from a grid (benchmarks/edge_of_stability_rule.md records the
one choice made on held-out seeds, between this complement rule and sigma -> 1 / eta_t, a near tie).
Measured on the harness's CNN it answers requests but ends at the original weights (d/d0 ~ 1:
dw lies in span(S), whose capped directions remove it): an option, not the default.
"""
from __future__ import annotations

import copy
import math
from collections import deque

import numpy as np
import torch

from ..data import TrainingData, as_ids
from ..history import HistoryStore
from .. import ops
from ..model_state import load_model_state_, model_state
from ..parameters import parameter_shapes, trainable
from ..policy import active_stochastic_layers, refuse_training_batch_norm
from ..unlearner import Unlearner, UnlearnReport
from .curvature import subsample
from .history_digest import history_sha256
from .options import check_limits, threshold, whole_number
from .safety import DEFAULT_LOSS_RISE_LIMIT, retained_loss_rise
from .sharpness import recorded_edge
from .propagate import stability_bound
from .replay_model import ReplayModel, batch_rows
from .record import check_replayable_sgd
from .resume import RetainedRun, resume_from
from .vectors import CHUNK, FlatModel, StoredVector, stored_vector


# Read-ahead of the recorded weights and gradients (DeltaGradUnlearner._recorded): steps per block, and at
# most this many bytes of decoded float32 rows held at once (read_ahead_block).
READ_AHEAD_STEPS = 64
READ_AHEAD_BYTES = 64 << 20
# Decoded rows held at once per step of a block, while the next block is read: the block the replay
# is at (its weights and gradients; the replay still holds its last step's), the next block's two,
# and read_flat_many's scratch for the field it decodes (at most one row per step).
READ_AHEAD_ROWS_PER_STEP = 5


def read_ahead_block(dim: int) -> int:
    """Steps per read-ahead block for `dim` parameters: READ_AHEAD_STEPS, fewer where the decoded
    rows held at once (READ_AHEAD_ROWS_PER_STEP per step) would pass READ_AHEAD_BYTES; at least 1."""
    return max(1, min(READ_AHEAD_STEPS, READ_AHEAD_BYTES // (4 * READ_AHEAD_ROWS_PER_STEP * max(dim, 1))))

FALLBACK_HOW = "retrained from the stored initial weights"
FALLBACK_CONTINUED = "retrained from the stored initial weights, continuing the replay's exact prefix"
FALLBACK_WHAT = "trained again without the ids from the stored initial weights, which equals retraining"


class CompactLBFGS:
    """The L-BFGS Hessian approximation of pairs S = [dw_i], Y = [dg_i] ([d, m], oldest first) in
    compact form (Byrd, Nocedal & Schnabel 1994): B = sigma I - W M^{-1} W^T with W = [sigma S, Y],
    M = [[sigma S^T S, L], [L^T, -D]], L the strictly lower part of S^T Y, D its diagonal, and
    sigma = dg.dw / dw.dw of the newest pair (as in DeltaGrad). float64.

    Built once per change of the pairs (every T0 steps) and reused by every quasi-Newton step in
    between: a product is then two thin matrix-vector products, not a new 2m x 2m solve."""

    def __init__(self, S: torch.Tensor, Y: torch.Tensor):
        self._build(torch.cat([S.T, Y.T]).double(), S.shape[1])

    @classmethod
    def from_pairs(cls, pairs) -> "CompactLBFGS":
        """The approximation of (dw, dg) pairs, oldest first (as the replay keeps them): the same as
        cls(S, Y) with their columns, built from rows (no strided copies of d values)."""
        model = cls.__new__(cls)
        dws, dgs = zip(*pairs)
        model._build(torch.stack(dws + dgs).double(), len(dws))
        return model

    def _build(self, rows: torch.Tensor, m: int) -> None:
        """rows: [S^T; Y^T] ([2m, d], float64, contiguous; this model's own: scaled in place into W^T).
        Built once per change of the pairs, so made of few operations: a rebuild costs about as
        much as several quasi-Newton steps on a small model."""
        # Every inner product the 2m x 2m algebra needs (S^T S, S^T Y, Y^T Y) from one pass over the
        # d values; that algebra then runs on 2m x 2m arrays in numpy (per-call cost of small ops).
        G = (rows @ rows.T).numpy()
        SS, SY = G[:m, :m], G[:m, m:]  # (S^T S, S^T Y: Y^T Y is not needed)
        s = self.sigma = float(SY[-1, -1] / SS[-1, -1])
        L = np.tril(SY, -1)
        M = np.empty((2 * m, 2 * m))
        M[:m, :m], M[:m, m:], M[m:, :m], M[m:, m:] = s * SS, L, L.T, -np.diag(np.diag(SY))
        M_inv = np.linalg.inv(M)
        self.M_inv = torch.from_numpy(M_inv)
        rows[:m] *= s  # W^T = [sigma S, Y]^T [2m, d]
        self.W = rows.T
        self.P = self.M_inv @ rows  # [2m, d]: a product is then two thin matrix-vector products
        # M^-1 W^T W, for B's eigenvalues on span(W) without a basis of it (largest_eigenvalue):
        # W^T W = [[s^2 S^T S, s S^T Y], [s Y^T S, Y^T Y]], G scaled by (s.., 1..) on both sides
        scales = np.repeat([s, 1.0], m)
        gram = G * np.outer(scales, scales)
        gram[m:, :m] = gram[:m, m:].T  # (G's own upper block, as the formula: G is symmetric up to rounding)
        self._M_inv_gram = M_inv @ gram

    def product(self, v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return torch.addmv(v, self.W, self.P @ v, beta=self.sigma, alpha=-1.0)  # sigma v - W M^-1 W^T v

    def _span_eigen(self):
        """(Q orthonormal basis of span(W), eigenvalues and eigenvectors of Q^T B Q), cached."""
        if not hasattr(self, "_eigen"):
            Q, _ = torch.linalg.qr(self.W)
            QW = Q.T @ self.W
            inside = self.sigma * torch.eye(Q.shape[1], dtype=torch.float64) - QW @ self.M_inv @ QW.T
            values, vectors = torch.linalg.eigh((inside + inside.T) / 2)
            self._eigen = (Q, values, vectors)
        return self._eigen

    def largest_eigenvalue(self, from_basis: bool = False) -> float:
        """lambda_max of B: sigma outside span(W); inside, the eigenvalues of Q^T B Q = sigma I -
        R M^-1 R^T for W = Q R, which are sigma minus those of M^-1 R^T R = M^-1 W^T W (AB and BA
        have the same eigenvalues): 2m x 2m algebra on the Gram matrix, no basis of the span and no
        d x d matrix. from_basis: from the basis's eigenvalues instead (_span_eigen), the ones
        capped_product caps, so that a damping decision and the cap agree at the bound."""
        if from_basis:
            inside = self._span_eigen()[1].numpy()
        else:
            inside = self.sigma - np.linalg.eigvals(self._M_inv_gram).real
        return max(float(inside.max()), self.sigma)

    def capped_product(self, v: torch.Tensor, above: float, cap: float) -> torch.Tensor:
        """B v with every in-span eigenvalue >= `above` replaced by `cap`, and sigma (outside the span),
        where it is >= `above`, by the smallest positive in-span eigenvalue, at most `cap` (module
        docstring, "damp")."""
        v = v.double()
        out = self.product(v)
        Q, values, vectors = self._span_eigen()
        excess = torch.where(values >= above, values - cap, torch.zeros_like(values))
        coords = Q.T @ v
        if bool((excess != 0).any()):
            out = out - Q @ (vectors @ (excess * (vectors.T @ coords)))
        if self.sigma >= above:  # outside the span
            positive = values[values > 0]
            new = min(float(positive.min()), cap) if positive.numel() else cap
            out = out - (self.sigma - new) * (v - Q @ coords)
        return out


def _add_scaled_(values: torch.Tensor, y: torch.Tensor, alpha: float) -> None:
    """y += alpha * values in float32, rounded as ops.dequantize_axpy_ on the values' codes: alpha * values
    (alpha as float32), then the sum, two roundings (one fused multiply-add would round once)."""
    y.add_(values * alpha)


class _RecordedGradient:
    """A recorded step's gradient g_t from its decoded values (DeltaGradUnlearner._recorded): called as
    add_g(y, alpha), y += alpha g_t (_add_scaled_); scaled(alpha): the term alpha g_t alone, which
    the quasi-Newton step op adds (the same rounding: the product, then the sum)."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def __call__(self, y: torch.Tensor, alpha: float) -> None:
        _add_scaled_(self.values, y, alpha)

    def scaled(self, alpha: float) -> torch.Tensor:
        return self.values * alpha


def _step_weights(kept: torch.Tensor, removed: torch.Tensor, size: int) -> tuple[float, float]:
    """A quasi-Newton step's |B|/|B\\F| (the scale of B dw and of the recorded gradient) and
    -|B&F|/|B\\F| (the removed rows' mean gradient's weight), as both step paths pass them to their op."""
    return size / kept.numel(), -removed.numel() / kept.numel()


def _copy_parameters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """target's trainable parameters <- source's (a copy of target), bit for bit."""
    with torch.no_grad():
        for p, q in zip(trainable(target).values(), trainable(source).values()):
            p.copy_(q)


def lbfgs_product(S: torch.Tensor, Y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """B v for the compact-form L-BFGS approximation of pairs (S, Y) (see CompactLBFGS)."""
    return CompactLBFGS(S, Y).product(v)


class _MomentumReplay:
    """The replayed run's momentum buffer, updated as torch.optim.SGD does (dampening 0); `buffer`:
    the buffer to continue from (None: the first step starts it)."""

    def __init__(self, momentum: float, nesterov: bool, buffer: torch.Tensor | None = None):
        self.mu, self.nesterov, self.buffer = float(momentum), bool(nesterov), buffer

    def step(self, w: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        """w after one step with gradient g (weight decay included) at learning rate lr."""
        self.buffer = g.clone() if self.buffer is None else self.mu * self.buffer + g
        return w - lr * (g + self.mu * self.buffer if self.nesterov else self.buffer)

    def for_op(self, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(the buffer for ops.deltagrad_qn_step_ to update in place, whether that step starts it)."""
        if self.buffer is None:
            self.buffer = torch.empty_like(like)
            return self.buffer, True
        return self.buffer, False


class DeltaGradUnlearner(Unlearner):
    method = "deltagrad"

    def __init__(self, model: torch.nn.Module, data: TrainingData, store: HistoryStore, *,
                 burn_in: int = 10, period: int = 5, memory: int = 2, max_prediction_error: float = 10.0,
                 stability_limit: float = 2.0, loss_rise_limit: float = DEFAULT_LOSS_RISE_LIMIT,
                 check_samples: int = 1024, unstable: str = "refuse"):
        """store: every step's 'params', 'grads' (the batch's mean loss gradient, without weight
        decay), lr and batch ids (StepRecorder, or HistoryRecorder with recorder.batch(ids)).
        loss_rise_limit, check_samples: the check against an answer worse than doing nothing
        (mini/safety.py) on a seeded subsample of that many retained samples.
        unstable: "refuse" (the default: a quasi-Newton step with eta_t * lambda_max(B) at the
        stability bound falls back, decided before any work where the recorded run's estimate is
        already there) or "damp" (ours: those eigenvalues of B are capped at 1 / eta_t; module
        docstring)."""
        super().__init__(data)
        self.check_options(burn_in=burn_in, period=period, memory=memory, max_prediction_error=max_prediction_error,
                           stability_limit=stability_limit, loss_rise_limit=loss_rise_limit,
                           check_samples=check_samples, unstable=unstable)
        self.unstable = unstable
        info = store.run_info
        refuse_training_batch_norm(model, "DeltaGrad")
        self.sgd = check_replayable_sgd(info, "DeltaGrad", len(trainable(model)))
        self.weight_decay = self.sgd.weight_decay
        if "params" not in store.fields or "grads" not in store.fields:
            raise ValueError("DeltaGrad needs every step's 'params' and 'grads' in the history")
        if store.fields["grads"].delta:
            raise ValueError("DeltaGrad needs the gradients stored plainly (products run on their codes)")
        steps = store.steps
        if steps != list(range(len(steps))) or not steps:
            raise ValueError("DeltaGrad needs every step 0..T-1 recorded; the history has "
                             f"{len(steps)} steps" + (f" ({steps[0]}..{steps[-1]})" if steps else ""))
        self.model, self.store, self.info = model, store, info
        self.flat = FlatModel(model, data)
        self.burn_in, self.period, self.memory = int(burn_in), int(period), int(memory)
        self.max_prediction_error = float(max_prediction_error)
        self.stability_limit = float(stability_limit)
        self.loss_rise_limit, self.check_samples = float(loss_rise_limit), int(check_samples)
        # Binds saved state to this history (mini/history_digest.py): the schedule and every step.
        self.history_sha256 = history_sha256(store, sorted({steps[0], steps[-1]}), ["params", "grads"], "DeltaGrad")
        self.stable_below = stability_bound(self.sgd.momentum, self.sgd.nesterov, self.stability_limit)

    @staticmethod
    def check_options(*, burn_in, period, memory, max_prediction_error, stability_limit, loss_rise_limit,
                      check_samples, unstable) -> None:
        """Refuses option values no request could use, naming the option; the constructor calls it,
        and make_unlearnable before training (the unlearner is built after it)."""
        if unstable not in ("refuse", "damp"):
            raise ValueError(f"unstable must be 'refuse' or 'damp', got {unstable!r}")
        whole_number("burn_in", burn_in, 0)
        whole_number("period", period, 1)
        whole_number("memory", memory, 1)
        whole_number("check_samples", check_samples, 1)
        threshold("max_prediction_error", max_prediction_error)
        check_limits(stability_limit, loss_rise_limit)

    def _exact_step(self, t: int) -> bool:
        return t < self.burn_in or (t - self.burn_in) % self.period == 0

    def _plan(self, union: torch.Tensor) -> list:
        """Every recorded step as (t, lr, kept ids, removed ids, batch size), read from the store's
        schedule (no field decoded) with one membership test for the whole history."""
        steps = list(self.store.schedule())
        for t, _, _, ids in steps:
            if ids is None:
                raise ValueError(f"step {t} of the history has no batch ids: DeltaGrad needs them")
        # Split every step's ids at once: the kept and the removed ids of the whole history, then each
        # step's share of both (counts from a cumulative sum of the membership).
        sizes = [int(ids.numel()) for *_, ids in steps]
        every = torch.cat([ids for *_, ids in steps])
        gone = torch.isin(every, union)
        ends = np.cumsum(sizes)
        removed_before = np.concatenate([[0], np.cumsum(gone.numpy())])[np.concatenate([[0], ends])]
        removed_counts = np.diff(removed_before).tolist()
        kept_counts = [n - r for n, r in zip(sizes, removed_counts)]
        kept, removed = every[~gone].split(kept_counts), every[gone].split(removed_counts)
        return [(t, float(lr), k, r, n) for (t, lr, _, _), k, r, n in zip(steps, kept, removed, sizes)]

    def _retained_run(self, plan: list) -> RetainedRun:
        """Training without the ids from the stored step-0 weights over the recorded batches and
        learning rates (mini/resume.py), on a copy of the model so that the user's model is only
        written once the request is answered: the replay's exact prefix takes its first steps, a
        fallback takes the rest."""
        model = copy.deepcopy(self.model)
        return RetainedRun(model, self.data, self.sgd, self._stored(plan[0][0], "params").whole(),
                           FlatModel(model, self.data), [(t, kept, lr) for t, lr, kept, _, _ in plan],
                           self.info)

    def _replay(self, plan: list, run: RetainedRun | None = None):
        """Returns (w^I_T, sample_gradients, stats, reason why the replay stopped or '') for the
        request's plan (_plan, made once per request).

        The exact prefix (the burn-in, and any step before the first pair) is retraining's own first
        steps: `run` (a RetainedRun of this request's plan, made here when not given) takes them
        through retraining's step function and keeps its weights and momentum buffer, so a fallback
        continues it from the prefix's end (module docstring). The removed samples' gradients at
        each prefix step (for the pairs) come from the working copy.

        The per-step work is only what depends on the previous step: the schedule and the
        membership test are done once for the whole history, and the gradients come from one
        working copy of the model (mini/replay_model.py) instead of rebuilding the model from the
        flat vector at every call; an exact step takes its retained and removed gradients from one
        forward pass. tests/deltagrad_reference.py states the same replay step by step."""
        flat, wd = self.flat, self.weight_decay
        run = self._retained_run(plan) if run is None else run
        grads = ReplayModel(flat)
        pairs = deque(maxlen=self.memory)
        w, cost, exact_steps, worst, top_eta_lambda, damped = None, 0, 0, 0.0, 0.0, 0
        lambda_max = None  # of the current pairs' B (recomputed when a pair is added)
        model = None       # CompactLBFGS of the current pairs (rebuilt when a pair is added)

        def stats():
            return {"exact_steps": exact_steps, "worst_prediction_error": worst, "max_eta_lambda": top_eta_lambda,
                    "prefix_steps": prefix, **({"damped_steps": damped} if self.unstable == "damp" else {})}

        def learn(t, w, dw, dg):
            """Adds the exact step's pair (dw, dg) after checking B's prediction of dg; returns the
            reason to stop, or ''."""
            nonlocal model, lambda_max, worst
            dw64, dg64 = dw.double(), dg.double()
            # A non-finite recorded value (a damaged history, an overflowed step) would make the
            # prediction error NaN, which no comparison below fails: the check would pass silently.
            if not math.isfinite(float(dw64.sum()) + float(dg64.sum())):
                return (f"the recorded weights or gradient at exact step {t} are not finite: the history "
                        "cannot be replayed there")
            if pairs and float(dg.norm()) > 0:
                if model is None:
                    model = CompactLBFGS.from_pairs(pairs)
                err = float((model.product(dw64) - dg64).norm() / dg64.norm())
                worst = max(worst, err)
                if err > self.max_prediction_error:
                    return (f"the quasi-Newton prediction of the gradient change at exact step {t} is off by "
                            f"{err:.3g} (relative) > {self.max_prediction_error:g}")
            if float(torch.dot(dw64, dg64)) > 1e-12 * float(dw.norm() * dg.norm()):
                pairs.append((dw.clone(), dg.clone()))
                lambda_max, model = None, None
            return ""

        # The exact prefix, on retraining's own run. Its steps train in the model's own mode (retraining's
        # dropout masks); with active stochastic layers the pair's kept gradient is taken again in eval mode.
        stochastic = bool(active_stochastic_layers(run.model))
        # The recorded weights and gradients of every step that updates (a non-empty retained batch), read ahead.
        recorded = self._recorded([t for t, _, kept, _, _ in plan if kept.numel()])
        prefix = 0
        for t, lr, kept, removed, size in plan:
            if not (t < self.burn_in or not pairs):
                break
            prefix += 1
            w = run.flat.flat()  # w^I_t: retraining's weights at step t
            g_kept = run.step()
            if g_kept is None:
                continue  # an emptied batch: retraining makes no update
            exact_steps += 1
            if stochastic:  # the step drew dropout masks; the pair's gradients are in eval mode, as every replay's
                g_kept, g_removed = grads.split_mean_grads(w, kept, removed)
                cost += int(kept.numel())
            else:
                g_removed = grads.mean_loss_grad(w, removed) if removed.numel() else None
            cost += int(kept.numel()) + int(removed.numel())
            dg = g_kept * kept.numel() / size
            if g_removed is not None:
                dg += g_removed * removed.numel() / size
            w_t, add_g = next(recorded)
            add_g(dg, -1.0)  # dg = grad L_B(w^I_t) - g_t
            reason = learn(t, w, w_t.subtracted_from(w), dg)
            if reason:
                return None, cost, stats(), reason
        if prefix == len(plan):
            return run.flat.flat(), cost, stats(), ""
        w = run.flat.flat()  # updated in place from here on
        momentum = None
        if self.sgd.momentum:  # the retained run's own buffer carries on (None if no step was taken)
            momentum = _MomentumReplay(self.sgd.momentum, self.sgd.nesterov, run.momentum_buffer())
        # The approximate phase. The rows its gradients need (this process's share: ReplayModel.mine), read
        # ahead in blocks (replay_model.batch_rows).
        approximate = [(t, lr, kept, removed, size, self._exact_step(t)) for t, lr, kept, removed, size in plan[prefix:]
                       if kept.numel()]  # retraining makes no update on an emptied batch
        mine = grads.mine
        rows = batch_rows(self.data, [torch.cat([mine(kept), mine(removed)]) if exact else mine(removed)
                                      for _, _, kept, removed, _, exact in approximate if exact or removed.numel()])
        # Runs of quasi-Newton steps below the stability bound in one op call each where the op covers
        # the model (ReplayModel.run_arguments); any other step below, one by one. A run holds its
        # steps' recorded rows (and so their read-ahead blocks) until its call: at most a block's
        # steps per call keeps what is held within READ_AHEAD_BYTES (read_ahead_block).
        run_arguments = grads.run_arguments()
        longest_run = read_ahead_block(flat.dim)

        def quasi_newton_model() -> None:
            """Sets model and lambda_max for the current pairs where a new pair reset them."""
            nonlocal model, lambda_max
            if model is None:
                model = CompactLBFGS.from_pairs(pairs)
            if lambda_max is None:
                # (damping caps the basis's eigenvalues: decide on those same numbers)
                lambda_max = model.largest_eigenvalue(from_basis=self.unstable == "damp")

        def quasi_newton_run(steps) -> str:
            """Replays `steps` (consecutive quasi-Newton steps of `approximate`, below the stability
            bound) in one ops.deltagrad_qn_run_ call: the arithmetic of the per-step path below, its
            calls in its order. Returns the reason to stop (a non-finite step), or ''."""
            nonlocal cost, top_eta_lambda
            w_ts, g_ts, xs, ys, counts, lrs, scales, removed_alphas = [], [], [], [], [], [], [], []
            for _, lr, kept, removed, size, _ in steps:
                w_t, add_g = next(recorded)
                w_ts.append(w_t.values)
                g_ts.append(add_g.values)
                if removed.numel():
                    x, y = next(rows)
                    xs.append(x)
                    ys.append(y)
                counts.append(int(removed.numel()))
                lrs.append(lr)
                scale, removed_alpha = _step_weights(kept, removed, size)
                scales.append(scale)
                removed_alphas.append(removed_alpha)
            buffer, start = (None, False) if momentum is None else momentum.for_op(w)
            chain_weights, grad, shapes, layers = run_arguments
            sums = ops.deltagrad_qn_run_(w, buffer, chain_weights, grad, w_ts, g_ts, xs, ys, counts, lrs, scales,
                                         removed_alphas, shapes, layers, model.W, model.P, model.sigma, wd,
                                         0.0 if momentum is None else momentum.mu,
                                         False if momentum is None else momentum.nesterov, start).tolist()
            for (t, lr, *_), count, total in zip(steps, counts, sums):
                top_eta_lambda = max(top_eta_lambda, lr * lambda_max)
                cost += count
                if not math.isfinite(total):
                    return f"the replayed weights became non-finite at step {t}"
            return ""

        i = 0
        while i < len(approximate):
            t, lr, kept, removed, size, exact = approximate[i]
            if not exact and run_arguments is not None:
                quasi_newton_model()
                end = i
                while (end < len(approximate) and end - i < longest_run and not approximate[end][5]
                       and approximate[end][1] * lambda_max < self.stable_below and approximate[end][3].numel() <= CHUNK):
                    end += 1
                if end > i:
                    reason = quasi_newton_run(approximate[i:end])
                    if reason:
                        return None, cost, stats(), reason
                    i = end
                    continue
            i += 1
            w_t, add_g = next(recorded)
            dw = w_t.subtracted_from(w)  # w - w_t
            total = None  # sum(w) after the step, in float64 (the quasi-Newton step's op returns it)
            if exact:
                exact_steps += 1
                g_kept, g_removed = grads.split_mean_grads(w, kept, removed, next(rows))
                cost += int(kept.numel()) + int(removed.numel())
                # dg = grad L_B(w^I_t) - g_t
                dg = g_kept * kept.numel() / size
                if g_removed is not None:
                    dg += g_removed * removed.numel() / size
                add_g(dg, -1.0)
                reason = learn(t, w, dw, dg)
                if reason:
                    return None, cost, stats(), reason
                step = g_kept.add(w, alpha=wd) if wd else g_kept
                if momentum is None:
                    w.add_(step, alpha=-lr)
                else:
                    w.copy_(momentum.step(w, step, lr))
            else:
                # The stability check first: it needs no gradient, so a step it refuses costs nothing.
                quasi_newton_model()
                top_eta_lambda = max(top_eta_lambda, lr * lambda_max)
                if lr * lambda_max >= self.stable_below and self.unstable == "refuse":
                    return None, cost, stats(), (
                        f"eta_t * lambda_max(B) = {lr * lambda_max:.3g} >= {self.stable_below:g} at step {t}: the "
                        "quasi-Newton replay amplifies the gap")
                g_removed = grads.mean_loss_grad(w, removed, next(rows)) if removed.numel() else None
                cost += int(removed.numel())
                predicted = None  # B dw: the op computes it from the model's matrices
                if lr * lambda_max >= self.stable_below:
                    damped += 1
                    predicted = model.capped_product(dw, self.stable_below / lr, 1.0 / lr)
                # One op call (ops.deltagrad_qn_step_, from C++ on the CPU): direction = |B|/|B\F| B dw
                # - |B&F|/|B\F| g_removed + wd w, then w -= lr direction and the recorded gradient's
                # term - lr |B|/|B\F| g_t; with momentum the term joins the direction (the buffer needs
                # the whole gradient) and the buffer steps as torch's.
                scale, removed_alpha = _step_weights(kept, removed, size)
                if momentum is None:
                    total = ops.deltagrad_qn_step_(w, None, dw, add_g.scaled(-lr * scale), model.W, model.P,
                                                   model.sigma, predicted, g_removed, removed_alpha, scale, wd, lr,
                                                   0.0, False, False)
                else:
                    buffer, start = momentum.for_op(w)
                    total = ops.deltagrad_qn_step_(w, buffer, dw, add_g.scaled(scale), model.W, model.P,
                                                   model.sigma, predicted, g_removed, removed_alpha, scale, wd, lr,
                                                   momentum.mu, momentum.nesterov, start)
            # All finite exactly when their float64 sum is (d float32 values cannot overflow it): one pass.
            if not math.isfinite(float(w.sum(dtype=torch.float64) if total is None else total)):
                return None, cost, stats(), (
                    f"the replayed weights became non-finite at step {t}")
        return w, cost, stats(), ""

    def _forget(self, new: torch.Tensor, report: UnlearnReport) -> None:
        refuse_training_batch_norm(self.model, "DeltaGrad")
        union = torch.cat([self.forgotten, new]).unique()
        T = len(self.store.steps)
        before = self.store.bytes_read
        if union.numel() == len(self.data):
            # Nothing is retained: every batch is empty, retraining makes no update and returns the
            # stored initial weights (as Mini-Unlearning reports it; a replay of empty batches is none).
            report.status, report.how = "retrained", "every sample forgotten"
            report.reason = "every training sample is forgotten: retraining returns the stored initial weights"
            self._finish(report, None, self._retrain(union), {}, before, union, T)
            return
        edge = recorded_edge(self.info)
        if self.unstable == "refuse" and edge is not None and edge[0] >= self.stable_below:
            # Decided before any work: retraining alone, which costs what retraining costs.
            cost = self._retrain(union)
            stats = {"recorded_eta_lambda_max": edge[0]}
            reason = (f"the run recorded eta_t * lambda_max = {edge[0]:.3g} >= {self.stable_below:g} at step {edge[1]} "
                      "during training, so the quasi-Newton replay would amplify the gap; decided before any other "
                      "work")
            report.status, report.how = "fallback", FALLBACK_HOW
            report.reason = f"safety check fired: {reason}; {FALLBACK_WHAT}"
            self._finish(report, None, cost, stats, before, union, T)
            return
        w_before = self.flat.flat()  # the weights before the request (doing nothing), for the loss check
        plan = self._plan(union)
        run = self._retained_run(plan)
        w, cost, stats, reason = self._replay(plan, run)
        if not reason:
            rise, check_cost = self._retained_loss_rise(w_before, w, union)
            cost += check_cost
            stats["retained_loss_rise"] = rise
            if rise > self.loss_rise_limit:
                reason = (f"the retained loss on {check_cost} retained samples rises by {rise:.1%} at the replayed "
                          f"weights relative to the weights before the request (limit {self.loss_rise_limit:.0%}): "
                          "retraining lowers it, so the answer is likely farther from retraining than doing nothing")
        if reason:
            # The fallback continues retraining's run from the end of the exact prefix.
            cost += run.finish()
            _copy_parameters(run.model, self.model)
            w = None
            report.status, report.how = "fallback", FALLBACK_CONTINUED
            report.reason = f"safety check fired: {reason}; {FALLBACK_WHAT}"
        else:
            report.status, report.how = "unlearned", (f"{stats['exact_steps']} exact and "
                                                      f"{T - stats['exact_steps']} quasi-Newton steps")
            report.reason = (f"replayed {T} steps (j0={self.burn_in}, T0={self.period}, m={self.memory}); worst "
                             f"quasi-Newton prediction error {stats['worst_prediction_error']:.3g}, max eta*lambda(B) "
                             f"{stats['max_eta_lambda']:.3g}")
        self._finish(report, w, cost, stats, before, union, T)

    def _retrain(self, union: torch.Tensor) -> int:
        """The fallback decided before any work: training resumed without the ids from the stored
        step-0 weights over the recorded batches and learning rates, through the same step function
        as `retrain` (mini/resume.py, Mini's fallback too), so it gives retraining's weights bit for
        bit — not a replay of its arithmetic on flat vectors, whose rounding differs in the last bit
        and which a non-smooth model (ReLU) can amplify over many steps. Returns its cost (retained
        samples seen)."""
        steps = list(self.store.schedule())
        w0 = self._stored(steps[0][0], "params").whole()
        return resume_from(self.model, self.data, self.info, self.sgd, 0, w0, self.flat, union,
                           batches={t: ids for t, _, _, ids in steps}, lrs={t: float(lr) for t, lr, _, _ in steps})

    def _recorded(self, steps: list):
        """Yields (w_t, add_g) for each of `steps` (increasing), in order: the step's stored weights (a
        StoredVector) and add_g(y, alpha): y += alpha * g_t on a flat float32 vector, g_t the recorded
        gradient, rounded as the dequantize-axpy on its codes (the product, then the sum). Read ahead
        in blocks (HistoryStore.read_flat_many: one dequantize call per block and field, and one
        addition per delta record, instead of a decode and an axpy call per step)."""
        block = read_ahead_block(self.flat.dim)
        for lo in range(0, len(steps), block):
            part = steps[lo:lo + block]
            weights, grads = self.store.read_flat_many(part, "params"), self.store.read_flat_many(part, "grads")
            for w_t, g_t in zip(weights, grads):
                yield StoredVector(w_t), _RecordedGradient(g_t)

    def _stored(self, step: int, name: str) -> StoredVector:
        """A recorded field (the distributed unlearner reads a sharded history shard by shard)."""
        return stored_vector(self.store, step, name)

    def _finish(self, report: UnlearnReport, w, cost: int, stats: dict, bytes_before: int, union, T: int) -> None:
        """w: the replayed weights, or None when the fallback already trained the model."""
        if w is not None:
            self.flat.load_(w)
        report.details = {**stats, "steps": T, "burn_in": self.burn_in, "period": self.period, "memory": self.memory,
                          "stability_bound": self.stable_below, **self.sgd.describe()}
        if self.unstable != "refuse":
            report.details["unstable"] = self.unstable
        report.sample_gradients = cost
        report.history_bytes_read = self.store.bytes_read - bytes_before
        report.weights_changed = True
        self._set_forgotten(union)

    def _retained_loss_rise(self, w_before: torch.Tensor, w: torch.Tensor, union: torch.Tensor) -> tuple[float, int]:
        """mini/safety.py's check of the replayed weights w against w_before, the weights before the
        request (doing nothing), and its cost; (0, 0) when nothing is retained."""
        retained = self.data.without(union)
        if retained.numel() == 0:
            return 0.0, 0
        ids = subsample(retained, self.check_samples, 0)
        rise = retained_loss_rise(self.flat, ids, w_before.double(), w.double(), self.weight_decay)
        return rise, int(ids.numel())

    def retrain_cost(self, forgotten) -> int:
        if "epochs" in self.info:  # recorded by the library's loops or the engine
            return super().retrain_cost(forgotten)
        # A history the user recorded with HistoryRecorder names no epochs: count its steps.
        forgotten = as_ids(forgotten)
        return sum(int((~torch.isin(ids, forgotten)).sum()) for *_, ids in self.store.schedule())

    def training_epochs(self) -> int:
        return int(self.info["epochs"])

    # ---- persistence ----------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {"shapes": parameter_shapes(self.model), "steps": len(self.store.steps),
                "weight_decay": self.weight_decay, "codecs": {k: v.codec for k, v in self.store.fields.items()},
                "burn_in": self.burn_in, "period": self.period, "memory": self.memory, **self.sgd.describe(),
                "loss_rise_limit": self.loss_rise_limit, "check_samples": self.check_samples, "unstable": self.unstable,
                "history_sha256": self.history_sha256, **self.data.fingerprint()}

    def state_dict(self) -> dict:
        return {**model_state(self.model), "forgotten": self.forgotten.clone()}

    def load_state_dict(self, state: dict) -> None:
        load_model_state_(self.model, state)
        self._set_forgotten(state["forgotten"])
