// The one registry: every operator schema of unlearn_ext is declared here, once. CPU and CUDA files
// only register implementations (TORCH_LIBRARY_IMPL); Python registers fake implementations
// (unlearn_ext/ops/fakes.py) so the ops trace under torch.compile.
//
// Conventions: lists of tensors are one long vector (global element index = offset of the tensor
// in the list + index inside it); `seed` and `offset` are the RNG contract's key and block offset,
// read as unsigned 64-bit; statistics come back as (min_radius: float32 scalar,
// counts: int64[3] = [abstained, nonfinite, radius_below_count_below]).
//
// Autograd: no op has a derivative, and some mutate their inputs. Every op gets the two kernels
// below, at the Autograd and ADInplaceOrView keys, driven by the schema's alias annotations, so
// the ops behave like torch's own in-place ops: mutated tensors have their version counters bumped
// (a backward through a saved, since-modified tensor raises), a leaf that requires grad is refused
// in grad mode (torch.no_grad() updates, as PCMU does, still work), and a backward through a
// mutated tensor or a float output raises instead of silently yielding a wrong gradient.
// torch's autogradNotImplemented*Fallback() kernels do this only for mutated tensors an op
// *returns* (add_ returns self); ours return () or statistics, so those fallbacks would leave the
// mutated lists with stale versions and stale history. All registrations come from the one list
// below, so a new op cannot miss them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

