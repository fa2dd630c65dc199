"""Holds the user's own training loop to the recipe that retraining will repeat.

`UnlearningEngine.make_unlearnable` captures a recipe (recipe.py) whose loop is, per scheduled
batch: zero_grad, one backward of the batch loss, optimizer.step, the scheduler stepped per step or
per epoch. Retraining, fine-tuning and every repair train with that recipe, so a user's loop that
does anything else makes every answer silently differ from retraining. What the loop does between
the wrapping and `unlearner()` cannot be seen before training; `LoopGuard` watches it through hooks
and refuses at the first optimizer step that leaves the recipe, before its update:

  * the step count: no more steps than the recipe's epochs x batches, and exactly that many when the
    unlearner is asked for (gradient accumulation, a skipped step, an early break, other epochs);
  * every param group's learning rate at step t equals the recipe's (a scheduler stepped in the loop
    but not given to make_unlearnable, one stepped per batch but declared per epoch, a hand-set lr);
  * every gradient the step uses was made by exactly one backward pass since the last step and left
    untouched (clip_grad_norm_, gradient scaling or noise, accumulation over several backwards, a
    gradient set to None, which the step would skip);
  * every module's training flag at step t equals step 0's, which the recipe keeps and retraining
    trains in (a model in eval mode or frozen BatchNorm is repeated as it is; a loop whose later
    steps run in other modes -- model.eval() for validation and no model.train() after it -- is not).
    Under DistributedDataParallel step 0's modes must also be the same on every rank (one recipe
    for all of them), agreed at step 0 and refused on every rank otherwise, naming the modules.
    A gradient is watched through its version counter, which every in-place change bumps, and its
    identity (a replaced gradient, p.grad = p.grad * 0.5, has a version counter of its own); a clip
    that happens not to change any value is refused too, since the loop could not be told apart.
    Declared clipping (make_unlearnable's clip_grad_norm=, repeated by retraining) is the one change
    allowed: clip_grad_norm_ writes each gradient exactly once (also when it does not clip), so the
    version counter must have moved by exactly one, and the values must be the backward's (a copy
    is kept) times the coefficient clip_grad_norm_ computes from them, to within the gradients'
    dtype rounding. Noise, a zeroed or rescaled gradient, another max_norm or norm are refused.
    Under a declared torch.amp.GradScaler (grad_scaler=) the backward's gradients are the scaled
    loss's and scaler.unscale_ divides p.grad in place without moving its counter: the copies are
    unscaled by the scale the backward ran at, so the clip is compared with the loss's own
    gradients; and a step the scaler skips (inf/NaN found: no optimizer.step, a lowered scale) is
    refused at the next step or at the end, naming it (retraining in float32 would take it).

At the first step the gradients are also compared with retraining's own (loss_probe.py: the
loss given to make_unlearnable, backpropagated on the schedule's first batch), which tells a
scaled loss, a term added to it or inputs changed in the loop, none of which a counter sees.

The gradient checks are off under DistributedDataParallel: its reducer writes the averaged gradients
into p.grad after the backward hooks, which the version counter cannot tell from a user's change.
A step a declared GradScaler skips is refused there too (every rank's scaler checks the same
averaged gradients, so every rank skips at the same step).
The learning rate, training mode and skip checks are agreed on every rank at every step (one int64
per rank; the skip check because the scaler is declared per rank): a step leaving the recipe on one rank only is refused on every rank, naming it, rather than
left to the others to wait for in the next gradient all-reduce until the group's timeout.
"""
from __future__ import annotations

import torch

from .backward_passes import BackwardPasses
from .distributed.ddp import check_same_training_modes
from .distributed.group import agree
from .loss_probe import ForwardSeen, check_first_step, unscale_factor, unscaled
from .policy import changed_modes, training_modes


