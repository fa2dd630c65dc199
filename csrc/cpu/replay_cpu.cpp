// CPU kernels of the DeltaGrad replay's per-step work (unlearn_ext/mini/deltagrad.py): a replay takes
// one small gradient and one quasi-Newton update per recorded step, and on a small model each of
// their ~15 tensor operations costs more to issue from Python than to compute. These kernels issue
// the same ATen calls, in the same order, from C++: one Python->C++ crossing per call instead of one
// per operation, and the same numbers as the pure-PyTorch references (unlearn_ext/reference/replay.py,
// tests/test_replay_ops.py), which serve every other device. CPU only.
//
//   layer_chain_grad_sums_: the summed-loss gradient of a chain of Linear layers and elementwise
//     activations under the default cross-entropy (mini/layer_chain.py), written into flat outputs.
//   deltagrad_qn_step_: one quasi-Newton step: B dw from the compact L-BFGS matrices, the direction,
//     the weight (and momentum) update with the recorded gradient's share; returns sum(w) in float64
//     for the caller's finiteness check.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace unlearn {
namespace cpu {
namespace {

// Layer codes of layer_chain_grad_sums_ (unlearn_ext/chain_format.py names them).
constexpr int64_t kLinear = 0, kTanh = 1, kSigmoid = 2, kRelu = 3;

void check_finite_arg(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), "unlearn_ext: ", name, " must be finite, got ", v);
}

// Every condition before any work, in the order of op_checks._layer_chain_grad_sums (same messages).
void check_chain(at::TensorList out, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef layers, int64_t split) {
  size_t linears = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    TORCH_CHECK(layers[i] >= kLinear && layers[i] <= kRelu, "unlearn_ext: layers[", i,
                "] must be 0 (linear), 1 (tanh), 2 (sigmoid) or 3 (relu), got ", layers[i]);
    linears += layers[i] == kLinear;
  }
  TORCH_CHECK(!layers.empty() && layers.back() == kLinear, "unlearn_ext: the last layer must be linear (0)");
  TORCH_CHECK(linears == weights.size(), "unlearn_ext: layers name ", linears, " linear layers but weights has ",
              weights.size(), " tensors");
  TORCH_CHECK(biases.size() == weights.size(), "unlearn_ext: biases has ", biases.size(),
              " entries but weights has ", weights.size());
  const at::ScalarType dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "unlearn_ext: weights must be float32 or float64, got ",
              dtype);
  int64_t total = 0, width = weights[0].dim() == 2 ? weights[0].size(1) : -1;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, "unlearn_ext: weights[", i, "] must be 2-D with ", width,
                " columns (the width below it), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, "unlearn_ext: weights[", i, "] has dtype ", w.scalar_type(),
                " but weights[0] has ", dtype);
    total += w.numel();
    const std::optional<at::Tensor> b = biases[i];
    if (b.has_value() && b->defined()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "unlearn_ext: biases[", i, "] must have shape (",
                  w.size(0), ",), got ", b->sizes());
      TORCH_CHECK(b->scalar_type() == dtype, "unlearn_ext: biases[", i, "] has dtype ", b->scalar_type(),
                  " but weights[0] has ", dtype);
      total += b->numel();
    }
    width = w.size(0);
  }
  TORCH_CHECK(x.scalar_type() == dtype, "unlearn_ext: x has dtype ", x.scalar_type(), " but the weights have ",
              dtype);
  int64_t row = 1;  // values per row (x flattened from dim 1 on)
  for (int64_t i = 1; i < x.dim(); ++i) row *= x.size(i);
  TORCH_CHECK(x.dim() >= 2 && row == weights[0].size(1), "unlearn_ext: x must have rows of ",
              weights[0].size(1), " values (the first weight's columns), got shape ", x.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1, "unlearn_ext: y must be 1-D int64 class indices, got ",
              y.scalar_type(), " of shape ", y.sizes());
  TORCH_CHECK(y.size(0) == x.size(0), "unlearn_ext: x has ", x.size(0), " rows but y has ", y.size(0));
  TORCH_CHECK(x.size(0) > 0, "unlearn_ext: x has no rows");
  TORCH_CHECK(split == -1 || (split >= 0 && split <= x.size(0)), "unlearn_ext: split must be -1 (none) or in [0, ",
              x.size(0), "], got ", split);
  TORCH_CHECK(out.size() == (split == -1 ? 1u : 2u), "unlearn_ext: out must hold ", (split == -1 ? 1 : 2),
              " tensors (split ", split, "), got ", out.size());
  for (size_t i = 0; i < out.size(); ++i)
    TORCH_CHECK(out[i].dim() == 1 && out[i].numel() == total && out[i].is_contiguous() &&
                    out[i].scalar_type() == dtype,
                "unlearn_ext: out[", i, "] must be a contiguous 1-D tensor of ", total,
                " values of the weights' dtype, got ", out[i].scalar_type(), " of shape ", out[i].sizes());
  const int64_t classes = weights.back().size(0);
  const at::Tensor yc = y.contiguous();
  const int64_t* t = yc.data_ptr<int64_t>();
  for (int64_t i = 0; i < yc.numel(); ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < classes, "unlearn_ext: y must hold class indices in [0, ", classes, "), got ",
                t[i]);
}

