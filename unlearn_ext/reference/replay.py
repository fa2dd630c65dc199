"""Pure-PyTorch references of the DeltaGrad replay's per-step ops (ops/schemas.py): the arithmetic of
mini/layer_chain.py and of a quasi-Newton step of mini/deltagrad.py. The CPU kernels
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
