"""PCMU as an `Unlearner`: prompt deletion from what certified training recorded (docs/design.md §4).

A request is answered, in order, by:
  1. the a-priori budget: every affected step's smallest radius beats k*C/b (k = ids removed from
     that batch, counting ids forgotten before) -> certified at once, no computation;
  2. the per-request check (PCMUTrainer.check_request): no code changes at any step -> certified
     exact, with evidence;
  3. the fallback: training resumes without the ids from the first step that is not certified,
     which gives exactly the retrained model (coupled retraining: PCMU training without the ids).
The route and the reason are in the report. Use it through `DeletionLedger` for durability.
"""
from __future__ import annotations

import torch

from ..policy import eval_mode_note
from ..unlearner import Unlearner, UnlearnReport
from .trainer import PCMUTrainer


class PCMUUnlearner(Unlearner):
    method = "pcmu"

    def __init__(self, trainer: PCMUTrainer):
        super().__init__(trainer.data)
        self.trainer, self.model = trainer, trainer.model

    # The trainer's `forgotten` is the one source of truth: it decides which ids training skips.
    @property
    def forgotten(self) -> torch.Tensor:
        return self.trainer.forgotten

    def _set_forgotten(self, ids: torch.Tensor) -> None:
        self.trainer.forgotten = ids.unique()

    def _forget(self, new: torch.Tensor, report: UnlearnReport) -> None:
        trainer = self.trainer
        union = torch.cat([trainer.forgotten, new]).unique()
        check = trainer.check_request(new)  # the ids forgotten so far are included by the check
        report.details = {"check": check.to_dict(), "first_divergent_step": check.first_divergent_step,
                          "steps_retrained": 0}
        note = eval_mode_note(self.model, "PCMU's per-sample clipped gradients (training, checks, resume)")
        if note:
            report.details["stochastic_layers"] = note
        report.sample_gradients = check.sample_gradients
        if check.certified:
            trainer.set_forgotten(union, holding=check.holding)  # the steps holding `new`, found once
            report.status = "certified"
            report.how = "a-priori (m*)" if check.steps_checked_exactly == 0 else "per-request check"
            report.reason = check.reason
            report.details["remaining_budget"] = trainer.remaining_budget()
            return
        t0, end = check.first_divergent_step, trainer.steps_done
        trainer.resume_without(new, t0)  # also adds `new` to trainer.forgotten
        report.status, report.how, report.weights_changed = "retrained", f"resumed from step {t0}", True
        report.details["steps_retrained"] = end - t0
        report.sample_gradients += trainer.training_cost(union, start=t0)
        report.details["remaining_budget"] = trainer.remaining_budget()
        report.reason = (f"not certified at step {t0} ({check.status}: {check.reason}); training resumed "
                         f"without the ids from step {t0} of {end}, which equals retraining from scratch")

    def retrain_cost(self, forgotten) -> int:
        # PCMU's reference is its own coupled retraining, over the steps trained (which may stop
        # mid-epoch): counted on the schedule.
        return self.trainer.training_cost(forgotten)

    def fingerprint(self) -> dict:
        return self.trainer.fingerprint()

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def logs(self) -> dict:
        # Records in a history store are committed by reference (persistence.state_dict's "history").
        return {} if self.trainer.history is not None else {"records": self.trainer.records}

    def state_dict_without_logs(self) -> dict:
        return self.trainer.state_dict(records=False)

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)