void layer_chain_grad_sums_cpu(at::TensorList out, const at::Tensor& x_in, const at::Tensor& y,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                               at::IntArrayRef layers, int64_t split) {
  TORCH_CHECK(!weights.empty(), "unlearn_ext: weights must hold at least one tensor");
  check_chain(out, x_in, y, weights, biases, layers, split);
  at::NoGradGuard no_grad;
  // The forward pass, keeping every layer's input (outputs[i]: the input of layer i).
  std::vector<at::Tensor> outputs{x_in.flatten(1)};
  std::vector<at::Tensor> bias(weights.size());
  size_t linear = 0;
  for (int64_t code : layers) {
    const at::Tensor& h = outputs.back();
    if (code == kLinear) {
      const std::optional<at::Tensor> b = biases[linear];
      std::optional<at::Tensor> b_arg;  // (None, as F.linear(h, weight, None) passes it)
      if (b.has_value() && b->defined()) b_arg = bias[linear] = *b;
      outputs.push_back(at::linear(h, weights[linear], b_arg));
      ++linear;
    } else {
      outputs.push_back(code == kTanh ? at::tanh(h) : code == kSigmoid ? at::sigmoid(h) : at::relu(h));
    }
  }
  // d(sum of cross-entropies)/d logits: softmax minus each row's one-hot target (one -1 per row).
  at::Tensor grad = at::softmax(outputs.back(), 1);
  const at::Tensor yc = y.contiguous();
  const int64_t* t = yc.data_ptr<int64_t>();
  const int64_t classes = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "layer_chain_grad_sums_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    for (int64_t i = 0; i < yc.numel(); ++i) g[i * classes + t[i]] += static_cast<scalar_t>(-1.0);
  });
  // Each output's (weight grad, bias grad) views, in flat order (weight then bias per Linear).
  std::vector<std::vector<std::pair<at::Tensor, at::Tensor>>> views(out.size());
  for (size_t o = 0; o < out.size(); ++o) {
    int64_t at_ = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t n = weights[i].numel();
      at::Tensor wg = out[o].narrow(0, at_, n).view(weights[i].sizes());
      at_ += n;
      at::Tensor bg;
      if (bias[i].defined()) {
        bg = out[o].narrow(0, at_, bias[i].numel());
        at_ += bias[i].numel();
      }
      views[o].emplace_back(wg, bg);
    }
  }
  // The backward pass, last layer first.
  const std::vector<int64_t> rows_dim{0};  // (a bias grad sums over the rows)
  linear = weights.size();
  for (int64_t i = static_cast<int64_t>(layers.size()) - 1; i >= 0; --i) {
    const int64_t code = layers[i];
    if (code == kTanh) {
      grad = at::tanh_backward(grad, outputs[i + 1]);
    } else if (code == kSigmoid) {
      grad = at::sigmoid_backward(grad, outputs[i + 1]);
    } else if (code == kRelu) {
      grad = at::threshold_backward(grad, outputs[i + 1], 0);
    } else {
      --linear;
      const at::Tensor& below = outputs[i];
      if (split == -1) {
        at::mm_out(views[0][linear].first, grad.t(), below);
        if (views[0][linear].second.defined()) at::sum_out(views[0][linear].second, grad, rows_dim);
      } else {
        const int64_t n = grad.size(0);
        for (size_t o = 0; o < 2; ++o) {
          const at::Tensor g = o == 0 ? grad.slice(0, 0, split) : grad.slice(0, split, n);
          const at::Tensor b = o == 0 ? below.slice(0, 0, split) : below.slice(0, split, n);
          at::mm_out(views[o][linear].first, g.t(), b);
          if (views[o][linear].second.defined()) at::sum_out(views[o][linear].second, g, rows_dim);
        }
      }
      if (i != 0) grad = at::mm(grad, weights[linear]);
    }
  }
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t d) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == d, "unlearn_ext: ", name, " must be a 1-D ",
              dtype == at::kFloat ? "float32" : "float64", " tensor of ", d, " values, got ", t.scalar_type(),
              " of shape ", t.sizes());
}

