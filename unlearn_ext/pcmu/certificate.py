"""What PCMU certifies, as plain data: the a-priori certificate of a training run and the answer
to one deletion request. Both are JSON-serializable (`to_dict`) and print a short summary (`str`).

The a-priori certificate (docs/design.md §4): removing k samples from a batch moves the clipped,
nominal-b-normalized gradient sum by at most k*C/b in every coordinate. A step whose smallest
certified radius exceeds k*C/b (plus a rounding margin) therefore produces the same codes without
those samples. The strict budget m* is the largest m for which that holds at every step: any
request of at most m* ids is certified at once, with no computation.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from .apriori_index import step_budgets


@dataclass
class AprioriCertificate:
    mode: str                 # 'analytic' (exact radii) or 'mc' (radii hold w.p. 1 - alpha each)
    clip_norm: float          # C
    batch_size: int           # nominal b
    tau: float
    sigma: float
    alpha: float
    rounding_margin: float    # added to k*C/b before comparing with a radius
    steps: int                # steps that made an update
    coordinates: int          # d
    min_radius_per_step: list = field(default_factory=list)
    max_request: int = 0      # M: the largest request the per-request check handles
    # coverage[m] = fraction of (step, coordinate) pairs with radius > m*C/b + margin, m = 0..M
    coverage: list = field(default_factory=list)
    below_counts: list = field(default_factory=list)  # pairs at or below that bound, m = 0..M
    # The most ids already forgotten from one recorded batch by certified deletions (their
    # gradients are still inside the record, so they use up that batch's budget).
    forgotten_per_batch_max: int = 0

    @property
    def unit(self) -> float:
        """C/b: how far one removal can move a coordinate."""
        return self.clip_norm / self.batch_size

    @property
    def budget(self) -> int:
        """m*: the largest m with m*C/b + margin < every step's smallest radius (0 if none)."""
        return budget_m_star(self.min_radius_per_step, self.unit, self.rounding_margin)

    @property
    def remaining_budget(self) -> int:
        """How many more ids any request may hold and still be certified a priori: m* bounds the
        total removed from any one batch over all requests, not each request."""
        return max(self.budget - self.forgotten_per_batch_max, 0)

    @property
    def min_radius(self) -> float:
        return min(self.min_radius_per_step) if self.min_radius_per_step else math.inf

    def to_dict(self) -> dict:
        out = asdict(self)
        out["budget_m_star"] = self.budget
        out["remaining_budget"] = self.remaining_budget
        out["unit_C_over_b"] = self.unit
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=float)

    @classmethod
    def from_dict(cls, data: dict) -> "AprioriCertificate":
        """Inverse of to_dict (the derived entries it adds are recomputed, not read)."""
        derived = ("budget_m_star", "unit_C_over_b", "remaining_budget")
        return cls(**{k: v for k, v in data.items() if k not in derived})

    def __str__(self) -> str:
        prob = " (each radius holds with probability 1 - alpha)" if self.mode == "mc" else ""
        cov = ", ".join(f"m={m}: {c:.4f}" for m, c in enumerate(self.coverage[:6]))
        return (f"PCMU a-priori certificate [{self.mode}, C={self.clip_norm:g}, b={self.batch_size}, "
                f"tau={self.tau:g}, sigma={self.sigma:g}]: {self.steps} steps x {self.coordinates} "
                f"coordinates; smallest radius {self.min_radius:.4g} vs one removal = C/b = {self.unit:.4g}"
                f" -> any {self.budget} ids can be forgotten with no work (m* = {self.budget}, over all "
                f"requests; {self.remaining_budget} left){prob}. "
                f"Coverage (pairs that would keep their code): {cov}.")


def budget_m_star(min_radius_per_step, unit: float, margin: float) -> int:
    """m*: the largest m with m*unit + margin < every given radius (0 if none)."""
    if len(min_radius_per_step) == 0:
        return 0
    # The per-step test's own search (apriori_index.step_budgets) at the smallest radius; at least 0,
    # and an unbounded radius reported as the largest int32.
    r = min(float(radius) for radius in min_radius_per_step)
    m = int(step_budgets(torch.tensor([r], dtype=torch.float64), unit, margin)[0])
    return min(max(m, 0), 2**31 - 1)


@dataclass
class RequestCheck:
    """The per-request check of a set of removed ids against the recorded trajectory.

    status: 'exact'        no code changes at any step: retraining without the ids gives
                           bit-identical parameters (analytic mode), or the same codes with
                           probability >= 1 - alpha per checked coordinate (mc mode, 'probable').
            'diverges'     a code provably flips at step `first_divergent_step`.
            'undecided'    mc mode: a coordinate moves by more than its Monte-Carlo radius allows
                           (analytic mode settles near-ties by recomputing the step as retraining
                           would, so it answers 'exact' or 'diverges').
            'over_budget'  a step holds more removed ids than the recorded fragile sets cover.
            'uncertifiable' the mode cannot certify this step (framework D, mc with an emptied batch).
    Steps before `first_divergent_step` are certified identical, so resuming training without the
    ids from that step reproduces retraining exactly.
    """
    status: str
    first_divergent_step: int | None
    reason: str
    steps_with_removed_ids: int = 0
    steps_checked_a_priori: int = 0
    steps_checked_exactly: int = 0
    sample_gradients: int = 0
    flipped_coordinates: int = 0
    seconds: float = 0.0
    # Not part of the answer (left out of to_dict): (ids, steps recorded, steps, counts) when the
    # check found which recorded steps hold the request's new `ids` (schedule.step_counts over
    # steps 0..steps recorded - 1), so that forgetting them after a certificate counts them in
    # without asking the schedule again (PCMUTrainer.set_forgotten).
    holding: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def certified(self) -> bool:
        return self.status in ("exact", "probable")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "holding"}

    def __str__(self) -> str:
        where = "" if self.first_divergent_step is None else f" at step {self.first_divergent_step}"
        return (f"{self.status}{where}: {self.reason} ({self.steps_with_removed_ids} steps held removed "
                f"ids; {self.steps_checked_a_priori} cleared by radius, {self.steps_checked_exactly} by "
                f"exact re-quantization; {self.sample_gradients} sample gradients, {self.seconds:.3f} s)")
