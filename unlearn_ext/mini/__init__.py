"""History-based unlearning (docs/design.md §6): Mini-Unlearning (our formulation: the linear
response of SGD, from K anchors) and the DeltaGrad baseline (every step replayed).

Modules: record (training side: anchors, per-step history, the SGD settings check), vectors (flat
parameter vector, batched gradients), curvature (HVPs, Lanczos, Ritz pairs), budget (how many samples
and Lanczos steps a request may spend), propagate (spectral propagation per segment; with momentum,
of the weights' and the buffer's gaps together), resume (exact fallback), unlearner
(MiniUnlearner), deltagrad (DeltaGradUnlearner)."""
from .deltagrad import DeltaGradUnlearner, lbfgs_product  # noqa: F401
from .record import (  # noqa: F401
    FULL_GRAD, MiniRecorder, SGDSettings, StepRecorder, UnsupportedOptimizerError, anchor_epochs,
    check_replayable_sgd, mini_store, step_store, train_recording_anchors, train_recording_steps,
)
from .unlearner import MiniUnlearner  # noqa: F401
