"""unlearn_ext: fused kernels and methods for machine unlearning in PyTorch.

Layout (README "Where things are"): shared pieces at the top — `ops` (raw op wrappers, fakes,
backend choice), `rng` (the RNG contract), `data` (TrainingData, BatchSchedule, retrain),
`loading` (the user's Dataset, the schedule's batch sampler, seeded augmentation), `recipe` (the
user's optimizer, schedule and loss, which retraining repeats), `engine` (wrapping the user's model,
optimizer and data), `policy` (layers and losses every method accepts),
`unlearner` (the Unlearner interface and its report), `ledger` (deletion ledger for any
Unlearner), `durable` (crash-safe writes); one subpackage per method family (`pcmu`, `history`, `mini`);
`reference` is the pure-PyTorch truth of every op.
"""
from .ops import backend, compiled, cuda_built
from .rng import philox_bernoulli, philox_bits, philox_uniform
from .pcmu import (
    AprioriCertificate,
    PCMUTrainer,
    PCMUUnlearner,
    QuantizeResult,
    RequestCheck,
    SmoothedQuantizer,
    SmoothingStats,
    StepStats,
    VoteCounter,
    analytic_threshold,
    radius_table,
    smooth_quantize,
    smooth_quantize_step_,
    vote_accumulate_,
    vote_finalize,
)
from .data import BatchSchedule, SGDConfig, TrainingData, retrain, retrain_cost, train_sgd
from .baselines import FinetuneUnlearner, RetrainUnlearner
from .engine import UnlearningEngine
from .loading import SeededDataset
from .metrics import accuracy, distance_ratio
from .mia import loss_auc
from .policy import UnsupportedModelError
from .recipe import OptimizerRecipe
from .ledger import DeletionLedger, LedgerCorruptError, LedgerInUseError
from .unlearner import Unlearner, UnknownIdsError, UnlearnReport
from .history import (
    FieldSpec,
    HistoryConflictError,
    HistoryCorruptError,
    HistoryFormatError,
    HistoryLockedError,
    HistoryRecorder,
    HistoryStore,
    StoredStep,
    estimate_bytes,
)
from .mini import (
    DeltaGradUnlearner,
    MiniRecorder,
    MiniUnlearner,
    StepRecorder,
    UnsupportedOptimizerError,
    anchor_epochs,
    mini_store,
    step_store,
    train_recording_anchors,
    train_recording_steps,
)
from .perturb import RandomKUnlearner, TopKUnlearner
from .selection import Selection, bernoulli, random_k, topk, topk_per_tensor

__version__ = "0.1.0"

__all__ = [
    # backend
    "backend", "compiled", "cuda_built", "build_info",
    # RNG contract
    "philox_bits", "philox_uniform", "philox_bernoulli",
    # PCMU
    "PCMUTrainer", "PCMUUnlearner", "AprioriCertificate", "RequestCheck", "SmoothedQuantizer", "QuantizeResult",
    "SmoothingStats", "StepStats", "VoteCounter", "analytic_threshold", "radius_table",
    "smooth_quantize", "smooth_quantize_step_", "vote_accumulate_", "vote_finalize",
    # shared: training data, retraining, the Unlearner interface, the ledger
    "TrainingData", "BatchSchedule", "SGDConfig", "train_sgd", "retrain", "retrain_cost",
    "Unlearner", "UnlearnReport", "UnknownIdsError", "RetrainUnlearner", "FinetuneUnlearner", "DeletionLedger",
    "LedgerInUseError", "LedgerCorruptError",
    # the user's own loop: wrap model, optimizer and data; the recipe retraining repeats
    "UnlearningEngine", "OptimizerRecipe", "SeededDataset", "UnsupportedModelError",
    # judging a result
    "accuracy", "distance_ratio", "loss_auc",
    # history store
    "FieldSpec", "HistoryStore", "StoredStep", "HistoryRecorder", "estimate_bytes",
    "HistoryCorruptError", "HistoryFormatError", "HistoryLockedError", "HistoryConflictError",
    # history methods (docs/design.md §6)
    "MiniUnlearner", "DeltaGradUnlearner", "MiniRecorder", "StepRecorder", "UnsupportedOptimizerError",
    "anchor_epochs", "mini_store", "step_store", "train_recording_anchors", "train_recording_steps",
    # selection and perturbation methods (docs/design.md §7)
    "Selection", "topk", "topk_per_tensor", "random_k", "bernoulli", "TopKUnlearner", "RandomKUnlearner",
]


def build_info() -> dict:
    """What was compiled: backend, CUDA, the CPU kernels' vector paths and flags.

    `cpu_isa` is the path CPU kernels take now (the widest in `cpu_isas`, or the one the environment
    variable UNLEARN_EXT_CPU_ISA names); `cpu_isas` the paths this CPU and build can run."""
    from .ops.loader import _C

    info = {"backend": backend(), "torch": __import__("torch").__version__}
    if _C is not None:
        info.update(cuda=_C.built_with_cuda(), cpu_isa=_C.cpu_isa(), cpu_isas=list(_C.cpu_isas()),
                    cpu_flags=_C.cpu_flags())
    return info
