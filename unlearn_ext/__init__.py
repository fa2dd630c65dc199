"""unlearn_ext: fused kernels and methods for machine unlearning in PyTorch.

Start with `PCMUTrainer` (certified training with smoothed, quantized gradients) and
`PromptDeleter` (deletion requests answered from the training record, with a ledger);
`backend()` tells whether the compiled kernels or the pure-PyTorch reference serve the ops.
"""
from ._ops import backend, compiled, cuda_built  # noqa: F401
from .smoothing import (  # noqa: F401
    QuantizeResult,
    SmoothedQuantizer,
    StepStats,
    analytic_threshold,
    philox_bernoulli,
    philox_bits,
    philox_uniform,
    radius_table,
    smooth_quantize,
    smooth_quantize_step_,
    vote_accumulate_,
    vote_finalize,
    VoteCounter,
)
from .batching import BatchSchedule  # noqa: F401,E402
from .certificate import AprioriCertificate, RequestCheck  # noqa: F401,E402
from .ledger import DeletionAnswer, PromptDeleter, UnknownIdsError  # noqa: F401,E402
from .pcmu import PCMUTrainer  # noqa: F401,E402
from .history import FieldSpec, HistoryStore, StepRecord  # noqa: F401
from .history_file import HistoryCorruptError, HistoryFormatError  # noqa: F401
from .history_recorder import HistoryRecorder, estimate_bytes  # noqa: F401

__version__ = "0.1.0"


def build_info() -> dict:
    """What was compiled: backend, CUDA, CPU vector ISA and flags."""
    from . import _ops

    info = {"backend": backend(), "torch": __import__("torch").__version__}
    if _ops._C is not None:
        info.update(cuda=_ops._C.built_with_cuda(), cpu_isa=_ops._C.cpu_vector_isa(),
                    cpu_flags=_ops._C.cpu_flags())
    return info
