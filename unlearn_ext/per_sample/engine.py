"""sum_i clip_C(grad l_i) in float64 from one forward and one backward pass, per layer in closed form.

How a call runs (`ClippedSums.run`):
  1. forward hooks on every module that owns trainable parameters record its inputs and output;
  2. one backward of sum_i l_i gives each module's output gradient (row i = sample i's own, since
     the samples' losses are added, not averaged); parameter gradients are not computed;
  3. per-sample squared norms: each module adds its parameters' share (layers.py closed forms, or
     the fallback below), all in float64; clip factors c_i = min(1, C / ||g_i||);
  4. per module, the clipped sum sum_i c_i g_i, in float64 (for linear layers one matrix product).
The [b, d] per-sample gradient tensor is never built, except for the parameters of modules without a
closed form: those get per-sample gradients from torch.func (vmap of the module's vector-Jacobian
product at its recorded inputs and output gradients), one module at a time.
Models with tied parameters (one tensor owned by two modules) use vmap.py's whole-model path.
"""
from __future__ import annotations

import weakref
from functools import partial

import torch
from torch.func import functional_call, vjp, vmap

from .layers import Call, LayerForm, closed_form
from ..policy import refuse_training_batch_norm
from ..parameters import trainable
from .vmap import clipped_sum64_vmap, weighted_row_sum64


class _NeedsWholeModel(Exception):
    """A module's call cannot be handled per module (its output is not one tensor)."""


def per_sample_losses(loss_fn, outputs: torch.Tensor, targets) -> torch.Tensor:
    """One loss per sample, [b]. A loss module or function that reduces (mean, as
    F.cross_entropy by default) is called with reduction='none'; a loss with more than one value per
    sample (e.g. per position) is summed over them."""
    n = outputs.shape[0]
    if isinstance(loss_fn, torch.nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        saved, loss_fn.reduction = loss_fn.reduction, "none"
        try:
            losses = loss_fn(outputs, targets)
        finally:
            loss_fn.reduction = saved
    else:
        try:
            losses = loss_fn(outputs, targets, reduction="none")
        except TypeError:  # a per-sample loss function without the keyword
            losses = loss_fn(outputs, targets)
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(f"the loss must give one value per sample (shape [{n}] for a batch of {n}), got shape "
                         f"{tuple(losses.shape)}; pass a loss with reduction='none'")
    return losses.reshape(n, -1).sum(1)


class FallbackForm(LayerForm):
    """A module without a closed form: per-sample gradients of its own parameters by vmap over the
    module's vector-Jacobian product at each sample's recorded inputs and output gradient."""

    def __init__(self, module, names, subtree):
        super().__init__(module, names)
        self.subtree = subtree  # relative name -> full name, every trainable parameter below the module
        self.values: dict = {}
        self._per_sample = None

    def per_sample(self, calls) -> dict[str, torch.Tensor]:
        own = {role: self.values[full].detach() for role, full in self.names.items()}
        fixed = {rel: self.values[full].detach() for rel, full in self.subtree.items() if rel not in own}
        total = None
        for call in calls:
            n = call.grad_output.shape[0]
            dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else None
                         for a in call.args)

            def one(p, g, *args, call=call, dims=dims):
                args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args, dims))
                _, pull = vjp(lambda q: functional_call(self.module, {**q, **fixed}, args, call.kwargs), p)
                return pull(g.unsqueeze(0))[0]
            grads = vmap(one, in_dims=(None, 0, *dims))(own, call.grad_output, *call.args)
            total = grads if total is None else {k: total[k] + grads[k] for k in grads}
        return total

    def add_norms2(self, calls, norms2):
        self._per_sample = self.per_sample(calls)
        for g in self._per_sample.values():
            norms2 += g.reshape(g.shape[0], -1).double().pow(2).sum(1)
            self._note(g[0].numel())

    def add_sums(self, calls, c, sums):
        grads, self._per_sample = self._per_sample or self.per_sample(calls), None
        for role, g in grads.items():
            sums[self.names[role]] += weighted_row_sum64(g, c)
        self._note(c.numel())


