"""PCMU: certified training with smoothed, quantized gradients, and deletion checks against the
recorded trajectory (docs/design.md §4 — our formulation; the paper's abstract gives no formulas).

Training step t (framework G):
  1. batch = the fixed batch t of the schedule minus the excluded ids (data.py); empty -> no update;
  2. v = sum_i clip_C(grad l_i(w_t)) / b over the batch, b the *nominal* batch size (per_sample.py);
  3. codes, radii = smoothed ternary quantization of v (`analytic` or `mc`, fused kernels);
  4. w_{t+1} = w_t - step_size_t * codes; the RNG offset of step t is t * blocks-per-call;
  5. record the step (records.py): step size, smallest radius, fragile coordinates, codes. Not the
     batch's ids: the seeded schedule and the step each forgotten id was excluded from give them
     again (`batch_ids`), so a record does not grow with the batch.

Removing k ids from a batch moves v by at most k*C/b in every coordinate, so a coordinate whose
radius exceeds k*C/b (plus `rounding_margin`) keeps its code. `check_request` uses the records to
decide, without retraining, whether training without a set of ids would produce the same codes at
every step — then the parameters are bit-identical — or names the first step where a code flips;
`resume_without` retrains from that step, which reproduces retraining from scratch exactly.

Data: a `TrainingData` in memory or over the user's map-style dataset; batches are loaded with
`data.batch(ids)` (in memory: one index of the tensors, as fast as slicing them directly).
Per-sample sums run with the model in eval mode (dropout off: a sample's gradient must be a function
of the weights and the sample, or no check or retraining could reproduce it); BatchNorm in training
mode is refused (policy.py).

Framework D (data smoothing) is available as framework='D' (framework_d.py); its radii are in input
space and do not bound sample removal, so every request on such a model goes to the fallback.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Callable

import numpy as np
import torch

from .. import ops as _ops
from ..data import BatchSchedule, TrainingData, as_ids, in_sorted
from ..rng import call_offset
from ..step_log import StepLog
from ..parameters import trainable
from ..per_sample import clipped_sum64, plan_for
from ..forward import eval_mode
from ..policy import refuse_training_batch_norm
from ..recipe import to_device
from .apriori_index import AprioriIndex
from .certificate import AprioriCertificate, RequestCheck, budget_m_star
from .fallback import resume_without
from .history import attach as attach_history, step_scalars
from .persistence import fingerprint, load_state_dict, state_dict
from .margin import MAX_SUM_TERMS, rounding_margin as derived_margin
from .records import STEP_WINDOW, FragileSet, PCMUStep, estimate_record_bytes, pack_codes, record_bytes, unpack_codes
from .request_check import check_request
from .smoothing import analytic_threshold, blocks_per_element, check_smoothing_config, smooth_quantize


class PCMUTrainer:
    """Trains `model` in place with PCMU and records what deletion checks need.

    data: a TrainingData (tensors, ids, per-sample loss; loss_fn may then be None), or an
        (inputs, targets) pair whose row i belongs to sample id ids[i] (default 0..n-1).
    loss_fn: loss of a one-sample batch, e.g. torch.nn.functional.cross_entropy.
    lr: the step size lr*scale of the quantized update, a float or a function of the step index;
        None: given at each step (`step(step_size=...)`, as PCMUOptimizer does from the user's
        optimizer), so `train()` is refused and the records are the only record of it.
    max_request: M, the largest number of removed ids per batch that the per-request check covers.
        Each step records its fragile coordinates (radius < M*C/b + margin): the larger M, the more
        bytes (record_bytes(), estimate_record_bytes(); README "PCMU", max_request).
    exclude: ids never trained on (the coupled-retraining baseline uses this).
    shuffle: the batch schedule's order (BatchSchedule; False: the data's own order every epoch).
    history: a path (or a disk HistoryStore made with pcmu.history.fields) to record the steps into,
        crash-safe and locked like every history file; over an existing file the recorded steps are
        restored and training goes on from them (history.py). None (default): records in memory.
    """

    # How each step stores its fragile set (records.py): 'auto' (the smaller layout per step),
    # 'sparse' or 'dense'. Every layout gives the same check results; the fixed ones are for tests
    # and measurements.
    fragile_layout: str = "auto"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None, data, *, batch_size: int, clip_norm: float,
                 lr, tau: float, sigma: float, mode: str = "analytic", n0: int = 16, n: int = 64,
                 alpha: float = 1e-3, seed: int = 0, max_request: int = 4, ids=None, exclude=None,
                 chunk: int = 4096, framework: str = "G", sigma_data: float | None = None,
                 rounding_margin: float | None = None, shuffle: bool = True, history=None):
        if framework not in ("G", "D"):
            raise ValueError(f"framework must be 'G' (gradient smoothing) or 'D' (data smoothing), got {framework!r}")
        if framework == "D" and (sigma_data is None or not sigma_data > 0):
            raise ValueError("framework 'D' needs sigma_data > 0 (the input noise scale)")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if max_request < 0:
            raise ValueError(f"max_request must be >= 0, got {max_request}")
        if not isinstance(data, TrainingData):
            data = TrainingData(*data, ids=ids)
        elif ids is not None:
            raise ValueError("give ids through the TrainingData, not as a separate argument")
        refuse_training_batch_norm(model, "PCMU", PER_SAMPLE_NEED)
        self.data = data
        self.model, self.loss_fn = model, loss_fn or data.loss
        self.schedule = BatchSchedule(data.ids, batch_size, seed, shuffle)
        self.batch_size, self.clip_norm = int(batch_size), float(clip_norm)
        self.lr_given_per_step = lr is None
        self._lr = _step_size_given_per_step if lr is None else lr if callable(lr) else (lambda t, v=float(lr): v)
        self.tau, self.sigma, self.mode = float(tau), float(sigma), mode
        self.n0, self.n, self.alpha, self.seed = int(n0), int(n), float(alpha), int(seed)
        self.max_request, self.chunk = int(max_request), int(chunk)
        self.framework, self.sigma_data = framework, sigma_data
        self.beta = analytic_threshold(self.tau, self.sigma)
        # |v - delta - v'| bound, derived in margin.py (our derivation; its forward-pass term is a choice).
        self.rounding_margin = (derived_margin(self.clip_norm, self.batch_size, self.beta, self.max_request)
                                if rounding_margin is None else float(rounding_margin))
        self.names = list(trainable(model))
        self.params = [p for p in trainable(model).values()]
        self.shapes = [p.shape for p in self.params]
        self.initial = [p.detach().clone() for p in self.params]
        self._sums = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device)  # reused every step
                      for k, p in zip(self.names, self.params)}
        # The records, and per step what a request's a-priori answer reads (kept in
        # step with the records by _add_record / _drop_records_from / load_state_dict).
        self.records = StepLog()
        self._step_size = torch.empty(0, dtype=torch.float64)
        self._min_radius = torch.empty(0, dtype=torch.float64)
        self._applied = torch.empty(0, dtype=torch.bool)
        self._forgotten_count = torch.empty(0, dtype=torch.int64)  # forgotten ids in each step's batch
        self._steps = 0
        self._apriori = AprioriIndex()  # running totals of those arrays (apriori_index.py)
        self._forgotten = as_ids([] if exclude is None else exclude, "exclude").unique()
        # Per forgotten id (aligned with _forgotten): the first step computed without it. Recorded
        # step t trained on its scheduled batch minus the forgotten ids with excluded_from <= t;
        # every value is <= steps_done (steps computed from now on skip every forgotten id).
        self._excluded_from = torch.zeros(self._forgotten.numel(), dtype=torch.int64)
        check_smoothing_config(self.tau, self.sigma, mode, self.n0, self.n, self.alpha)
        self.history = None  # the disk store the records are written to (history.py), if any
        if history is not None:
            attach_history(self, history)

    # ---- basic facts --------------------------------------------------------------------------------

    @property
    def unit(self) -> float:
        """C/b: the most one removal can move a coordinate of v."""
        return self.clip_norm / self.batch_size

    @property
    def fragile_threshold(self) -> float:
        return self.max_request * self.unit + self.rounding_margin

    @property
    def steps_done(self) -> int:
        return len(self.records)

    # ---- the records and their per-step index ----------------------------------------------------------

    @property
    def forgotten(self) -> torch.Tensor:
        """Ids never to train on again (sorted int64): excluded from every step computed from now on."""
        return self._forgotten

    @forgotten.setter
    def forgotten(self, ids) -> None:
        self.set_forgotten(ids)

    def set_forgotten(self, ids, *, holding: tuple | None = None) -> None:
        """Sets the ids to skip from the next computed step on. An id may leave the set only while no
        recorded step was computed without it (the records' batches are derived from it).
        holding: a RequestCheck's `holding` for the ids being added, when the check found the steps
        holding them; used only if it is for exactly those ids and the steps recorded now."""
        ids = as_ids(ids).unique()
        leaving = ~in_sorted(self._forgotten, ids)
        held_out = self._forgotten[leaving & (self._excluded_from < self._steps)]
        if held_out.numel():
            raise ValueError(f"ids {held_out[:10].tolist()} cannot leave the forgotten set: recorded steps were "
                             "trained without them (their batches are derived from it)")
        was = in_sorted(ids, self._forgotten)
        excluded_from = torch.full((ids.numel(),), self._steps, dtype=torch.int64)
        excluded_from[was] = self._excluded_from[torch.searchsorted(self._forgotten, ids[was])]
        self._forgotten, self._excluded_from = ids, excluded_from
        if bool(leaving.any()):
            self._recount_forgotten()
            return
        # Only additions: a new id was never excluded, so it is in every scheduled batch so far.
        added = ids[~was]
        added = added[self.data.known(added)]  # an unknown id was never scheduled: in no batch
        if added.numel() and self._steps:
            found = (holding is not None and holding[1] == self._steps and torch.equal(holding[0], added))
            self._count_added(self.rows(added), holding[2:] if found else None)

    def _count_added(self, rows: torch.Tensor, step_counts: tuple | None = None) -> None:
        """Counts the samples at `rows`, just forgotten, in every recorded batch scheduled to hold
        them, and updates the a-priori index in place. Under a full-batch schedule every step holds
        them all: one vectorized add, and the index shifts as a whole; otherwise only the steps
        holding them (one per sample and epoch) are touched: `step_counts` (schedule.step_counts of
        `rows` over the recorded steps) when the caller has them, else found here."""
        if self.schedule.batches_per_epoch == 1:
            self._forgotten_count[:self._steps] += rows.numel()
            self._apriori.added_everywhere(rows.numel())
            return
        steps, counts = step_counts if step_counts is not None else self.schedule.step_counts(rows, 0, self._steps)
        self._forgotten_count.index_add_(0, steps, counts)
        self._apriori.added_at(self, steps, counts)

    def apriori_index(self) -> AprioriIndex:
        """The running totals a request certified a priori reads (apriori_index.py), rebuilt here
        if the records or the counts changed otherwise since."""
        if not self._apriori.valid:
            self._apriori.rebuild(self)
        return self._apriori

    def _recount_forgotten(self) -> None:
        """Forgotten ids in each recorded batch, from the schedule: id f is in step t's batch when
        t is scheduled to hold it and t < its excluded_from."""
        self._apriori.invalidate()
        known = self.data.known(self._forgotten)
        rows, until = self.rows(self._forgotten[known]), self._excluded_from[known]
        for begin in range(0, self._steps, STEP_WINDOW):
            end = min(begin + STEP_WINDOW, self._steps)
            self._forgotten_count[begin:end] = self.schedule.count_in_steps(rows, begin, end, until)

    def batch_ids(self, t: int) -> torch.Tensor:
        """The ids recorded step t trained on, in batch order: its scheduled batch minus the ids
        excluded by then (recomputed from the seeded schedule; records keep no ids)."""
        t = int(t)
        if not 0 <= t < self._steps:
            raise IndexError(f"step {t} is not recorded (steps 0..{self._steps - 1} are)")
        return self.schedule.step(t, self._forgotten[self._excluded_from <= t]).ids

    def _next_batch(self, t: int) -> torch.Tensor:
        """The batch a step computed now trains on: scheduled batch t minus every forgotten id."""
        return self.schedule.step(t, self._forgotten).ids

    def _add_record(self, r: PCMUStep) -> None:
        # Recorded first: a record that fails (a store's write or read) leaves the per-step arrays
        # those of the records.
        self.records.append(r)
        t = self._steps
        if t == self._min_radius.numel():  # grow the per-step arrays by doubling
            cap = max(2 * t, 64)
            self._step_size = torch.cat([self._step_size, torch.empty(cap - t, dtype=torch.float64)])
            self._min_radius = torch.cat([self._min_radius, torch.empty(cap - t, dtype=torch.float64)])
            self._applied = torch.cat([self._applied, torch.zeros(cap - t, dtype=torch.bool)])
            self._forgotten_count = torch.cat([self._forgotten_count, torch.zeros(cap - t, dtype=torch.int64)])
        self._step_size[t], self._min_radius[t], self._applied[t] = r.step_size, r.min_radius, r.applied
        self._forgotten_count[t] = 0  # computed by _compute_step, on _next_batch: no forgotten id in it
        self._steps = t + 1
        self._apriori.invalidate()

    def _drop_records_from(self, t0: int) -> None:
        self.records.truncate(t0)
        self._steps = len(self.records)
        self._apriori.invalidate()
        # The steps recomputed from here on skip every forgotten id.
        self._excluded_from.clamp_(max=self._steps)

    def _reindex(self, scalars: tuple | None = None) -> None:
        """Rebuilds the per-step arrays from the records (after they were replaced or rolled back):
        in a history store from its index, without reading a record (`scalars`: history.step_scalars
        of it, when the caller has them)."""
        n = len(self.records)
        if self.history is not None:
            sizes, radii, applied = step_scalars(self.history) if scalars is None else scalars
        else:
            # One field per pass, read by C iterators into numpy (half the time of list comprehensions
            # into torch.tensor at 100k steps; a ledger reopens or rolls back through here).
            sizes, radii, applied = (np.fromiter(map(attrgetter(name), self.records), dtype, n) for name, dtype in
                                     (("step_size", np.float64), ("min_radius", np.float64), ("applied", np.bool_)))
        self._step_size, self._min_radius, self._applied = map(torch.from_numpy, (sizes, radii, applied))
        self._forgotten_count = torch.zeros(n, dtype=torch.int64)
        self._steps = n
        self._recount_forgotten()

    @property
    def coordinates(self) -> int:
        return sum(p.numel() for p in self.params)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row numbers of sample ids in the data tensors."""
        return self.data.rows(ids)

    def unknown_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.data.unknown_ids(ids)

    def offset_of(self, t: int) -> int:
        return call_offset(t, blocks_per_element(self.mode, self.n0, self.n))

    def training_cost(self, without=None, start: int = 0) -> int:
        """Per-sample gradients that steps start.. of the trained run cost without the ids `without`
        (the unit of reports: coupled retraining from scratch costs training_cost(F))."""
        exclude = as_ids([] if without is None else without).unique()
        rows = self.rows(exclude[self.data.known(exclude)])
        return (self.schedule.samples_in_steps(start, self.steps_done)
                - self.schedule.total_in_steps(rows, start, self.steps_done))

    # ---- training -----------------------------------------------------------------------------------

    def train(self, *, epochs: int | None = None, steps: int | None = None) -> "PCMUTrainer":
        """Runs `steps` more steps (or `epochs` more epochs' worth) from where training stopped."""
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs= or steps=")
        count = steps if steps is not None else epochs * self.schedule.batches_per_epoch
        start = self.steps_done
        for t in range(start, start + count):
            self._add_record(self._compute_step(t))
        return self

    def batches(self, epochs: int):
        """The loop form: `for ids in trainer.batches(epochs): trainer.step(ids)`."""
        start = self.steps_done
        for scheduled in self.schedule.steps(start, start + epochs * self.schedule.batches_per_epoch,
                                             self.forgotten):
            yield scheduled.ids

    def step(self, ids: torch.Tensor, *, step_size: float | None = None,
             clipped_sums: dict | None = None) -> PCMUStep:
        """One PCMU step on the batch `ids` (the schedule's next batch); returns its record.

        step_size: this step's lr*scale (default: the trainer's lr at this step). clipped_sums: the
        batch's float64 sums of clipped per-sample gradients at the current weights (name -> tensor),
        when the caller already has them bit for bit as `clipped_sum64` computes them (PCMUOptimizer
        takes them from the user's backward pass); default: computed here."""
        t = self.steps_done
        if not torch.equal(as_ids(ids), self._next_batch(t)):
            raise ValueError(f"step {t} must use the scheduled batch (fixed per-epoch cuts minus forgotten ids, "
                             "docs/design.md §4); iterate trainer.batches() to get it")
        record = self._compute_step(t, step_size, clipped_sums)
        self._add_record(record)
        return record

    def batch(self, ids: torch.Tensor) -> tuple:
        """(inputs, targets) of the samples `ids`, on the parameters' device."""
        x, y = self.data.batch(ids)
        device = self.params[0].device if self.params else torch.device("cpu")
        return to_device(x, device), to_device(y, device)

    def _clipped_mean64(self, params: list[torch.Tensor], ids: torch.Tensor,
                        sums: dict | None = None) -> list[torch.Tensor]:
        """sum over `ids` of clipped per-sample gradients at `params`, / nominal b, in float64
        (`sums`: that sum, already computed at `params`)."""
        named = dict(zip(self.names, params))
        if sums is None:
            sums = self._batch_sums64(named, ids)
        terms = plan_for(self.model, named).longest_sum
        if terms > MAX_SUM_TERMS:
            raise ValueError(f"a float64 sum added {terms} terms, more than the {MAX_SUM_TERMS} the rounding margin "
                             "assumes (pcmu/margin.py): use a smaller chunk or batch")
        return [sums[k] / self.batch_size for k in self.names]

    def _batch_sums64(self, named: dict, ids: torch.Tensor) -> dict:
        """sum over `ids` of clipped per-sample gradients at `named` (name -> tensor), float64 (the
        one place a step's sums are computed; distributed PCMU splits it across ranks)."""
        x, y = self.batch(ids)
        refuse_training_batch_norm(self.model, "PCMU", PER_SAMPLE_NEED)  # also after a later model.train()
        with eval_mode(self.model):
            return clipped_sum64(self.model, self.loss_fn, x, y, self.clip_norm, named, self.chunk, out=self._sums)

    def _gradient_mean(self, params: list[torch.Tensor], ids: torch.Tensor, sums: dict | None = None):
        return [g.to(torch.float32) for g in self._clipped_mean64(params, ids, sums)]

    def _quantize(self, t: int, params, ids, count_below: float, sums: dict | None = None):
        if self.framework == "D":
            from .framework_d import data_smoothed_quantize
            return data_smoothed_quantize(self, params, ids, t, count_below)
        v = self._gradient_mean(params, ids, sums)
        return v, smooth_quantize(v, tau=self.tau, sigma=self.sigma, mode=self.mode, n0=self.n0, n=self.n,
                                  alpha=self.alpha, seed=self.seed, offset=self.offset_of(t),
                                  count_below=count_below)

    def _compute_step(self, t: int, step_size: float | None = None, sums: dict | None = None) -> PCMUStep:
        """Step t on its batch `_next_batch(t)` (the only batch a recorded step may train on: records
        keep no ids, batch_ids derives them)."""
        ids = self._next_batch(t)
        step_size = float(self._lr(t) if step_size is None else step_size)
        nothing = FragileSet.empty(self.coordinates, self.fragile_threshold)
        if ids.numel() == 0:  # an emptied batch makes no update (and consumes no data)
            return PCMUStep(t, step_size, self.offset_of(t), False, float("inf"), nothing,
                            torch.empty(0, dtype=torch.uint8))
        with torch.no_grad():
            v, result = self._quantize(t, self.params, ids, self.fragile_threshold, sums)
            apply_codes_(self.params, result.codes, step_size)
            if self.framework == "G":  # analytic radii are | |v| - beta |: recomputed, not stored
                fragile = FragileSet.record(v, result.radii, self.fragile_threshold, layout=self.fragile_layout,
                                            beta=self.beta if self.mode == "analytic" else None)
            else:  # input-space radii: nothing to record for removal checks
                fragile = nothing
        return PCMUStep(t, step_size, self.offset_of(t), True, result.min_radius, fragile,
                        pack_codes(result.codes))

    # ---- record bytes ------------------------------------------------------------------------------

    def record_bytes(self) -> dict:
        """Bytes the step records hold now (records.record_bytes): totals of codes and fragile sets,
        per step, and how many steps used each layout."""
        return record_bytes(self.records)

    def estimate_record_bytes(self, *, epochs: int | None = None, steps: int | None = None,
                              fragile_fraction: float | None = None) -> dict:
        """Bytes the records of `steps` (or `epochs`) steps will need. fragile_fraction: the share of
        coordinates fragile per step; default: what the steps recorded so far showed, or 1.0 (the
        worst case) before training."""
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs= or steps=")
        count = steps if steps is not None else epochs * self.schedule.batches_per_epoch
        if fragile_fraction is None:
            applied = int(self._applied[:self._steps].sum())
            fragile = sum(r.fragile.count for r in self.records if r.applied)  # one record at a time
            fragile_fraction = fragile / (applied * self.coordinates) if applied and self.coordinates else 1.0
        return estimate_record_bytes(self.coordinates, count, mode=self.mode,
                                     fragile_fraction=fragile_fraction)

    # ---- certificates ---------------------------------------------------------------------------------

    def certificate(self) -> AprioriCertificate:
        d, unit, margin = self.coordinates, self.unit, self.rounding_margin
        bounds = [m * unit + margin for m in range(self.max_request + 1)]
        below = [0] * (self.max_request + 1)
        for r in self.records:  # one record at a time (a history store reads each from its file)
            if r.applied:
                below = [a + b for a, b in zip(below, r.fragile.count_below(bounds))]
        applied = self._applied[:self._steps]
        radii = self._min_radius[:self._steps][applied].tolist()
        pairs = max(len(radii) * d, 1)
        return AprioriCertificate(
            mode=self.mode if self.framework == "G" else "D", clip_norm=self.clip_norm,
            batch_size=self.batch_size, tau=self.tau, sigma=self.sigma, alpha=self.alpha,
            rounding_margin=margin, steps=len(radii), coordinates=d,
            min_radius_per_step=radii if self.framework == "G" else [0.0],
            max_request=self.max_request, coverage=[1.0 - c / pairs for c in below], below_counts=below,
            forgotten_per_batch_max=int(self._forgotten_count[:self._steps][applied].max()) if radii else 0)

    def replay(self, t: int, start=None) -> list[torch.Tensor]:
        """w_t rebuilt bit for bit from the initial weights (in a history store: the last weights it
        stored at or before t) and the recorded codes. `start` = (s, w_s) continues from an already
        rebuilt w_s (s <= t) instead."""
        if start is None:
            start = (0, self.initial) if self.history is None or t == 0 else self.records.keyframe(t)
        s, w = start[0], [p.clone() for p in start[1]]
        with torch.no_grad():
            for i in range(s, t):  # one record at a time (a history store reads each from its file)
                r = self.records[i]
                if r.applied:
                    apply_codes_(w, unpack_codes(r.codes, self.shapes), r.step_size)
        return w

    def check_request(self, removed) -> RequestCheck:
        """Would training without `removed` and every id forgotten so far give the same codes?
        (request_check.py)"""
        return check_request(self, removed)

    def remaining_budget(self) -> int:
        """certificate().remaining_budget from the a-priori index (what a request reports)."""
        index = self.apriori_index()
        if not index.applied:
            return 0
        return max(budget_m_star([index.min_radius], self.unit, self.rounding_margin) - index.max_held, 0)

    # ---- the fallback and persistence (each in its own module) --------------------------------------

    def resume_without(self, removed, t0: int) -> None:
        """Retrains steps t0.. without `removed` from the replayed w_t0 (fallback.py)."""
        resume_without(self, removed, t0)

    def fingerprint(self) -> dict:
        """What must match for saved state to belong to this trainer (persistence.py)."""
        return fingerprint(self)

    def state_dict(self, *, records: bool = True) -> dict:
        """The trainer's state by name, its fingerprint and (records=True) its records (persistence.py)."""
        return state_dict(self, records=records)

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict, refusing another configuration (persistence.py)."""
        load_state_dict(self, state)

    def close(self) -> None:
        """Closes the history store the records go to (releasing its writer's lock), if any."""
        if self.history is not None:
            self.history.close()


def _step_size_given_per_step(t: int) -> float:
    raise RuntimeError("this PCMU run takes its step size from the wrapped optimizer's lr at each step: train "
                       "through PCMUOptimizer.step(), not PCMUTrainer.train()")


# What PCMU's refusal of BatchNorm in training mode says it needs.
PER_SAMPLE_NEED = "per-sample clipped gradients"


def apply_codes_(params: list[torch.Tensor], codes: list[torch.Tensor], step_size: float) -> None:
    """params <- params - step_size * codes with the fused step's own update (the apply_codes_ op),
    so replays round exactly like the original step."""
    as_int8 = [c.to(device=p.device, dtype=torch.int8) for p, c in zip(params, codes)]
    with torch.no_grad():
        _ops.apply_codes_(list(params), as_int8, float(step_size))
