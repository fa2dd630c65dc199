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
//   deltagrad_qn_run_: the quasi-Newton steps between two exact steps in one call: each step's removed
//     rows' gradient (the chain's), the recorded gradient's term and the step above; returns each
//     step's sum(w), stopping after the first non-finite one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
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

// The chain's layer codes checked (chain_format.py's), and how many of them are linear: both chain ops
// take their layers so.
size_t linear_layers(at::IntArrayRef layers) {
  size_t linears = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    TORCH_CHECK(layers[i] >= kLinear && layers[i] <= kRelu, "unlearn_ext: layers[", i,
                "] must be 0 (linear), 1 (tanh), 2 (sigmoid) or 3 (relu), got ", layers[i]);
    linears += layers[i] == kLinear;
  }
  TORCH_CHECK(!layers.empty() && layers.back() == kLinear, "unlearn_ext: the last layer must be linear (0)");
  return linears;
}

// Every condition before any work, in the order of op_checks._layer_chain_grad_sums (same messages).
void check_chain(at::TensorList out, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef layers, int64_t split) {
  const size_t linears = linear_layers(layers);
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

// The chain's gradient sums (layer_chain_grad_sums_), its arguments checked: bias[i] undefined for
// a Linear without one. Shared by the chain op and the quasi-Newton run.
void chain_grad_sums(at::TensorList out, const at::Tensor& x_in, const at::Tensor& y, at::TensorList weights,
                     const std::vector<at::Tensor>& bias, at::IntArrayRef layers, int64_t split) {
  // The forward pass, keeping every layer's input (outputs[i]: the input of layer i).
  std::vector<at::Tensor> outputs{x_in.flatten(1)};
  size_t linear = 0;
  for (int64_t code : layers) {
    const at::Tensor& h = outputs.back();
    if (code == kLinear) {
      std::optional<at::Tensor> b_arg;  // (None, as F.linear(h, weight, None) passes it)
      if (bias[linear].defined()) b_arg = bias[linear];
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

void layer_chain_grad_sums_cpu(at::TensorList out, const at::Tensor& x_in, const at::Tensor& y,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                               at::IntArrayRef layers, int64_t split) {
  TORCH_CHECK(!weights.empty(), "unlearn_ext: weights must hold at least one tensor");
  check_chain(out, x_in, y, weights, biases, layers, split);
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> bias(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::optional<at::Tensor> b = biases[i];
    if (b.has_value() && b->defined()) bias[i] = *b;
  }
  chain_grad_sums(out, x_in, y, weights, bias, layers, split);
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t d) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == d, "unlearn_ext: ", name, " must be a 1-D ",
              dtype == at::kFloat ? "float32" : "float64", " tensor of ", d, " values, got ", t.scalar_type(),
              " of shape ", t.sizes());
}

// One quasi-Newton step (deltagrad_qn_step_), its arguments checked: buffer, predicted, g_removed
// undefined where not given. Returns sum(w) in float64. Shared by the step op and the run.
at::Tensor qn_step(const at::Tensor& w, const at::Tensor& buffer, const at::Tensor& dw, const at::Tensor& recorded,
                   const at::Tensor& W, const at::Tensor& P, double sigma, const at::Tensor& predicted,
                   const at::Tensor& g_removed, double removed_alpha, double scale, double weight_decay, double lr,
                   double momentum, bool nesterov, bool start_buffer) {
  const bool has_predicted = predicted.defined(), has_removed = g_removed.defined(), has_buffer = buffer.defined();
  at::Tensor direction;  // B dw, then the step's whole gradient estimate
  if (has_predicted) {
    direction = predicted.to(at::kFloat);
  } else {
    const at::Tensor v = dw.to(at::kDouble);
    direction = at::addmv(v, W, at::mv(P, v), sigma, -1.0).to(at::kFloat);
  }
  direction.mul_(scale);
  if (has_removed) direction.add_(g_removed, removed_alpha);
  if (weight_decay != 0.0) direction.add_(w, weight_decay);
  if (!has_buffer) {
    w.add_(direction, -lr);
    w.add_(recorded);
  } else {
    direction.add_(recorded);
    if (start_buffer) {
      buffer.copy_(direction);
    } else {
      buffer.mul_(momentum).add_(direction);
    }
    w.sub_(nesterov ? at::add(direction, buffer.mul(momentum)).mul(lr) : buffer.mul(lr));
  }
  return at::sum(w, at::kDouble);
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
  return qn_step(w, has_buffer ? *buffer : at::Tensor(), dw, recorded, W, P, sigma,
                 has_predicted ? *predicted : at::Tensor(), has_removed ? *g_removed : at::Tensor(), removed_alpha,
                 scale, weight_decay, lr, momentum, nesterov, start_buffer);
}

void check_count(size_t got, size_t n, const char* name) {
  TORCH_CHECK(got == n, "unlearn_ext: ", name, " has ", got, " entries but counts has ", n);
}

// Every condition of deltagrad_qn_run_ before any work, in the order of op_checks._deltagrad_qn_run
// (same messages).
void check_run(const at::Tensor& w, const std::optional<at::Tensor>& buffer, const at::Tensor& chain_weights,
               const at::Tensor& grad, at::TensorList recorded_w, at::TensorList recorded_g, at::TensorList x,
               at::TensorList y, at::IntArrayRef counts, at::ArrayRef<double> lrs, at::ArrayRef<double> scales,
               at::ArrayRef<double> removed_alphas, at::IntArrayRef shapes, at::IntArrayRef layers,
               const at::Tensor& W, const at::Tensor& P, double sigma, double weight_decay, double momentum) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1, "unlearn_ext: w must be a 1-D float32 tensor, got ",
              w.scalar_type(), " of shape ", w.sizes());
  const int64_t d = w.size(0);
  if (buffer.has_value() && buffer->defined()) check_vector(*buffer, "buffer", at::kFloat, d);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{chain_weights, "chain_weights"},
                                std::pair<const at::Tensor&, const char*>{grad, "grad"}})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == d && t.is_contiguous(), "unlearn_ext: ",
                name, " must be a contiguous 1-D float32 tensor of ", d, " values, got ", t.scalar_type(),
                " of shape ", t.sizes());
  const size_t n = counts.size();
  check_count(recorded_w.size(), n, "recorded_w");
  check_count(recorded_g.size(), n, "recorded_g");
  check_count(lrs.size(), n, "lrs");
  check_count(scales.size(), n, "scales");
  check_count(removed_alphas.size(), n, "removed_alphas");
  for (size_t i = 0; i < n; ++i) {
    check_vector(recorded_w[i], ("recorded_w[" + std::to_string(i) + "]").c_str(), at::kFloat, d);
    check_vector(recorded_g[i], ("recorded_g[" + std::to_string(i) + "]").c_str(), at::kFloat, d);
  }
  const size_t linears = linear_layers(layers);
  TORCH_CHECK(shapes.size() == 3 * linears, "unlearn_ext: shapes must hold (out, in, bias) for each of the ", linears,
              " linear layers, got ", shapes.size(), " values");
  int64_t total = 0;
  for (size_t k = 0; k < linears; ++k) {
    const int64_t out = shapes[3 * k], in = shapes[3 * k + 1], bias = shapes[3 * k + 2];
    TORCH_CHECK(out > 0 && in > 0 && (bias == 0 || bias == 1), "unlearn_ext: linear layer ", k,
                " must have out > 0, in > 0 and bias 0 or 1, got (", out, ", ", in, ", ", bias, ")");
    TORCH_CHECK(k == 0 || in == shapes[3 * k - 3], "unlearn_ext: linear layer ", k, " takes ", in,
                " values but the layer below gives ", shapes[3 * k - 3]);
    total += out * in + bias * out;
  }
  TORCH_CHECK(total == d, "unlearn_ext: the layers hold ", total, " parameters but w has ", d);
  size_t with_rows = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(counts[i] >= 0, "unlearn_ext: counts[", i, "] must be >= 0, got ", counts[i]);
    with_rows += counts[i] > 0;
  }
  TORCH_CHECK(x.size() == with_rows && y.size() == with_rows, "unlearn_ext: x and y must hold one entry per step with "
              "rows (", with_rows, "), got ", x.size(), " and ", y.size());
  const int64_t classes = shapes[3 * linears - 3];
  for (size_t i = 0, k = 0; i < n; ++i) {
    if (counts[i] == 0) continue;
    const at::Tensor &xk = x[k], &yk = y[k];
    int64_t row = 1;  // values per row (x flattened from dim 1 on)
    for (int64_t j = 1; j < xk.dim(); ++j) row *= xk.size(j);
    TORCH_CHECK(xk.scalar_type() == at::kFloat && xk.dim() >= 2 && row == shapes[1] && xk.size(0) == counts[i],
                "unlearn_ext: x[", k, "] must be float32 with ", counts[i], " rows (counts[", i, "]) of ", shapes[1],
                " values, got ", xk.scalar_type(), " of shape ", xk.sizes());
    TORCH_CHECK(yk.scalar_type() == at::kLong && yk.dim() == 1 && yk.size(0) == counts[i], "unlearn_ext: y[", k,
                "] must be 1-D int64 class indices, one per row of x[", k, "], got ", yk.scalar_type(), " of shape ",
                yk.sizes());
    const at::Tensor yc = yk.contiguous();
    const int64_t* t = yc.data_ptr<int64_t>();
    for (int64_t j = 0; j < yc.numel(); ++j)
      TORCH_CHECK(t[j] >= 0 && t[j] < classes, "unlearn_ext: y[", k, "] must hold class indices in [0, ", classes,
                  "), got ", t[j]);
    ++k;
  }
  TORCH_CHECK(W.scalar_type() == at::kDouble && W.dim() == 2 && W.size(0) == d, "unlearn_ext: W must be a 2-D ",
              "float64 tensor with ", d, " rows, got ", W.scalar_type(), " of shape ", W.sizes());
  TORCH_CHECK(P.scalar_type() == at::kDouble && P.dim() == 2 && P.size(0) == W.size(1) && P.size(1) == d,
              "unlearn_ext: P must be a float64 tensor of shape (", W.size(1), ", ", d, "), got ", P.scalar_type(),
              " of shape ", P.sizes());
  check_finite_arg(sigma, "sigma");
  check_finite_arg(weight_decay, "weight_decay");
  check_finite_arg(momentum, "momentum");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(std::isfinite(lrs[i]) && std::isfinite(scales[i]) && std::isfinite(removed_alphas[i]),
                "unlearn_ext: lrs, scales and removed_alphas must be finite, got ", lrs[i], ", ", scales[i], ", ",
                removed_alphas[i], " at step ", i);
  }
}