class ClippedSums:
    """The per-module plan for one model and one set of trainable parameter names."""

    def __init__(self, model: torch.nn.Module, names):
        self.model = model
        own_params = dict(model.named_parameters())
        wanted = {id(own_params[k]) for k in names}
        owners: dict[int, int] = {}
        self.forms: list[LayerForm] = []
        for prefix, module in model.named_modules():
            mine = {}
            for role, p in module._parameters.items():
                if p is not None and id(p) in wanted:
                    owners[id(p)] = owners.get(id(p), 0) + 1
                    mine[role] = f"{prefix}.{role}" if prefix else role
            if not mine:
                continue
            form = closed_form(module, mine)
            if form is None:
                subtree = {rel: f"{prefix}.{rel}" if prefix else rel for rel, _ in module.named_parameters()
                           if (f"{prefix}.{rel}" if prefix else rel) in names}
                form = FallbackForm(module, mine, subtree)
            self.forms.append(form)
        self.batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        # Tied parameters: one gradient from several modules, whose norms do not add up per module.
        self.whole_model = any(count > 1 for count in owners.values())

    @property
    def closed_form_only(self) -> bool:
        return not self.whole_model and not any(isinstance(f, FallbackForm) for f in self.forms)

    @property
    def longest_sum(self) -> int:
        """The most terms any float64 sum of the last call added (the error bound's n)."""
        return max((f.longest_sum for f in self.forms), default=0)

    def run(self, loss_fn, x, y, clip_norm: float, values: dict, sums: dict) -> None:
        """sums[name] += sum over the rows of (x, y) of clipped per-sample gradients at `values`."""
        refuse_training_batch_norm(self.batch_norms, "per-sample gradients")
        calls: dict[int, list[Call]] = {id(f): [] for f in self.forms}

        def capture(form, module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                raise _NeedsWholeModel(type(module).__name__)
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            calls[id(form)].append(Call(args, kwargs, output))
            return output.clone()  # later in-place ops must not change the tensor we differentiate at

        handles = [f.module.register_forward_hook(partial(capture, f), with_kwargs=True) for f in self.forms]
        try:
            leaves = {k: v.detach().requires_grad_() for k, v in values.items()}
            with torch.enable_grad():
                losses = per_sample_losses(loss_fn, functional_call(self.model, leaves, (x,)), y)
        finally:
            for h in handles:
                h.remove()
        recorded = [c for f in self.forms for c in calls[id(f)]]
        with torch.enable_grad():
            grads = torch.autograd.grad(losses.sum(), [c.output for c in recorded], allow_unused=True)
        for c, g in zip(recorded, grads):
            c.grad_output = torch.zeros_like(c.output) if g is None else g
        self.reduce(calls, x.shape[0], clip_norm, values, sums)

    def reduce(self, calls: dict, n: int, clip_norm: float, values: dict, sums: dict) -> None:
        """Steps 3-4 from recorded calls (form id -> its module's calls, each with the output
        gradient of sum_i l_i over the n samples): sums[name] += the clipped sum."""
        used = [f for f in self.forms if calls[id(f)]]
        device = next(iter(sums.values())).device if sums else torch.device("cpu")
        norms2 = torch.zeros(n, dtype=torch.float64, device=device)
        for f in used:
            if isinstance(f, FallbackForm):
                f.values = values
            f.add_norms2(calls[id(f)], norms2)
        norms = norms2.sqrt_()
        self.last_norms = norms  # per-sample gradient norms of the last chunk (for tests and reports)
        c = torch.where(norms > clip_norm, clip_norm / norms, torch.ones_like(norms))
        for f in used:
            f.add_sums(calls[id(f)], c, sums)
            if isinstance(f, FallbackForm):
                f.values = {}


_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def plan_for(model: torch.nn.Module, names) -> ClippedSums:
    per_model = _PLANS.setdefault(model, {})
    key = tuple(names)
    if key not in per_model:
        per_model[key] = ClippedSums(model, key)
    return per_model[key]


def clipped_sum64(model, loss_fn, x, y, clip_norm: float, params=None, chunk: int = 4096,
                  out: dict | None = None) -> dict[str, torch.Tensor]:
    """sum_i clip_C(grad l_i) over the rows of (x, y), in float64, at parameter values `params`
    (name -> tensor; default the model's trainable parameters), `chunk` samples per forward pass.
    `out`: float64 tensors to write the sums into (reused between calls: no allocation)."""
    params = params or trainable(model)
    if out is None:
        out = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    else:
        for t in out.values():
            t.zero_()
    plan = plan_for(model, params)
    if not plan.whole_model:
        try:
            for s in range(0, x.shape[0], chunk):
                plan.run(loss_fn, x[s:s + chunk], y[s:s + chunk], clip_norm, params, out)
            return out
        except _NeedsWholeModel:
            plan.whole_model = True
            for t in out.values():
                t.zero_()
    for k, v in clipped_sum64_vmap(model, loss_fn, x, y, clip_norm, params, chunk).items():
        out[k].copy_(v)
    return out