at::Tensor deltagrad_qn_step_cpu(const at::Tensor& w, const std::optional<at::Tensor>& buffer,
                                 const at::Tensor& dw, const at::Tensor& recorded, const at::Tensor& W,
                                 const at::Tensor& P, double sigma, const std::optional<at::Tensor>& predicted,
                                 const std::optional<at::Tensor>& g_removed, double removed_alpha, double scale,
                                 double weight_decay, double lr, double momentum, bool nesterov,
                                 bool start_buffer) {
  // Every condition before any work, in the order of op_checks._deltagrad_qn_step (same messages).
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1, "unlearn_ext: w must be a 1-D float32 tensor, got ",
              w.scalar_type(), " of shape ", w.sizes());
  const int64_t d = w.size(0);
  check_vector(dw, "dw", at::kFloat, d);
  check_vector(recorded, "recorded", at::kFloat, d);
  const bool has_predicted = predicted.has_value() && predicted->defined();
  if (has_predicted) {
    check_vector(*predicted, "predicted", at::kDouble, d);
  } else {
    TORCH_CHECK(W.scalar_type() == at::kDouble && W.dim() == 2 && W.size(0) == d, "unlearn_ext: W must be a 2-D ",
                "float64 tensor with ", d, " rows, got ", W.scalar_type(), " of shape ", W.sizes());
    TORCH_CHECK(P.scalar_type() == at::kDouble && P.dim() == 2 && P.size(0) == W.size(1) && P.size(1) == d,
                "unlearn_ext: P must be a float64 tensor of shape (", W.size(1), ", ", d, "), got ", P.scalar_type(),
                " of shape ", P.sizes());
  }
  const bool has_removed = g_removed.has_value() && g_removed->defined();
  if (has_removed) check_vector(*g_removed, "g_removed", at::kFloat, d);
  const bool has_buffer = buffer.has_value() && buffer->defined();
  if (has_buffer) check_vector(*buffer, "buffer", at::kFloat, d);
  check_finite_arg(sigma, "sigma");
  check_finite_arg(removed_alpha, "removed_alpha");
  check_finite_arg(scale, "scale");
  check_finite_arg(weight_decay, "weight_decay");
  check_finite_arg(lr, "lr");
  check_finite_arg(momentum, "momentum");

  at::NoGradGuard no_grad;
  at::Tensor direction;  // B dw, then the step's whole gradient estimate
  if (has_predicted) {
    direction = predicted->to(at::kFloat);
  } else {
    const at::Tensor v = dw.to(at::kDouble);
    direction = at::addmv(v, W, at::mv(P, v), sigma, -1.0).to(at::kFloat);
  }
  direction.mul_(scale);
  if (has_removed) direction.add_(*g_removed, removed_alpha);
  if (weight_decay != 0.0) direction.add_(w, weight_decay);
  if (!has_buffer) {
    w.add_(direction, -lr);
    w.add_(recorded);
  } else {
    direction.add_(recorded);
    if (start_buffer) {
      buffer->copy_(direction);
    } else {
      buffer->mul_(momentum).add_(direction);
    }
    w.sub_(nesterov ? at::add(direction, buffer->mul(momentum)).mul(lr) : buffer->mul(lr));
  }
  return at::sum(w, at::kDouble);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("layer_chain_grad_sums_", &layer_chain_grad_sums_cpu);
  m.impl("deltagrad_qn_step_", &deltagrad_qn_step_cpu);
}

}  // namespace cpu
}  // namespace unlearn
