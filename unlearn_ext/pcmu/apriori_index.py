"""Running totals of a PCMU trainer's per-step arrays, so that a request certified a priori, the
remaining budget and the bookkeeping of a certified deletion cost the same at any history length.

A step t passes the a-priori test for k removed ids when k*C/b + margin < its smallest radius r_t
(request_check.py). Every k that passes is at most m_t, the largest m for which m*C/b + margin < r_t
in the same float64 arithmetic (-1 when not even m = 0 does; the test is monotone in k), so
"step t passes with k" is "k <= m_t". With f_t the forgotten ids step t's recorded batch holds, the
index keeps, over the applied steps:

    slack       min of m_t - f_t: a request of k more ids in every batch passes iff k <= slack
    slack_held  min of m_t - f_t over the steps holding a forgotten id (>= 0: they all pass)
    applied     how many there are;  held: how many hold a forgotten id
    max_held    the most forgotten ids in one of them (0 if none)
    min_radius  the smallest r_t

It is built from the arrays (O(T), vectorized) on first use after the records or the per-step
counts changed in any other way than a certified deletion's additions, which update it in place
(`added_everywhere`, `added_at`): training, a resume, a rollback and loading state invalidate it.
"""
from __future__ import annotations

import math

import torch

# m_t of a step whose radius is infinite: above any request, and exact in float64.
UNBOUNDED = 2**53


def step_budgets(radius: torch.Tensor, unit: float, margin: float) -> torch.Tensor:
    """int64 m_t per radius: the largest m >= 0 with m*unit + margin < radius in float64, exactly as
    the per-step test computes it, or -1 if none (also for a NaN radius)."""
    estimate = torch.nan_to_num(((radius - margin) / unit).floor(), nan=-1.0, posinf=UNBOUNDED, neginf=-1.0)
    m = estimate.clamp(-1, UNBOUNDED).to(torch.int64)

    def passes(k: torch.Tensor) -> torch.Tensor:  # the a-priori test itself (request_check.py)
        return k.to(torch.float64) * unit + margin < radius
    # The estimate is off by rounding only, so each loop runs once or twice.
    while bool((down := (m >= 0) & ~passes(m)).any()):
        m[down] -= 1
    while bool((up := (m < UNBOUNDED) & passes(m + 1)).any()):
        m[up] += 1
    return m


class AprioriIndex:
    def __init__(self):
        self.valid = False

    def invalidate(self) -> None:
        self.valid = False

    def rebuild(self, trainer) -> None:
        steps = trainer._steps
        applied = trainer._applied[:steps]
        radius, forgotten = trainer._min_radius[:steps], trainer._forgotten_count[:steps]
        self.budgets = step_budgets(radius, trainer.unit, trainer.rounding_margin)
        # Over the applied steps only; torch.where rather than masked selection (no copies).
        slack = torch.where(applied, self.budgets - forgotten, UNBOUNDED + 1)
        held = applied & (forgotten > 0)
        self.applied, self.held = int(applied.sum()), int(held.sum())
        self.slack = int(slack.min()) if self.applied else math.inf
        self.slack_held = int(torch.where(held, slack, UNBOUNDED + 1).min()) if self.held else math.inf
        self.max_held = int(torch.where(applied, forgotten, 0).max()) if self.applied else 0
        self.min_radius = float(torch.where(applied, radius, math.inf).min()) if self.applied else math.inf
        self.valid = True

    def added_everywhere(self, count: int) -> None:
        """Every recorded step's count grew by `count` > 0 (a full-batch schedule)."""
        if not self.valid or not self.applied:
            return
        self.slack -= count
        self.slack_held, self.held = self.slack, self.applied
        self.max_held += count

    def added_at(self, trainer, steps: torch.Tensor, counts: torch.Tensor) -> None:
        """The counts at `steps` (distinct) grew by `counts` (> 0); the trainer's array holds the new ones."""
        if not self.valid:
            return
        applied = trainer._applied[steps]
        steps, counts = steps[applied], counts[applied]
        if not steps.numel():
            return
        forgotten = trainer._forgotten_count[steps]
        least = int((self.budgets[steps] - forgotten).min())
        self.held += int((forgotten == counts).sum())  # held none before
        self.slack, self.slack_held = min(self.slack, least), min(self.slack_held, least)
        self.max_held = max(self.max_held, int(forgotten.max()))
