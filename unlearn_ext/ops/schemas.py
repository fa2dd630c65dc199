"""Every operator schema of unlearn_ext, declared once. ops/registry.py defines them with
torch.library whether or not the compiled extension is built; the C++ files only register kernels
(TORCH_LIBRARY_IMPL) for the CPU and CUDA keys, which override the pure-PyTorch reference
registered as every op's default kernel.

Conventions: lists of tensors are one long vector (global element index = offset of the tensor in
the list + index inside it); `seed` and `offset` are the RNG contract's key and block offset, read as
unsigned 64-bit; statistics come back as (min_radius: float32 scalar,
counts: int64[3] = [abstained, nonfinite, radius_below_count_below]).
"""

# The largest `draws` the raw philox_* ops take per element index (2^16 words: 256 KiB of int32 or
# 512 KiB of float64 per element). More draws for one element come from further calls at
# offset + ceil(draws / 4) (rng.call_offset), so the bound limits a call's size, not the stream.
MAX_DRAWS = 1 << 16

SCHEMAS = (
    # RNG contract (docs/design.md §3): draws `draws` words per element index.
    "philox_bits(Tensor element_index, int draws, int seed, int offset) -> Tensor",
    "philox_uniform(Tensor element_index, int draws, int seed, int offset) -> Tensor",
    "philox_bernoulli(Tensor element_index, int draws, float p, int seed, int offset) -> Tensor",

    # Smoothed ternary quantization (docs/design.md §4, framework G).
    "quantize_analytic(Tensor[] grads, float beta, float count_below) -> "
    "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",
    "quantize_mc(Tensor[] grads, float tau, float sigma, int n0, int n, Tensor radius_table, "
    "int seed, int offset, float count_below) -> "
    "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",
    # Fused step: params <- params - step_size * code, statistics reduced in the same pass. With
    # check_finite, a gradient holding NaN/Inf leaves every parameter untouched and counts[1] > 0.
    "quantized_step_analytic_(Tensor(a!)[] params, Tensor[] grads, float beta, float step_size, "
    "float count_below, bool check_finite) -> (Tensor min_radius, Tensor counts)",
    "quantized_step_mc_(Tensor(a!)[] params, Tensor[] grads, float tau, float sigma, int n0, int n, "
    "Tensor radius_table, int seed, int offset, float step_size, float count_below, "
    "bool check_finite) -> (Tensor min_radius, Tensor counts)",

    # params <- params - step_size * code from stored int8 codes in {-1, 0, 1} shaped like params:
    # the update of the fused steps above (fp32 math, one rounding), for replays.
    "apply_codes_(Tensor(a!)[] params, Tensor[] codes, float step_size) -> ()",

    # Data smoothing (framework D): per-coordinate vote counters of shape (2, *grad.shape).
    "vote_accumulate_(Tensor(a!)[] votes, Tensor[] grads, float tau) -> Tensor nonfinite",
    "vote_finalize(Tensor[] selection_votes, Tensor[] estimation_votes, int n0, int n, "
    "Tensor radius_table, float sigma, float count_below) -> "
    "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",

    # Per-request certificates (docs/design.md §4): the fragile coordinates of one step, compacted in
    # global-index order: every element whose radius < threshold (a NaN radius counts as fragile),
    # with its value (as float32) and its radius. One pass to count per chunk, one to write.
    "fragile_compact(Tensor[] values, Tensor[] radii, float threshold) -> "
    "(Tensor index, Tensor value, Tensor radius)",
    # ---- Compressed history codecs (docs/design.md §5) ----------------------------------------------
    # Blockwise absmax quantization, blocks per tensor (a tensor's last block may be short), block
    # size even in [64, 4096]; math in unlearn/codecs.h. Per input tensor: codes are flat, int8
    # (bits = 8, numel entries) or uint8 with two int4 codes per byte (bits = 4, ceil(numel / 2)
    # entries, low nibble first); scales are flat float32, one per block (scale = absmax / 127 or / 7).
    # levels picks the level set: "linear" (the above), "normal" (bits = 4: 16 normal-quantile levels,
    # unsigned nibble indices, scale = the block's signed absmax) or "companded" (bits = 8: levels
    # k (127 + 3 |k|), scale = absmax / 64516); each op of a codes/scales pair must get the same one.
    "blockwise_quantize(Tensor[] x, int bits, int block_size, str levels=\"linear\") -> (Tensor[] codes, Tensor[] scales)",
    # out <- deq(codes, scales); out gives the shapes and the dtype (fp32/fp16/bf16).
    "blockwise_dequantize_(Tensor(a!)[] out, Tensor[] codes, Tensor[] scales, int bits, int block_size, "
    "str levels=\"linear\") -> ()",
    # Closed-loop delta: codes, scales <- quantize(target - recon); recon (float32) += deq(codes, scales).
    # codes and scales are preallocated outputs (sized as blockwise_quantize returns them): a
    # mutable op returning fresh tensor lists cannot be functionalized (torch.compile, opcheck).
    "delta_encode_(Tensor[] target, Tensor(a!)[] recon, Tensor(b!)[] codes, Tensor(c!)[] scales, int bits, "
    "int block_size, str levels=\"linear\") -> ()",
    # y <- y + alpha * deq(codes, scales) (fp32 math, rounded like recon updates: bit-exact decode).
    "dequantize_axpy_(Tensor(a!)[] y, float alpha, Tensor[] codes, Tensor[] scales, int bits, "
    "int block_size, str levels=\"linear\") -> ()",
    # <deq(codes, scales), v> over the whole list, as a float64 scalar.
    "dequantize_dot(Tensor[] codes, Tensor[] scales, Tensor[] v, int bits, int block_size, "
    "str levels=\"linear\") -> Tensor",

    # ---- Selection: Top-K / Random-k (docs/design.md §7, our formulation; math in unlearn/select.h) ----
    # key_mode: 0 the score as given, 1 |score|, 2 random (Philox word of the global index at (seed,
    # offset); scores then only give shapes). `base` is the global index of the list's first element
    # (0 for a whole list; a shard's start in distributed selection). An element is selected iff
    # key > threshold or (key == threshold and global index < boundary).
    # Histogram of one radix digit: keys whose top prefix_bits bits equal prefix, counted by their
    # next digit_bits bits; int64[2^digit_bits + 1], the last entry counts NaN scores (any prefix).
    # Shards' histograms add up to the whole list's (the distributed selection's all-reduce).
    "select_histogram(Tensor[] scores, int key_mode, int seed, int offset, int base, int prefix, "
    "int prefix_bits, int digit_bits) -> Tensor",
    # The tie boundary: the global index b such that exactly `needed` elements with key == `key` lie
    # below b (base if needed = 0; base + numel if fewer ties exist). int64 scalar.
    "select_tie_boundary(Tensor[] scores, int key_mode, int seed, int offset, int base, int key, "
    "int needed) -> Tensor",
    # Fused apply: perturbs the selected coordinates of params in place (action 0 set to source / 0,
    # 1 scale by alpha, 2 add alpha * N(0,1) from (noise_seed, noise_offset), 3 add alpha * source),
    # writes masks when given (bool, shaped like params), returns how many were selected (int64).
    # In random mode scores may be empty (params give the shapes).
    "select_apply_(Tensor(a!)[] params, Tensor[] scores, Tensor[] source, Tensor(b!)[] masks, int key_mode, "
    "int seed, int offset, int base, int threshold, int boundary, int action, float alpha, int noise_seed, "
    "int noise_offset) -> Tensor",
    # The first digit of a top-k in one pass: the histogram of the top 16 key bits, exact for the bins
    # [lo_bin, hi_bin] of a bracket that holds the k-th largest key (placed by the kernel, e.g. from a
    # sample; a bracket that misses it is the caller's to detect), with the counts above (below) the
    # bracket lumped into bin hi_bin + 1 (lo_bin - 1), so counts from the top are exact at every bin
    # boundary inside the bracket. int64[2^16 + 3]: bins, NaN count, lo_bin, hi_bin.
    "select_histogram_near(Tensor[] scores, int key_mode, int seed, int offset, int base, int k) -> Tensor",
    # The fused second pass of a top-k: applies `action` (as select_apply_) to every key whose top
    # prefix_bits bits exceed prefix and to the `needed` largest keys whose top bits equal prefix (ties:
    # lower global index first; all of them if fewer). Extra memory: the keys of that bin. Returns
    # int64[3]: (count, threshold, boundary), the same selection in select_apply_'s terms.
    "select_apply_bin_(Tensor(a!)[] params, Tensor[] scores, Tensor[] source, Tensor(b!)[] masks, int key_mode, "
    "int seed, int offset, int base, int prefix, int prefix_bits, int needed, int action, float alpha, "
    "int noise_seed, int noise_offset) -> Tensor",
    # Masked gradient (masked repair, normalized ascent): zeroes the unselected coordinates of grads in
    # place; returns the float64 sum of squares of the kept ones.
    "select_mask_grad_(Tensor(a!)[] grads, Tensor[] scores, int key_mode, int seed, int offset, int base, "
    "int threshold, int boundary) -> Tensor",

    # ---- DeltaGrad replay steps (docs/design.md §6; mini/layer_chain.py, mini/deltagrad.py) -----------
    # The summed cross-entropy gradient of rows (x, y) through a chain of Linear layers and elementwise
    # activations, written into flat outputs (per Linear: weight grad, then bias grad, in layer order).
    # layers: one code per layer, 0 linear (the next of weights / biases), 1 tanh, 2 sigmoid, 3 relu;
    # the last is linear. x: rows flattened from dim 1 on; y: int64 class indices in range. split -1:
    # out holds one vector (all rows); split k: two, rows [:k] and rows [k:], from one forward pass.
    "layer_chain_grad_sums_(Tensor(a!)[] out, Tensor x, Tensor y, Tensor[] weights, Tensor?[] biases, "
    "int[] layers, int split) -> ()",
    # One DeltaGrad quasi-Newton step on flat float32 weights w: direction = scale * B dw (B from the
    # compact L-BFGS matrices: sigma v - W (P v) in float64, v = dw; or `predicted`, B dw given in
    # float64) + removed_alpha * g_removed + weight_decay * w; without buffer w -= lr * direction, then
    # w += recorded (the recorded gradient's term, scaled by the caller); with a momentum buffer (torch's
    # SGD, dampening 0) direction += recorded, buffer <- direction (start_buffer) or momentum * buffer +
    # direction, w -= lr * buffer (heavy ball) or lr * (direction + momentum * buffer) (Nesterov).
    # Returns sum(w) as a float64 scalar (finite exactly when every weight is).
    "deltagrad_qn_step_(Tensor(a!) w, Tensor(b!)? buffer, Tensor dw, Tensor recorded, Tensor W, Tensor P, "
    "float sigma, Tensor? predicted, Tensor? g_removed, float removed_alpha, float scale, float weight_decay, "
    "float lr, float momentum, bool nesterov, bool start_buffer) -> Tensor",
    # The quasi-Newton steps between two exact steps (fixed W, P, sigma) in one call, for a chain of
    # Linear layers (shapes: (out, in, bias 0/1) per Linear, in flat order; layers as above) on flat
    # float32 weights w. Step i: dw = w - recorded_w[i]; when counts[i] > 0, chain_weights <- w and
    # grad <- the summed gradient of the step's removed rows (x, y: one entry per such step, counts[i]
    # rows each), g_removed = grad / counts[i]; recorded = recorded_g[i] * (-lrs[i] * scales[i]), or *
    # scales[i] with a buffer; then deltagrad_qn_step_ (removed_alphas[i], scales[i], lrs[i]; the buffer
    # started at step 0 when start_buffer). Returns each step's sum(w) (float64 [n]); the run stops after
    # the first non-finite one (the later entries NaN).
    "deltagrad_qn_run_(Tensor(a!) w, Tensor(b!)? buffer, Tensor(c!) chain_weights, Tensor(d!) grad, "
    "Tensor[] recorded_w, Tensor[] recorded_g, Tensor[] x, Tensor[] y, int[] counts, float[] lrs, float[] scales, "
    "float[] removed_alphas, int[] shapes, int[] layers, Tensor W, Tensor P, float sigma, float weight_decay, "
    "float momentum, bool nesterov, bool start_buffer) -> Tensor",
)


def op_name(schema: str) -> str:
    """The op's name: the text before the first '('."""
    return schema[:schema.index("(")]
