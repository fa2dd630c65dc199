"""Closed forms of per-sample gradient norms and clipped sums, one class per layer family.

Every form sees, for each call of its module in the forward pass, the module's input(s) and the
gradient of sum_i l_i with respect to its output (so row i of that gradient is sample i's own output
gradient b_i). From those it computes, without building the per-sample gradients [b, d]:

* `add_norms2(calls, norms2)`: norms2[i] += ||grad of l_i w.r.t. this module's parameters||^2;
* `add_sums(calls, c, sums)`:   sums[name] += sum_i c_i * grad of l_i w.r.t. parameter `name`.

Everything is computed in float64 from the (float32) factors: a product of two float32 values is
exact in float64, so only the additions round (engine.py gives the error bound).

Linear (and the unfolded convolution): a sample's weight gradient is sum_t b_t a_t^T over its
positions t (T = 1 without a sequence dimension), so
    ||g||^2 = ||a||^2 ||b||^2                       (T = 1)
            = sum_{t,s} (a_t . a_s)(b_t . b_s)      (the Gram form, when T^2 <= d_in * d_out)
and otherwise the sample's [d_out, d_in] gradient is formed a few samples at a time; the clipped sum
is one float64 matrix product, (B diag(c))^T A over all samples and positions.
Embedding: a sample's gradient has row v = sum of b_t over its positions with index v.
LayerNorm / GroupNorm: the affine parameters' gradients are per-channel sums of b * x_hat (and of b),
with x_hat recomputed in float64 from the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Call:
    """One call of a module during the forward pass: its positional inputs and keyword inputs (as
    given), and the gradient of the summed per-sample loss w.r.t. its output."""
    args: tuple
    kwargs: dict
    output: torch.Tensor
    grad_output: torch.Tensor | None = None


class Workspace:
    """float64 buffers reused from call to call (a fresh multi-megabyte allocation page-faults on
    every step; docs/design.md §9). `get(key, shape)` returns a view of a buffer kept for `key`."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, key, shape, device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = torch.empty(n, dtype=torch.float64, device=device)
            self._buffers[key] = buf
        return buf[:n].view(shape)

    def double(self, key, t: torch.Tensor) -> torch.Tensor:
        """t converted to float64 into the buffer for `key` (exact for float32/16 inputs)."""
        out = self.get(key, tuple(t.shape), t.device)
        out.copy_(t)
        return out


@dataclass
class LayerForm:
    """A module's trainable parameters: role ('weight', 'bias') -> full parameter name."""
    module: torch.nn.Module
    names: dict
    workspace: Workspace = field(default_factory=Workspace)

    # Longest float64 reduction (terms summed) any output of this form involves, for the error
    # bound in engine.py; set by add_norms2 / add_sums.
    longest_sum: int = 0

    def _note(self, n: int) -> None:
        self.longest_sum = max(self.longest_sum, int(n))


# ---- linear and convolutions (as unfolded linear maps) -------------------------------------------------

# Samples whose [d_out, d_in] gradients are formed at once when the Gram form would cost more.
_GRAD_ELEMENTS_AT_ONCE = 1 << 22


