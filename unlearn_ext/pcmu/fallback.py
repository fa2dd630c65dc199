"""PCMU's fallback (docs/design.md §4): when a request is not certified at step t0, training
resumes without the ids from the replayed w_t0 -- every earlier step keeps its codes, so this is
exactly what PCMU training from scratch without them gives (coupled retraining)."""
from __future__ import annotations

import torch

from ..data import as_ids


def resume_without(trainer, removed, t0: int) -> None:
    """Retrains steps t0.. without `removed` from the replayed w_t0 (exactly what retraining from
    scratch without them gives when steps < t0 are certified), replacing their records. Each
    step keeps its recorded step size (the lr schedule does not depend on the data; a run whose
    lr came from the user's optimizer has no other record of it)."""
    removed = as_ids(removed, "removed").unique()
    end = trainer.steps_done
    w = trainer.replay(t0)
    with torch.no_grad():
        for p, src in zip(trainer.params, w):
            p.copy_(src)
    step_sizes = trainer._step_size[t0:end].tolist()
    # Dropping the records first excludes every forgotten id from step t0 on (the steps recomputed
    # below skip them all), and adding the removed ids then recounts only the steps kept.
    trainer._drop_records_from(t0)
    trainer.forgotten = torch.cat([trainer.forgotten, removed]).unique()
    for t, step_size in zip(range(t0, end), step_sizes):
        trainer._add_record(trainer._compute_step(t, step_size))