// One schema per op; the op's name is the text before the first '('.
constexpr const char* kSchemas[] = {

  // RNG contract (DESIGN section 3): draws `draws` words per element index.
  "philox_bits(Tensor element_index, int draws, int seed, int offset) -> Tensor",
  "philox_uniform(Tensor element_index, int draws, int seed, int offset) -> Tensor",
  "philox_bernoulli(Tensor element_index, int draws, float p, int seed, int offset) -> Tensor",

  // Smoothed ternary quantization (DESIGN section 4, framework G).
  "quantize_analytic(Tensor[] grads, float beta, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",
  "quantize_mc(Tensor[] grads, float tau, float sigma, int n0, int n, Tensor radius_table, "
      "int seed, int offset, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",
  // Fused step: params <- params - step_size * code, statistics reduced in the same pass. With
  // check_finite, a gradient holding NaN/Inf leaves every parameter untouched and counts[1] > 0.
  "quantized_step_analytic_(Tensor(a!)[] params, Tensor[] grads, float beta, float step_size, "
      "float count_below, bool check_finite) -> (Tensor min_radius, Tensor counts)",
  "quantized_step_mc_(Tensor(a!)[] params, Tensor[] grads, float tau, float sigma, int n0, int n, "
      "Tensor radius_table, int seed, int offset, float step_size, float count_below, "
      "bool check_finite) -> (Tensor min_radius, Tensor counts)",

  // params <- params - step_size * code from stored int8 codes in {-1, 0, 1} shaped like params:
  // the update of the fused steps above (fp32 math, one rounding), for replays.
  "apply_codes_(Tensor(a!)[] params, Tensor[] codes, float step_size) -> ()",

  // Data smoothing (framework D): per-coordinate vote counters of shape (2, *grad.shape).
  "vote_accumulate_(Tensor(a!)[] votes, Tensor[] grads, float tau) -> Tensor nonfinite",
  "vote_finalize(Tensor[] selection_votes, Tensor[] estimation_votes, int n0, int n, "
      "Tensor radius_table, float sigma, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)",

  // Per-request certificates (DESIGN section 4): the fragile coordinates of one step, compacted in
  // global-index order: every element whose radius < threshold (a NaN radius counts as fragile),
  // with its value (as float32) and its radius. One pass to count per chunk, one to write.
  "fragile_compact(Tensor[] values, Tensor[] radii, float threshold) -> "
      "(Tensor index, Tensor value, Tensor radius)",
  // ---- Compressed history codecs (DESIGN section 5) ----------------------------------------------
  // Blockwise absmax quantization, blocks per tensor (a tensor's last block may be short), block
  // size even in [64, 4096]; math in unlearn/codecs.h. Per input tensor: codes are flat, int8
  // (bits = 8, numel entries) or uint8 with two int4 codes per byte (bits = 4, ceil(numel / 2)
  // entries, low nibble first); scales are flat float32, one per block (scale = absmax / 127 or / 7).
  // levels picks the level set: "linear" (the above), "normal" (bits = 4: 16 normal-quantile levels,
  // unsigned nibble indices, scale = the block's signed absmax) or "companded" (bits = 8: levels
  // k (127 + 3 |k|), scale = absmax / 64516); each op of a codes/scales pair must get the same one.
  "blockwise_quantize(Tensor[] x, int bits, int block_size, str levels=\"linear\") -> (Tensor[] codes, Tensor[] scales)",
  // out <- deq(codes, scales); out gives the shapes and the dtype (fp32/fp16/bf16).
  "blockwise_dequantize_(Tensor(a!)[] out, Tensor[] codes, Tensor[] scales, int bits, int block_size, "
      "str levels=\"linear\") -> ()",
  // Closed-loop delta: codes, scales <- quantize(target - recon); recon (float32) += deq(codes, scales).
  // codes and scales are preallocated outputs (sized as blockwise_quantize returns them): a
  // mutable op returning fresh tensor lists cannot be functionalized (torch.compile, opcheck).
  "delta_encode_(Tensor[] target, Tensor(a!)[] recon, Tensor(b!)[] codes, Tensor(c!)[] scales, int bits, "
      "int block_size, str levels=\"linear\") -> ()",
  // y <- y + alpha * deq(codes, scales) (fp32 math, rounded like recon updates: bit-exact decode).
  "dequantize_axpy_(Tensor(a!)[] y, float alpha, Tensor[] codes, Tensor[] scales, int bits, "
      "int block_size, str levels=\"linear\") -> ()",
  // <deq(codes, scales), v> over the whole list, as a float64 scalar.
  "dequantize_dot(Tensor[] codes, Tensor[] scales, Tensor[] v, int bits, int block_size, "
      "str levels=\"linear\") -> Tensor",

  // ---- Selection: Top-K / Random-k (DESIGN section 7, our formulation; math in unlearn/select.h) ----
  // key_mode: 0 the score as given, 1 |score|, 2 random (Philox word of the global index at (seed,
  // offset); scores then only give shapes). `base` is the global index of the list's first element
  // (0 for a whole list; a shard's start in distributed selection). An element is selected iff
  // key > threshold or (key == threshold and global index < boundary).
  // Histogram of one radix digit: keys whose top prefix_bits bits equal prefix, counted by their
  // next digit_bits bits; int64[2^digit_bits + 1], the last entry counts NaN scores (any prefix).
  // Shards' histograms add up to the whole list's (the distributed selection's all-reduce).
  "select_histogram(Tensor[] scores, int key_mode, int seed, int offset, int base, int prefix, "
  "int prefix_bits, int digit_bits) -> Tensor",
  // The tie boundary: the global index b such that exactly `needed` elements with key == `key` lie
  // below b (base if needed = 0; base + numel if fewer ties exist). int64 scalar.
  "select_tie_boundary(Tensor[] scores, int key_mode, int seed, int offset, int base, int key, "
  "int needed) -> Tensor",
  // Fused apply: perturbs the selected coordinates of params in place (action 0 set to source / 0,
  // 1 scale by alpha, 2 add alpha * N(0,1) from (noise_seed, noise_offset), 3 add alpha * source),
  // writes masks when given (bool, shaped like params), returns how many were selected (int64).
  // In random mode scores may be empty (params give the shapes).
  "select_apply_(Tensor(a!)[] params, Tensor[] scores, Tensor[] source, Tensor(b!)[] masks, int key_mode, "
  "int seed, int offset, int base, int threshold, int boundary, int action, float alpha, int noise_seed, "
  "int noise_offset) -> Tensor",
  // The first digit of a top-k in one pass: the histogram of the top 16 key bits, exact for the bins
  // [lo_bin, hi_bin] of a bracket that holds the k-th largest key (placed by the kernel, e.g. from a
  // sample; a bracket that misses it is the caller's to detect), with the counts above (below) the
  // bracket lumped into bin hi_bin + 1 (lo_bin - 1), so counts from the top are exact at every bin
  // boundary inside the bracket. int64[2^16 + 3]: bins, NaN count, lo_bin, hi_bin.
  "select_histogram_near(Tensor[] scores, int key_mode, int seed, int offset, int base, int k) -> Tensor",
  // The fused second pass of a top-k: applies `action` (as select_apply_) to every key whose top
  // prefix_bits bits exceed prefix and to the `needed` largest keys whose top bits equal prefix (ties:
  // lower global index first; all of them if fewer). Extra memory: the keys of that bin. Returns
  // int64[3]: (count, threshold, boundary), the same selection in select_apply_'s terms.
  "select_apply_bin_(Tensor(a!)[] params, Tensor[] scores, Tensor[] source, Tensor(b!)[] masks, int key_mode, "
  "int seed, int offset, int base, int prefix, int prefix_bits, int needed, int action, float alpha, "
  "int noise_seed, int noise_offset) -> Tensor",
  // Masked gradient (masked repair, normalized ascent): zeroes the unselected coordinates of grads in
  // place; returns the float64 sum of squares of the kept ones.
  "select_mask_grad_(Tensor(a!)[] grads, Tensor[] scores, int key_mode, int seed, int offset, int base, "
  "int threshold, int boundary) -> Tensor",
};