// A run of quasi-Newton steps between two exact steps: per step, the step's removed rows' gradient
// (the chain's, at w copied into chain_weights, divided by their count), the recorded gradient's
// term and the step (qn_step): the calls the replay makes per step (mini/deltagrad.py), in its order.
at::Tensor deltagrad_qn_run_cpu(const at::Tensor& w, const std::optional<at::Tensor>& buffer,
                                const at::Tensor& chain_weights, const at::Tensor& grad, at::TensorList recorded_w,
                                at::TensorList recorded_g, at::TensorList x, at::TensorList y, at::IntArrayRef counts,
                                at::ArrayRef<double> lrs, at::ArrayRef<double> scales,
                                at::ArrayRef<double> removed_alphas, at::IntArrayRef shapes, at::IntArrayRef layers,
                                const at::Tensor& W, const at::Tensor& P, double sigma, double weight_decay,
                                double momentum, bool nesterov, bool start_buffer) {
  check_run(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales, removed_alphas, shapes,
            layers, W, P, sigma, weight_decay, momentum);
  at::NoGradGuard no_grad;
  // The chain's weights and biases: views of chain_weights in flat order (as the replay's working copy).
  std::vector<at::Tensor> weights, bias;
  for (size_t k = 0, at_ = 0; 3 * k < shapes.size(); ++k) {
    const int64_t out = shapes[3 * k], in = shapes[3 * k + 1];
    weights.push_back(chain_weights.narrow(0, at_, out * in).view({out, in}));
    at_ += out * in;
    bias.push_back(shapes[3 * k + 2] ? chain_weights.narrow(0, at_, out) : at::Tensor());
    at_ += shapes[3 * k + 2] ? out : 0;
  }
  const at::Tensor buf = buffer.has_value() ? *buffer : at::Tensor();
  const int64_t n = static_cast<int64_t>(counts.size());
  at::Tensor sums = at::full({n}, std::numeric_limits<double>::quiet_NaN(), w.options().dtype(at::kDouble));
  double* sum = sums.data_ptr<double>();
  for (int64_t i = 0, k = 0; i < n; ++i) {
    const at::Tensor dw = at::sub(w, recorded_w[i]);  // w - w_t
    at::Tensor g_removed;
    if (counts[i] > 0) {
      chain_weights.copy_(w);
      chain_grad_sums(grad, x[k], y[k], weights, bias, layers, -1);
      g_removed = at::div(grad, counts[i]);
      ++k;
    }
    // The recorded gradient's term: -lr scale g_t, or scale g_t joining the direction with momentum.
    const at::Tensor recorded = at::mul(recorded_g[i], buf.defined() ? scales[i] : -lrs[i] * scales[i]);
    sum[i] = qn_step(w, buf, dw, recorded, W, P, sigma, at::Tensor(), g_removed, removed_alphas[i], scales[i],
                     weight_decay, lrs[i], momentum, nesterov, start_buffer && i == 0)
                 .item<double>();
    if (!std::isfinite(sum[i])) break;  // the replay stops here: the later steps are not taken
  }
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("layer_chain_grad_sums_", &layer_chain_grad_sums_cpu);
  m.impl("deltagrad_qn_step_", &deltagrad_qn_step_cpu);
  m.impl("deltagrad_qn_run_", &deltagrad_qn_run_cpu);
}

}  // namespace cpu
}  // namespace unlearn