class LinearForm(LayerForm):
    """nn.Linear: input [b, ..., d_in], output [b, ..., d_out]."""
    _prepared = None

    def factors(self, calls: list[Call]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float64: [b, T, d_in] inputs and [b, T, d_out] output gradients, the positions
        of every call concatenated (a module called twice contributes both calls to the gradient)."""
        a = [self.inputs(c) for c in calls]
        b = [self.grads(c) for c in calls]
        a = a[0] if len(a) == 1 else torch.cat(a, 1)
        b = b[0] if len(b) == 1 else torch.cat(b, 1)
        return self.workspace.double("A", a), self.workspace.double("B", b)

    def inputs(self, call: Call) -> torch.Tensor:
        x = call.args[0]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def grads(self, call: Call) -> torch.Tensor:
        g = call.grad_output
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def add_norms2(self, calls, norms2):
        A, B = self._prepared = self.factors(calls)  # reused by add_sums (same calls, same step)
        n, T, d_in = A.shape
        d_out = B.shape[2]
        if "weight" in self.names:
            if T == 1:
                a2 = torch.linalg.vecdot(A[:, 0], A[:, 0])
                b2 = torch.linalg.vecdot(B[:, 0], B[:, 0])
                norms2 += a2 * b2
                self._note(max(d_in, d_out))
            elif T * T <= d_in * d_out:
                ga = torch.bmm(A, A.transpose(1, 2))
                gb = torch.bmm(B, B.transpose(1, 2))
                norms2 += torch.linalg.vecdot(ga.reshape(n, -1), gb.reshape(n, -1))
                self._note(max(d_in, d_out) + T * T)
            else:
                step = max(1, _GRAD_ELEMENTS_AT_ONCE // (d_in * d_out))
                for s in range(0, n, step):
                    g = torch.bmm(B[s:s + step].transpose(1, 2), A[s:s + step])
                    norms2[s:s + step] += g.reshape(g.shape[0], -1).pow(2).sum(1)
                self._note(T + d_in * d_out)
        if "bias" in self.names:
            bs = B.sum(1)
            norms2 += torch.linalg.vecdot(bs, bs)
            self._note(T + d_out)

    def add_sums(self, calls, c, sums):
        A, B = self._prepared if self._prepared is not None else self.factors(calls)
        self._prepared = None
        n, T, d_in = A.shape
        d_out = B.shape[2]
        scaled = self.workspace.get("Bc", tuple(B.shape), B.device)
        torch.mul(B, c.view(n, 1, 1), out=scaled)
        if "weight" in self.names:
            w = sums[self.names["weight"]]
            w.view(d_out, -1).addmm_(scaled.view(n * T, d_out).t(), A.view(n * T, d_in))
            self._note(n * T + 1)
        if "bias" in self.names:
            sums[self.names["bias"]].view(-1).add_(scaled.view(n * T, d_out).sum(0))
            self._note(n * T + 1)


class ConvForm(LinearForm):
    """nn.Conv1d / nn.Conv2d with groups = 1, zero padding given as numbers: the convolution is a
    linear map on the unfolded input (im2col), [b, L, d_in * kernel] -> [b, L, d_out]."""

    @staticmethod
    def supports(m) -> bool:
        return (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and m.weight.dim() in (3, 4))

    def inputs(self, call: Call) -> torch.Tensor:
        m, x = self.module, call.args[0]
        if m.weight.dim() == 3:  # Conv1d as a height-1 Conv2d
            x = x.unsqueeze(2)
            k, d, p, s = (1, m.kernel_size[0]), (1, m.dilation[0]), (0, m.padding[0]), (1, m.stride[0])
        else:
            k, d, p, s = m.kernel_size, m.dilation, m.padding, m.stride
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [b, d_in * kernel, L]
        return cols.transpose(1, 2)

    def grads(self, call: Call) -> torch.Tensor:
        g = call.grad_output
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


# ---- embedding --------------------------------------------------------------------------------------

class EmbeddingForm(LayerForm):
    """nn.Embedding without max_norm or scale_grad_by_freq: indices [b, ...], output [b, ..., dim]."""
    _prepared = None

    @staticmethod
    def supports(m) -> bool:
        return m.max_norm is None and not m.scale_grad_by_freq

    def factors(self, calls):
        idx = torch.cat([c.args[0].reshape(c.args[0].shape[0], -1) for c in calls], 1)
        g = torch.cat([c.grad_output.reshape(idx.shape[0], -1, c.grad_output.shape[-1]) for c in calls], 1)
        B = self.workspace.double("B", g)
        if self.module.padding_idx is not None:  # that row's gradient is zero
            B.mul_((idx != self.module.padding_idx).unsqueeze(2))
        return idx, B

    def add_norms2(self, calls, norms2):
        idx, B = self._prepared = self.factors(calls)
        n, T, dim = B.shape
        rows = self.module.num_embeddings
        key = torch.arange(n, device=idx.device).unsqueeze(1) * rows + idx
        unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
        per_row = torch.zeros(unique.numel(), dim, dtype=torch.float64, device=B.device)
        per_row.index_add_(0, inverse, B.reshape(-1, dim))
        norms2.index_add_(0, unique // rows, torch.linalg.vecdot(per_row, per_row))
        self._note(T + dim)

    def add_sums(self, calls, c, sums):
        idx, B = self._prepared if self._prepared is not None else self.factors(calls)
        self._prepared = None
        n, T, dim = B.shape
        B.mul_(c.view(n, 1, 1))
        sums[self.names["weight"]].index_add_(0, idx.reshape(-1), B.reshape(-1, dim))
        self._note(n * T + 1)


# ---- normalization layers: affine parameters ------------------------------------------------------

class NormForm(LayerForm):
    """LayerNorm / GroupNorm's elementwise affine parameters: per-sample gradients are [b, channels]
    (the size of one activation row, never [b, d]): weight: sum over positions of b * x_hat, bias:
    sum of b."""

    def normalized(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, b) in float64, both [b, channels, positions]."""
        raise NotImplementedError

    def per_sample(self, calls):
        gw, gb = 0, 0
        for c in calls:
            xhat, g = self.normalized(c.args[0], self.workspace.double("B", c.grad_output))
            gw = gw + (g * xhat).sum(2)
            gb = gb + g.sum(2)
            self._note(xhat.shape[2] * len(calls))
        return gw, gb

    def add_norms2(self, calls, norms2):
        gw, gb = self.per_sample(calls)
        if "weight" in self.names:
            norms2 += torch.linalg.vecdot(gw, gw)
        if "bias" in self.names:
            norms2 += torch.linalg.vecdot(gb, gb)
        self._note(gw.shape[1])

    def add_sums(self, calls, c, sums):
        gw, gb = self.per_sample(calls)
        for role, g in (("weight", gw), ("bias", gb)):
            if role in self.names:
                sums[self.names[role]].view(-1).add_(c @ g)
        self._note(c.numel() + 1)


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dimension, in float64 (biased variance, as the layers)."""
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


class LayerNormForm(NormForm):
    def normalized(self, x, g):
        width = math.prod(self.module.normalized_shape)
        xhat = _standardize(x.double().reshape(x.shape[0], -1, width), self.module.eps)
        return xhat.transpose(1, 2), g.reshape(xhat.shape).transpose(1, 2)


class GroupNormForm(NormForm):
    def normalized(self, x, g):
        n, channels = x.shape[0], x.shape[1]
        xhat = _standardize(x.double().reshape(n, self.module.num_groups, -1), self.module.eps)
        return xhat.reshape(n, channels, -1), g.reshape(n, channels, -1)


def closed_form(module: torch.nn.Module, names: dict) -> LayerForm | None:
    """The closed form for `module`'s trainable parameters `names` (role -> full name), or None."""
    if set(names) - {"weight", "bias"}:
        return None
    if type(module) is torch.nn.Linear:
        return LinearForm(module, names)
    if type(module) in (torch.nn.Conv1d, torch.nn.Conv2d) and ConvForm.supports(module):
        return ConvForm(module, names)
    if type(module) is torch.nn.Embedding and EmbeddingForm.supports(module):
        return EmbeddingForm(module, names)
    if type(module) is torch.nn.LayerNorm:
        return LayerNormForm(module, names)
    if type(module) is torch.nn.GroupNorm:
        return GroupNormForm(module, names)
    return None
