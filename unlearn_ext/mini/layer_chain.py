"""The mean loss gradient of a chain of Linear layers and elementwise activations under the default
cross-entropy, as explicit backward-pass arithmetic, without building autograd's graph.

A replay that takes a gradient on a handful of rows at every recorded step (DeltaGrad) spends most
of a small model's gradient call in autograd's bookkeeping (recording the graph, the engine's
queue, one Python frame per module), not in arithmetic. For the models it covers, `LayerChain`
computes the same backward pass from the forward pass's tensors: softmax minus the one-hot targets
at the logits, autograd's own tanh/sigmoid/threshold_backward kernels from the layer outputs, and
for each Linear grad^T x and the row sum of grad, written straight into one flat output vector.
About half the tensor operations of the autograd call (no graph, no concatenation after), issued
by one op call (ops.layer_chain_grad_sums_: from C++ on the CPU, the reference on other devices)
instead of one Python call each; the numbers equal autograd's up to float rounding (tests/test_layer_chain.py compares both, in float32
and float64).

Covered: an nn.Linear, or an nn.Sequential (the class itself, not a subclass with its own forward)
of nn.Linear, nn.Tanh, nn.Sigmoid and nn.ReLU, optionally led by one nn.Flatten() with its default
dims (start_dim=1, end_dim=-1), without hooks (their own or global ones) or a forward set on an
instance, every parameter trainable; under cross-entropy with torch's defaults: the TrainingData's
own per-sample loss, or the engine's per-sample form (policy.PerSampleLoss) of nn.CrossEntropyLoss
(no class weights, ignore_index -100, no label smoothing, any reduction; no hooks) or of
F.cross_entropy; on rows whose inputs are of the parameters' dtype and 2-D (after the leading
Flatten, of the first Linear's width) and whose targets are int64 class indices, 1-D, in range.
In-memory data are checked once (`of`); a dataset's rows only exist once loaded, so they are checked
batch by batch (`takes`). `LayerChain.of` returns None for anything else, and the caller keeps
autograd; a batch `takes` refuses sends the caller to autograd too (mini/replay_model.py), which
computes, or refuses, it as it always did: never the chain's arithmetic on rows it does not state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import TrainingData, per_sample_cross_entropy
from ..policy import PerSampleLoss
from .. import ops
from .. import chain_format

# activation class -> its code in ops.layer_chain_grad_sums_
_ACTIVATIONS = {nn.Tanh: chain_format.TANH, nn.Sigmoid: chain_format.SIGMOID, nn.ReLU: chain_format.RELU}


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` may run more than its class's forward: its own hooks, or a forward
    set on the instance (model[1].forward = ...)."""
    return "forward" in vars(module) or any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _is_default_cross_entropy(loss) -> bool:
    """Whether the per-sample loss `loss` is cross-entropy with torch's defaults (module docstring):
    the chain's softmax-minus-one-hot is its gradient exactly on in-range targets."""
    if loss is per_sample_cross_entropy:
        return True
    batch = loss.batch_loss if type(loss) is PerSampleLoss else None
    if batch is nn.functional.cross_entropy:
        return True
    return (type(batch) is nn.CrossEntropyLoss and not _has_hooks(batch) and batch.weight is None
            and batch.ignore_index == -100 and batch.label_smoothing == 0.0)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (register_module_forward_hook and the like) are set."""
    from torch.nn.modules import module as registry
    return any(getattr(registry, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


class LayerChain:
    def __init__(self, layers: list, dtype: torch.dtype, flatten: bool, classes: int, rows_checked: bool):
        # layers: (weight, bias or None) for a Linear, an activation class otherwise, in order. Turned
        # once into the op's arguments, so that a call spends its time in the products, not in
        # looking up what each layer is (a replay calls this once or twice per recorded step).
        linears = [layer for layer in layers if type(layer) is not type]
        # What `fits` checks rows against; rows_checked: in-memory data, every row checked by `of`
        self.dtype, self.flatten, self.classes = dtype, flatten, classes
        self.width, self.rows_checked = linears[0][0].shape[1], rows_checked  # (the first Linear's in_features)
        # (detached: the same memory, so the op reads the current weights, and no autograd history
        # for its outputs: the parameters require grad)
        self.weights = [weight.detach() for weight, _ in linears]
        self.biases = [None if bias is None else bias.detach() for _, bias in linears]
        self.layers = [chain_format.LINEAR if type(layer) is not type else _ACTIVATIONS[layer] for layer in layers]
        size = sum(t.numel() for weight, bias in linears for t in (weight, bias) if t is not None)
        # The op writes the gradients straight into these flat vectors: a call fills the first, a
        # split call both, so the second comes with the first split call (many replays make none).
        self.outputs = [torch.empty(size, dtype=dtype)]

    @classmethod
    def of(cls, module: nn.Module, params: list, data: TrainingData) -> "LayerChain | None":
        """The chain of `module` (whose trainable parameters, in flat order, are `params`), or None
        where it is not covered (module docstring)."""
        if not _is_default_cross_entropy(data.loss) or _global_hooks():
            return None
        children = [module] if type(module) is nn.Linear else \
            list(module) if type(module) is nn.Sequential and not _has_hooks(module) else None
        flatten = bool(children) and type(children[0]) is nn.Flatten
        if flatten:
            if _has_hooks(children[0]) or (children[0].start_dim, children[0].end_dim) != (1, -1):
                return None
            children = children[1:]
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
                return None  # (an nn.Flatten here too: only a leading one is covered)
        if len(order) != len(params) or any(p is not q for p, q in zip(order, params)):
            return None  # a frozen parameter, or parameters outside the chain
        chain = cls(layers, params[0].dtype, flatten, children[-1].out_features, data.in_memory)
        if data.in_memory and not chain.fits(data.inputs, data.targets):
            return None
        return chain

    def fits(self, x, y) -> bool:
        """Whether rows (x, y) are ones the chain computes (module docstring): inputs of the
        parameters' dtype, 2-D after the leading Flatten (if any) and of the first Linear's width;
        int64 1-D class targets in range, one per row."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dtype != self.dtype:
            return False
        if not (x.dim() >= 2 if self.flatten else x.dim() == 2) or x.shape[1:].numel() != self.width:
            return False
        if y.dim() != 1 or y.dtype != torch.int64 or not len(y) or len(y) != len(x):
            return False
        low, high = torch.aminmax(y)
        return int(low) >= 0 and int(high) < self.classes

    def takes(self, x, y) -> bool:
        """Whether the chain computes the gradient of rows (x, y) of its data: in-memory rows were
        checked once (`of`), a dataset's are checked here, batch by batch."""
        return self.rows_checked or self.fits(x, y)

    def loss_grad_sums(self, x: torch.Tensor, y: torch.Tensor, split: int | None = None):
        """The gradient of the summed per-sample losses of rows (x, y) as one flat vector (the
        parameters in flat order); with `split` = k, two: rows [:k] and rows [k:], from one forward
        pass. The vectors are this chain's own, overwritten by the next call: use them before.
        One op call (ops.layer_chain_grad_sums_: the backward pass as explicit arithmetic, in C++ on
        the CPU), not one Python call per tensor operation."""
        if split is not None and len(self.outputs) < 2:
            self.outputs.append(torch.empty_like(self.outputs[0]))
        out = self.outputs[:1] if split is None else self.outputs
        ops.layer_chain_grad_sums_(out, x, y, self.weights, self.biases, self.layers, -1 if split is None else split)
        return out[0] if split is None else (out[0], out[1])