// Calls f(tensor) for each tensor an argument or a result holds (a Tensor or a Tensor[]).
template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) f(t);
  }
}

// The tensors of the arguments the schema marks as written (Tensor(a!) / Tensor(a!)[]).
std::vector<at::Tensor> mutated_arguments(const c10::FunctionSchema& schema, const torch::jit::Stack& stack) {
  const size_t n = schema.arguments().size(), first = stack.size() - n;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < n; ++i)
    if (schema.is_mutable({c10::SchemaArgType::input, i}))
      for_each_tensor(stack[first + i], [&](const at::Tensor& t) { out.push_back(t); });
  return out;
}

// Autograd key: refuses what torch refuses for an in-place op without a derivative, runs the op
// below autograd, then gives its float outputs and mutated float tensors a NotImplemented
// gradient function when any input requires grad, so that backward() through them raises.
void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  namespace ag = torch::autograd;
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size(), n_returns = schema.returns().size();
  std::vector<at::Tensor> needs_grad;
  for (size_t i = stack->size() - n_args; i < stack->size(); ++i)
    for_each_tensor((*stack)[i], [&](const at::Tensor& t) {
      TORCH_CHECK_NOT_IMPLEMENTED(!t._fw_grad(/*level=*/0).defined(), "unlearn_ext: ", schema.name(),
                                  " has no forward-mode derivative");
      if (ag::GradMode::is_enabled() && t.requires_grad()) needs_grad.push_back(t);
    });
  std::vector<at::Tensor> mutated = mutated_arguments(schema, *stack);
  // "a leaf Variable that requires grad is being used in an in-place operation" (and its view).
  for (const auto& t : mutated) ag::check_inplace(t, !needs_grad.empty());
  {
    at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (needs_grad.empty()) return;
  auto grad_fn = c10::make_intrusive<ag::NotImplemented>(schema.name(), ag::collect_next_edges(needs_grad));
  for (size_t i = stack->size() - n_returns; i < stack->size(); ++i)
    for_each_tensor((*stack)[i], [&](const at::Tensor& t) {
      if (ag::isDifferentiableType(t.scalar_type())) ag::set_history(t, grad_fn);
    });
  std::vector<at::Tensor> rebased;  // integer tensors (codes, votes) carry no gradient
  for (const auto& t : mutated)
    if (ag::isDifferentiableType(t.scalar_type())) rebased.push_back(t);
  ag::rebase_history(rebased, grad_fn);  // the list overload: one grad_fn input per tensor
}

// ADInplaceOrView key: every tensor the op wrote gets a new version, as after torch's add_.
void inplace_or_view_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  std::vector<at::Tensor> mutated = mutated_arguments(op.schema(), *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : mutated) torch::autograd::increment_version(t);
}

}  // namespace

TORCH_LIBRARY(unlearn_ext, m) {
  for (const char* schema : kSchemas) {
    m.def(schema);
    const std::string name(schema, std::string(schema).find('('));
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::Autograd,
                                         torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>()));
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                         torch::CppFunction::makeFromBoxedFunction<&inplace_or_view_kernel>()));
  }
}