class LoopGuard:
    """Optimizer step hooks (and gradient hooks) on the user's optimizer and model that refuse a loop
    leaving the recipe. `step` is the schedule step the next optimizer.step() takes."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, initial: torch.nn.Module, recipe,
                 n: int, *, batches_per_epoch: int, ddp=None, first_batch_loss=None, grad_scaler=None):
        """first_batch_loss: () -> retraining's loss of the schedule's first batch at the current
        weights (loss_probe.py), checked against the loop's first step; None: not checked.
        grad_scaler: the loop's torch.amp.GradScaler (None: none declared)."""
        self.model, self.optimizer, self.recipe, self.ddp = model, optimizer, recipe, ddp
        self._scaler = grad_scaler
        # The scaler's scale when the first backward since the last step ran (None: none yet): what
        # divides the kept copies, and what a skipped step's update() lowers.
        self._backward_scale: float | None = None
        self._inverses: dict = {}  # device -> float32(1 / _backward_scale) there
        self._first_batch_loss = first_batch_loss
        # The autocast and starting buffers of the loop's forward, which the first step's recomputation
        # repeats (noted until then).
        self._forward_seen = ForwardSeen(model) if first_batch_loss is not None and ddp is None else None
        self.total, self.batches_per_epoch = recipe.steps(n), batches_per_epoch
        self.step = 0
        # The recipe's own optimizer and scheduler over the initial copy, never stepped: they give the
        # learning rates retraining will use at each step (advanced in _after_step).
        self._scheduled = recipe.scheduled_param_groups(initial, self.total, batches_per_epoch)
        self._shadow_groups = next(self._scheduled)[1]  # step 0's (a recipe has at least one step)
        # The step hooks stay after training: a step past the recipe's last is refused then too.
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._backward_grads: dict[int, torch.Tensor] = {}  # id(param) -> a copy of its backward gradient (clipping)
        # What clip_grad_norm_(model.parameters(), ...) clips: every parameter with a gradient.
        self._clipped = [p for p in model.parameters() if p.requires_grad]
        # The stepped parameters' backward passes (None under DDP: no gradient check, module docstring),
        # and with declared clipping a copy of every clipped backward gradient: the others' norms count
        # in the clip too.
        self._passes, self._keeping = None, []
        if ddp is None:
            stepped = [p for group in optimizer.param_groups for p in group["params"]]
            keep = self._keep if recipe.clip_grad_norm is not None else None
            after = self._after_backward if keep is not None or grad_scaler is not None else None
            self._passes = BackwardPasses(stepped, after_backward=after)
            if keep is not None:
                ids = {id(p) for p in stepped}
                self._keeping = [p.register_post_accumulate_grad_hook(keep) for p in self._clipped if id(p) not in ids]
        elif grad_scaler is not None:  # under DDP the scale alone, for the skip check (the same on every rank:
            # the averaged gradients the scalers check are)
            self._keeping = [p.register_post_accumulate_grad_hook(self._note_scale)
                             for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    # ---- the hooks -------------------------------------------------------------------------------

    def _note_scale(self, p: torch.Tensor | None = None) -> None:
        """The scaler's scale at the first backward since the last step (its first gradient hook)."""
        if self._scaler is not None and self._backward_scale is None:
            # (a host sync on an accelerator, inside the backward, once per step; _check_not_skipped
            # reads the scale once more before each step, after scaler.step's own sync)
            self._backward_scale = self._scaler.get_scale()

    def _after_backward(self, p: torch.Tensor) -> None:
        self._note_scale()
        if self.recipe.clip_grad_norm is not None:
            self._keep(p)

    def _keep(self, p: torch.Tensor) -> None:
        """A copy of the backward gradient (declared clipping): the step's gradient must be it, clipped.
        Under a declared GradScaler the backward's gradient is the scaled loss's: the copy is unscaled
        as scaler.unscale_ unscales p.grad (times the float32 reciprocal of the scale, in place and
        without moving the version counter), so that the clip is compared with the loss's own gradients."""
        grad = p.grad.detach()
        if self._scaler is None:
            self._backward_grads[id(p)] = grad.clone()
            return
        self._note_scale()  # (a clipped parameter outside the optimizer may be reached first)
        inverse = self._inverses.get(grad.device)
        if inverse is None:  # unscale_'s own factor, float32(1 / scale), once per step and device
            inverse = unscale_factor(self._backward_scale, grad.device)
            self._inverses[grad.device] = inverse
        self._backward_grads[id(p)] = unscaled(grad, inverse)

    def _before_step(self, optimizer, args, kwargs) -> None:
        t = self.step
        if t >= self.total:
            raise RuntimeError(f"the loop takes more optimizer steps than the recipe's {self.recipe.epochs} epochs x "
                               f"{self.batches_per_epoch} batches = {self.total}: retraining and the history would "
                               "not match the schedule; pass the epochs the loop runs to make_unlearnable")
        if self.ddp is not None:
            self._check_rank_agreed(t)
            return
        self._check_not_skipped(t)
        self._check_learning_rates(t)
        self._check_training_modes(t)
        if self._passes is not None:
            self._check_gradients(t)
            if t == 0 and self._first_batch_loss is not None:
                self._check_first_loss()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._passes is not None:
            self._passes.clear()
        self._backward_grads.clear()
        self._backward_scale = None
        self._inverses.clear()
        if self._forward_seen is not None:
            self._forward_seen.remove()
            self._forward_seen = None
        self.step += 1
        if self.step < self.total:
            self._shadow_groups = next(self._scheduled)[1]

    # ---- the checks -------------------------------------------------------------------------------

    def _check_not_skipped(self, t: int) -> None:
        """A GradScaler that finds inf/NaN gradients skips optimizer.step() and lowers its scale
        (update(): backoff_factor < 1; it lowers it for nothing else), so a scale below the one of the
        first backward since the last step tells a skipped step t. Retraining trains in float32
        without a scaler: it would take step t, where the loop's scaled (float16) arithmetic
        overflowed, and nothing it could record would say where retraining without some items would
        overflow. Refused, at the next step (before its update) or when the unlearner is asked for."""
        if self._scaler is None or self._backward_scale is None:
            return
        now = self._scaler.get_scale()
        if now < self._backward_scale:
            raise RuntimeError(
                f"optimizer step {t} was skipped by the GradScaler: it found inf/NaN gradients at scale "
                f"{self._backward_scale:g} and lowered it to {now:g} without stepping; retraining trains in "
                "float32 without a scaler and takes every step, so it could not repeat the run. Start the "
                "scaler at a scale the loop's gradients do not overflow (torch.amp.GradScaler(init_scale=...), "
                "and a growth_interval it does not reach), use bfloat16 autocast, or train in float32")
    def _check_rank_agreed(self, t: int) -> None:
        """Under DDP, the checks whose inputs can differ between ranks, agreed on every rank: a rank
        refusing alone would leave the others waiting in the next step's gradient all-reduce until the
        group's timeout. A rank's learning rates (set by hand on one rank) and its later steps' training
        modes (a validation pass in eval mode on rank 0 only) can differ. The step count is refused
        before, alone: a step past the recipe's last is refused on every rank alike while their counts
        match, and a rank that skips optimizer.step() alone (its own check of the loss) meets the
        others' agreement with its next gradient all-reduce, which no agreement made inside the step
        can catch (gloo aborts on the mismatch; a hang before this agreement existed). The gradient
        checks are off (module docstring). One agreement of one int64 per rank and step (plus step 0's
        agreement on the modes, made by every rank first); the error texts cross only on a refusal."""
        if t == 0:
            modes = training_modes(self.model)
            check_same_training_modes(modes, self.ddp.group)
            self.recipe.train_modes = modes
        # (the skip check too: the declared scaler is a rank's own argument, one rank may lack it)
        agree(lambda: self._check_not_skipped(t) or self._check_learning_rates(t) or self._check_training_modes(t) or (),
              shared=(), group=self.ddp.group, failed=f"refused optimizer step {t}")

    def _check_learning_rates(self, t: int) -> None:
        mine = [float(g["lr"]) for g in self.optimizer.param_groups]
        recipe = [float(g["lr"]) for g in self._shadow_groups]
        if mine != recipe:
            raise RuntimeError(
                f"at optimizer step {t} the optimizer's learning rates are {mine}, the recipe's schedule gives "
                f"{recipe}: retraining would train with other rates. Pass the scheduler that changes them to "
                "make_unlearnable (scheduler=, with scheduler_step='step' if the loop steps it every batch, "
                "'epoch' if once per epoch) and do not set the lr by hand")

    def _check_training_modes(self, t: int) -> None:
        if t == 0:
            if self.ddp is None:  # (under DDP agreed on every rank before: _check_rank_agreed)
                self.recipe.train_modes = training_modes(self.model)
            return
        changed = changed_modes(self.recipe.train_modes, self.model)
        if changed:
            raise RuntimeError(
                f"optimizer step {t}: modules {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} are in "
                "another training mode than at step 0 (train() / eval()); retraining trains every step in step 0's "
                "modes and could not repeat it. Put the model back in its training modes before each epoch's steps "
                "(e.g. model.train() after a validation pass)")

    def _check_gradients(self, t: int) -> None:
        clip = self.recipe.clip_grad_norm
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(id(p), "a parameter")
                passes = self._passes.passes(p)
                if p.grad is None:
                    if passes:  # the step would skip the parameter; retraining steps it
                        raise RuntimeError(
                            f"optimizer step {t}: the gradient of {name} was removed (set to None) between "
                            "backward and step, so the step leaves it as it is; retraining steps it on the "
                            "backward's gradient and could not repeat it: keep the gradients the backward made")
                    continue
                if passes != 1:
                    raise RuntimeError(
                        f"optimizer step {t}: the gradient of {name} comes from {passes} backward passes since the "
                        "last step; the recipe retraining repeats runs exactly one per step (zero_grad, backward, "
                        "step). Gradient accumulation, a backward whose step was skipped (e.g. on a non-finite "
                        "loss, or by a GradScaler: pass it to make_unlearnable as grad_scaler=) or a "
                        "zero_grad(set_to_none=False) leaving zeros on a parameter the batch did not "
                        "reach cannot be repeated: step after every batch's backward")
                if self._passes.replaced(p):  # its own version counter could read as unchanged
                    raise RuntimeError(
                        f"optimizer step {t}: the loop replaced the gradient of {name} by another tensor between "
                        "backward and step (e.g. p.grad = p.grad * scale, p.grad = torch.clamp(p.grad, ...)); "
                        "retraining steps on the backward's gradient and could not repeat it. Remove the change "
                        "from the loop (declared clipping is clip_grad_norm=, written in place by "
                        "torch.nn.utils.clip_grad_norm_)")
                writes = self._passes.writes(p)
                if clip is None and writes != 0:
                    raise RuntimeError(
                        f"optimizer step {t}: the loop changed the gradient of {name} between backward and step "
                        "(e.g. torch.nn.utils.clip_grad_norm_, gradient scaling or added noise); retraining "
                        "steps on the backward's gradient and could not repeat it. Remove the change from the "
                        "loop, or declare a clip_grad_norm_(model.parameters(), max_norm) to make_unlearnable "
                        "(clip_grad_norm=max_norm; retrain, finetune, topk, randomk)")
                if clip is not None and writes != 1:  # clip_grad_norm_ writes every gradient once, clipping or not
                    raise RuntimeError(
                        f"optimizer step {t}: the gradient of {name} was written {writes} times between backward "
                        f"and step; with clip_grad_norm={clip:g} declared the loop must write it once, by "
                        f"torch.nn.utils.clip_grad_norm_(model.parameters(), {clip:g}), and change the gradients "
                        "no other way (retraining clips the same)")
        if clip is not None:
            self._check_clipped(t, clip)

    def _scaler_hint(self) -> str:
        if self._scaler is not None:
            return "; under the declared GradScaler, call scaler.unscale_(optimizer) before clip_grad_norm_"
        return ("; with a torch.amp.GradScaler, pass it to make_unlearnable (grad_scaler=) and call "
                "scaler.unscale_(optimizer) before the clip")

    def _check_first_loss(self) -> None:
        """The first step's backward gradients against retraining's (loss_probe.py); with declared
        clipping the copies taken before the clip, which _check_clipped held the step's to."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        loop = [self._backward_grads.get(id(p), p.grad).detach() for p in params]
        if self.recipe.clip_grad_norm is not None:
            hint = self._scaler_hint()
        elif self._scaler is None:  # (float16 gradients a scale keeps normal differ unscaled: the scale is needed)
            hint = "; with a torch.amp.GradScaler, pass it to make_unlearnable (grad_scaler=)"
        else:
            hint = ""
        # (the scale of the backward the loop's gradients came from, which the recomputation repeats)
        scale = self._backward_scale if self._backward_scale is not None else 1.0
        check_first_step(params, loop, self._names, self.model, self._first_batch_loss, self._forward_seen, hint=hint,
                         loss_scale=scale)

    def _check_clipped(self, t: int, clip: float) -> None:
        """Every gradient the step uses is the backward's times the coefficient clip_grad_norm_(
        model.parameters(), clip) computes, min(1, clip / (norm + 1e-6)) with norm the backward
        gradients' total 2-norm, both in the gradients' dtype as torch computes them (so a bf16
        model's rounding is the recipe's, not a change). Per gradient, the scale that fits it best
        must be that coefficient within a few roundings of the dtype (torch's other code paths and
        parameter orders round the norm differently), and every value must be the backward's times
        that scale within one rounding: noise, a zeroed or rescaled gradient, another max_norm are
        refused. One host sync for the whole step."""
        backward = [self._backward_grads[id(p)] for p in self._clipped if id(p) in self._backward_grads]
        if not backward:
            return
        norm = torch.nn.utils.get_total_norm(backward)  # clip_grad_norm_'s own computation, in its dtype
        coefficient = torch.clamp(clip / (norm + 1e-6), max=1.0).double()
        coarsest = max(torch.finfo(g.dtype).eps for g in backward)
        device = coefficient.device
        checked, fits, off = [], [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) not in self._backward_grads:
                    continue
                fit, values_off = _scaled_copy(self._backward_grads[id(p)], p.grad.detach(), coefficient)
                checked.append(p)
                fits.append(fit.to(device))
                off.append(values_off.to(device))
        if not checked:
            return
        fits_t = torch.stack(fits)
        scale_off = ~((fits_t - coefficient).abs() <= 4 * coarsest * coefficient)
        verdict = torch.cat([torch.stack([norm.isfinite().double().to(device), coefficient]), fits_t,
                             (scale_off | torch.stack(off)).double()]).tolist()
        finite, coefficient_value = verdict[0], verdict[1]
        fit_values, bad = verdict[2:2 + len(checked)], verdict[2 + len(checked):]
        if not finite:  # a non-finite backward: clip_grad_norm_ makes it NaN alike in retraining
            return
        for p, fit_value, is_bad in zip(checked, fit_values, bad):
            if is_bad:
                name = self._names.get(id(p), "a parameter")
                raise RuntimeError(
                    f"optimizer step {t}: the gradient of {name} is not the backward's clipped to the declared "
                    f"clip_grad_norm={clip:g} (clip_grad_norm_ scales it by {coefficient_value:.6g}; its closest "
                    f"scaling of the backward's is by {fit_value:.6g}, or it is no scaling at all, e.g. noise): "
                    "the loop must call "
                    f"torch.nn.utils.clip_grad_norm_(model.parameters(), {clip:g}) between backward and step, and "
                    f"change the gradients no other way (retraining clips the same){self._scaler_hint()}")

    # ---- the end of training ---------------------------------------------------------------------

    def check_finished(self) -> None:
        """The loop ran the recipe's steps; then the gradient hooks come off (the unlearner's own
        training runs on the same parameters with optimizers of its own). Under DDP checked on every rank together, so one rank's refusal is every
        rank's (the others would otherwise wait in the unlearner's first collective)."""
        if self.ddp is None:
            self._check_not_skipped(self.step)
            self._check_steps()
        else:
            agree(lambda: self._check_not_skipped(self.step) or self._check_steps() or (), shared=(), group=self.ddp.group)
        self._stop_watching_gradients()

    def _check_steps(self) -> None:
        if self.step != self.total:
            raise RuntimeError(f"training took {self.step} optimizer steps; the recipe ({self.recipe.epochs} "
                               f"epochs of {self.batches_per_epoch} batches) has {self.total}: finish the epochs "
                               "given to make_unlearnable before asking for the unlearner (and step once per batch)")

    def _stop_watching_gradients(self) -> None:
        if self._passes is not None:
            self._passes.remove()
            self._passes = None  # (and no gradient check from here on)
        if self._forward_seen is not None:
            self._forward_seen.remove()
            self._forward_seen = None
        for handle in self._keeping:
            handle.remove()
        self._keeping = []


def _scaled_copy(before: torch.Tensor, after: torch.Tensor,
                 otherwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether `after` is `before` times one scale, rounded to after's dtype: the least-squares scale
    (`otherwise` where before is all zero) and whether some value is not before x that scale within
    one rounding of the dtype (plus its smallest normal, for values rounded into subnormals)."""
    before, wide = before.double(), after.double()
    squares = before.square().sum()
    fit = torch.where(squares > 0, (wide * before).sum() / squares, otherwise.to(squares.device))
    expected = fit * before
    dtype = torch.finfo(after.dtype)
    # "not within" rather than "beyond", so that a NaN the loop wrote counts as off
    return fit, ~((wide - expected).abs() <= 2 * dtype.eps * expected.abs() + dtype.tiny).all()
