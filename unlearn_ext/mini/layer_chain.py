"""The mean loss gradient of a chain of Linear layers and elementwise activations under the default
cross-entropy, written out as the backward pass autograd would run, without building a graph.

A replay that takes a gradient on a handful of rows at every recorded step (DeltaGrad) spends most
of a small model's gradient call in autograd's bookkeeping (recording the graph, the engine's
queue, one Python frame per module), not in arithmetic. For the models it covers, `LayerChain`
calls the same kernels autograd's backward calls (nll_loss's backward at the targets,
_log_softmax_backward_data, tanh/sigmoid/threshold_backward from the layer outputs, the two
products and the row sum of each Linear) straight from the forward pass's tensors, so the numbers
are autograd's (tests/test_layer_chain.py compares both, in float32 and float64) at a fraction of
the calls.

Covered: an nn.Linear, or an nn.Sequential (the class itself, not a subclass with its own forward)
of nn.Linear, nn.Tanh, nn.Sigmoid and nn.ReLU, without hooks, every parameter trainable, with the
TrainingData's default per-sample cross-entropy on in-memory 2-D inputs of the parameters' dtype
and int64 class targets in range. `LayerChain.of` returns None for anything else, and the caller
keeps autograd.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import TrainingData, per_sample_cross_entropy

# activation -> its backward from the layer's output (autograd's formula for each)
_ACTIVATIONS = {
    nn.Tanh: lambda grad, out: torch.ops.aten.tanh_backward(grad, out),
    nn.Sigmoid: lambda grad, out: torch.ops.aten.sigmoid_backward(grad, out),
    nn.ReLU: lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0),
}
_FORWARD = {nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.ReLU: torch.relu}


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


class LayerChain:
    def __init__(self, layers: list):
        # (weight, bias or None) for a Linear, an activation class otherwise, in order: read once, so a
        # call spends no module attribute look-ups
        self.layers = layers

    @classmethod
    def of(cls, module: nn.Module, params: list, data: TrainingData) -> "LayerChain | None":
        """The chain of `module` (whose trainable parameters, in flat order, are `params`), or None
        where it is not covered (module docstring)."""
        if data.loss is not per_sample_cross_entropy or not data.in_memory:
            return None
        children = [module] if type(module) is nn.Linear else \
            list(module) if type(module) is nn.Sequential and not _has_hooks(module) else None
        if not children or type(children[-1]) is not nn.Linear:
            return None
        layers, order = [], []
        for child in children:
            if _has_hooks(child):
                return None
            if type(child) is nn.Linear:
                order += [child.weight] + ([child.bias] if child.bias is not None else [])
                layers.append((child.weight, child.bias))
            elif type(child) in _ACTIVATIONS:  # (an in-place ReLU: the same values and gradient)
                layers.append(type(child))
            else:
                return None
        if len(order) != len(params) or any(p is not q for p, q in zip(order, params)):
            return None  # a frozen parameter, or parameters outside the chain
        x, y = data.inputs, data.targets
        if x.dim() != 2 or x.dtype != params[0].dtype or y.dim() != 1 or y.dtype != torch.int64 or not len(y) \
                or int(y.min()) < 0 or int(y.max()) >= children[-1].out_features:
            return None
        return cls(layers)

    def loss_grad_sums(self, x: torch.Tensor, y: torch.Tensor, split: int | None = None) -> list:
        """The gradient (one tensor per parameter, in flat order) of the summed per-sample losses of
        rows (x, y); with `split` = k, two such lists: rows [:k] and rows [k:], from one forward pass."""
        with torch.no_grad():
            outputs = [x]
            for layer in self.layers:
                outputs.append(_FORWARD[layer](outputs[-1]) if type(layer) is type else
                               nn.functional.linear(outputs[-1], *layer))
            logp = torch.log_softmax(outputs[-1], 1)
            # d(sum of nll)/d logp: -1 at each row's target (nll_loss's backward with ones upstream)
            grad = torch.zeros_like(logp).scatter_(1, y.unsqueeze(1), -1.0)
            grad = torch._log_softmax_backward_data(grad, logp, 1, logp.dtype)
            parts = [[]] if split is None else [[], []]
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                if type(layer) is type:
                    grad = _ACTIVATIONS[layer](grad, outputs[i + 1])
                    continue
                weight, bias = layer
                if split is None:
                    pieces = ((parts[0], grad, outputs[i]),)
                else:
                    pieces = ((parts[0], grad[:split], outputs[i][:split]), (parts[1], grad[split:], outputs[i][split:]))
                for part, g, below in pieces:
                    if bias is not None:
                        part.append(g.sum(0))
                    part.append(torch.mm(below.t(), g).t())  # addmm's backward: (x^T grad)^T
                if i:
                    grad = torch.mm(grad, weight)
            return parts[0][::-1] if split is None else [parts[0][::-1], parts[1][::-1]]
