"""Pure-PyTorch references of the DeltaGrad replay's per-step ops (ops/schemas.py): the arithmetic of
mini/layer_chain.py, of a quasi-Newton step of mini/deltagrad.py, and of a run of such steps. The CPU kernels
(csrc/cpu/replay_cpu.cpp) issue the same ATen calls in the same order from C++, so both give the
same numbers; this serves every other device."""
from __future__ import annotations

import torch

from ..chain_format import LINEAR, RELU, SIGMOID, TANH

# activation code -> its forward, and its backward from the layer's output (autograd's own kernels)
FORWARD = {TANH: torch.tanh, SIGMOID: torch.sigmoid, RELU: torch.relu}
BACKWARD = {
    TANH: lambda grad, out: torch.ops.aten.tanh_backward.default(grad, out),
    SIGMOID: lambda grad, out: torch.ops.aten.sigmoid_backward.default(grad, out),
    RELU: lambda grad, out: torch.ops.aten.threshold_backward.default(grad, out, 0),
}


def layer_chain_grad_sums_(out, x, y, weights, biases, layers, split) -> None:
    """out[0] (split -1), or out[0] and out[1] (rows [:split] and [split:]) <- the gradient of the
    summed cross-entropies of rows (x, y) through the chain, per Linear its weight's then its bias's."""
    # Each output's (weight grad, bias grad or None) views per Linear, in flat order.
    sizes = [t.numel() for weight, bias in zip(weights, biases) for t in (weight, bias) if t is not None]
    views = []
    for vector in out:
        parts = iter(vector.split(sizes))
        views.append([(next(parts).view(weight.shape), None if bias is None else next(parts))
                      for weight, bias in zip(weights, biases)])
    outputs, linear = [x.flatten(1)], 0  # outputs[i]: the input of layer i
    for code in layers:
        if code == LINEAR:
            outputs.append(torch.nn.functional.linear(outputs[-1], weights[linear], biases[linear]))
            linear += 1
        else:
            outputs.append(FORWARD[code](outputs[-1]))
    # d(sum of cross-entropies)/d logits: softmax minus each row's one-hot target
    grad = torch.softmax(outputs[-1], 1)
    grad.scatter_add_(1, y.unsqueeze(1), torch.full((len(y), 1), -1.0, dtype=grad.dtype, device=grad.device))
    for i in reversed(range(len(layers))):
        if layers[i] != LINEAR:
            grad = BACKWARD[layers[i]](grad, outputs[i + 1])
            continue
        linear -= 1
        below = outputs[i]
        halves = [(grad, below)] if split == -1 else [(grad[:split], below[:split]), (grad[split:], below[split:])]
        for own, (g, b) in zip(views, halves):
            weight_grad, bias_grad = own[linear]
            torch.mm(g.t(), b, out=weight_grad)
            if bias_grad is not None:
                torch.sum(g, 0, out=bias_grad)
        if i != 0:
            grad = torch.mm(grad, weights[linear])


def deltagrad_qn_step_(w, buffer, dw, recorded, W, P, sigma, predicted, g_removed, removed_alpha, scale, weight_decay,
                       lr, momentum, nesterov, start_buffer) -> torch.Tensor:
    """One quasi-Newton step of the DeltaGrad replay on w (and the momentum buffer), in place; returns
    sum(w) in float64 (ops/schemas.py)."""
    if predicted is None:
        v = dw.double()
        predicted = torch.addmv(v, W, P @ v, beta=sigma, alpha=-1.0)  # sigma v - W M^-1 W^T v
    direction = predicted.float().mul_(scale)  # (in place: float64 -> float32 made a new tensor)
    if g_removed is not None:
        direction.add_(g_removed, alpha=removed_alpha)
    if weight_decay:
        direction.add_(w, alpha=weight_decay)
    if buffer is None:
        w.add_(direction, alpha=-lr)
        w.add_(recorded)
    else:  # torch.optim.SGD's momentum (dampening 0)
        direction.add_(recorded)
        if start_buffer:
            buffer.copy_(direction)
        else:
            buffer.mul_(momentum).add_(direction)
        w.sub_((direction + buffer * momentum) * lr if nesterov else buffer * lr)
    return w.sum(dtype=torch.float64)


def deltagrad_qn_run_(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales, removed_alphas,
                      shapes, layers, W, P, sigma, weight_decay, momentum, nesterov, start_buffer) -> torch.Tensor:
    """The quasi-Newton steps of a run, each as the replay takes it (ops/schemas.py): the removed rows'
    gradient from the chain at w (copied into chain_weights, whose views are the chain's layers), the
    recorded gradient's term, then deltagrad_qn_step_. Returns each step's sum(w) in float64, NaN
    after the first non-finite one."""
    weights, biases, at = [], [], 0
    for out, inp, bias in zip(shapes[0::3], shapes[1::3], shapes[2::3]):
        weights.append(chain_weights[at:at + out * inp].view(out, inp))
        at += out * inp
        biases.append(chain_weights[at:at + out] if bias else None)
        at += out if bias else 0
    sums = torch.full((len(counts),), float("nan"), dtype=torch.float64, device=w.device)
    rows = iter(zip(x, y))
    for i, count in enumerate(counts):
        dw = w - recorded_w[i]
        g_removed = None
        if count:
            chain_weights.copy_(w)
            layer_chain_grad_sums_([grad], *next(rows), weights, biases, layers, -1)
            g_removed = grad / count
        recorded = recorded_g[i] * (scales[i] if buffer is not None else -lrs[i] * scales[i])
        sums[i] = deltagrad_qn_step_(w, buffer, dw, recorded, W, P, sigma, None, g_removed, removed_alphas[i],
                                     scales[i], weight_decay, lrs[i], momentum, nesterov, start_buffer and i == 0)
        if not torch.isfinite(sums[i]):
            break
    return sums
