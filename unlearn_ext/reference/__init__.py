"""Pure-PyTorch reference of every unlearn_ext op: the truth the kernels are tested against, and
the fallback when the compiled extension is missing."""
from .fragile import fragile_compact  # noqa: F401
from .rng import philox_bernoulli, philox_bits, philox_uniform, philox_words, philox4x32_10  # noqa: F401
from .smoothing import (  # noqa: F401
    apply_codes_,
    quantize_analytic,
    quantize_mc,
    quantized_step_analytic_,
    quantized_step_mc_,
    vote_accumulate_,
    vote_finalize,
)
from .codecs import (  # noqa: F401
    blockwise_dequantize_,
    blockwise_quantize,
    delta_encode_,
    dequantize_axpy_,
    dequantize_dot,
)
from .select import (  # noqa: F401
    select_apply_,
    select_apply_bin_,
    select_histogram,
    select_histogram_near,
    select_mask_grad_,
    select_tie_boundary,
)
from .replay import deltagrad_qn_run_, deltagrad_qn_step_, layer_chain_grad_sums_  # noqa: F401
