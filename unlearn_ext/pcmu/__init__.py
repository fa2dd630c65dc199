"""PCMU, prompt certified machine unlearning (docs/design.md §4, our formulation): smoothed ternary
quantization (smoothing.py), the certified trainer and its per-request check (trainer.py), step
records (records.py), certificates (certificate.py), framework D (framework_d.py), and the
`Unlearner` that answers deletion requests (unlearner.py)."""
from .certificate import AprioriCertificate, RequestCheck  # noqa: F401
from .smoothing import (  # noqa: F401
    QuantizeResult,
    SmoothedQuantizer,
    SmoothingStats,
    StepStats,
    VoteCounter,
    analytic_threshold,
    check_smoothing_config,
    radius_table,
    smooth_quantize,
    smooth_quantize_step_,
    vote_accumulate_,
    vote_finalize,
)
from .records import FragileSet, estimate_record_bytes  # noqa: F401
from .trainer import PCMUTrainer  # noqa: F401
from .unlearner import PCMUUnlearner  # noqa: F401
