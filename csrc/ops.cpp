// The autograd side of every op. The schemas are declared once, in unlearn_ext/ops/schemas.py, and
// defined with torch.library by unlearn_ext/ops/registry.py (whether or not this extension is
// built), with the pure-PyTorch reference as every op's default kernel; the CPU and CUDA files only
// register kernels for their keys (TORCH_LIBRARY_IMPL), which override the reference there.
//
// Autograd: no op has a derivative, and some mutate their inputs. Every op gets the two kernels
// below, at the Autograd and ADInplaceOrView keys, driven by the schema's alias annotations, so
// the ops behave like torch's own in-place ops: mutated tensors have their version counters bumped
// (a backward through a saved, since-modified tensor raises), a leaf that requires grad is refused
// in grad mode (torch.no_grad() updates, as PCMU does, still work), a tensor whose elements share
// memory (an as_strided view, an expand) is refused as a written argument, as torch's in-place ops
// refuse it, and a backward through a mutated tensor or a float output raises instead of silently
// yielding a wrong gradient. torch's autogradNotImplemented*Fallback() kernels do this only for
// mutated tensors an op *returns* (add_ returns self); ours return () or statistics, so those
// fallbacks would leave the mutated lists with stale versions and stale history.
// register_autograd_kernels() registers both for every op of the namespace, so a new op cannot miss
// them.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <vector>

namespace {

// Calls f(tensor) for each tensor an argument or a result holds (a Tensor, a Tensor[], or the
// defined entries of a Tensor?[]: a generic list, which isTensorList() does not recognize).
template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) f(t);
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toListRef())
      if (e.isTensor()) f(e.toTensor());
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

// A written tensor whose elements share memory would be written more than once, in an order that
// depends on threads: refused with the message torch's in-place ops give (and the Python checks'
// in unlearn_ext/ops/op_checks.py).
void check_no_internal_overlap(const at::Tensor& t, const std::string& op) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "unlearn_ext: ", op.substr(op.find("::") + 2),
              " writes a tensor whose elements share memory (e.g. an as_strided or expand view); "
              "clone() it first");
}

// ADInplaceOrView key: checks the written tensors (above); every tensor the op wrote gets a new version, as after torch's add_.
void inplace_or_view_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  std::vector<at::Tensor> mutated = mutated_arguments(op.schema(), *stack);
  for (const auto& t : mutated) check_no_internal_overlap(t, op.schema().name());
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : mutated) torch::autograd::increment_version(t);
}

}  // namespace

namespace unlearn {

// Registers the two kernels above for every op defined in the unlearn_ext namespace (registry.py
// calls this once, after defining the schemas). Returns how many ops got them.
int64_t register_autograd_kernels() {
  static std::unique_ptr<torch::Library> library;  // registrations live as long as this object
  TORCH_CHECK(!library, "unlearn_ext: the autograd kernels are already registered");
  library = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "unlearn_ext", std::nullopt, __FILE__,
                                             __LINE__);
  const std::string prefix = "unlearn_ext::";
  int64_t count = 0;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind(prefix, 0) != 0) continue;
    const std::string name = op.name.substr(prefix.size());
    library->impl(name.c_str(), torch::dispatch(c10::DispatchKey::Autograd,
                                                torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>()));
    library->impl(name.c_str(), torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                                torch::CppFunction::makeFromBoxedFunction<&inplace_or_view_kernel>()));
    ++count;
  }
  TORCH_CHECK(count > 0, "unlearn_ext: no op is defined yet; define the schemas (ops/registry.py) first");
  return count;
}

}  // namespace unlearn
