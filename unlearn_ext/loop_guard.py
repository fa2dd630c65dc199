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

At the first step the gradients are also compared with retraining's own (loss_probe.py: the
loss given to make_unlearnable, backpropagated on the schedule's first batch), which tells a
scaled loss, a term added to it or inputs changed in the loop, none of which a counter sees.

The gradient checks are off under DistributedDataParallel: its reducer writes the averaged gradients
into p.grad after the backward hooks, which the version counter cannot tell from a user's change.
The learning rate and training mode checks are agreed on every rank at every step (one int64 per
rank): a step leaving the recipe on one rank only is refused on every rank, naming it, rather than
left to the others to wait for in the next gradient all-reduce until the group's timeout.
"""
from __future__ import annotations

import torch

from .backward_passes import BackwardPasses
from .distributed.ddp import check_same_training_modes
from .distributed.group import agree
from .loss_probe import AutocastSeen, check_first_step
from .policy import changed_modes, training_modes


class LoopGuard:
    """Optimizer step hooks (and gradient hooks) on the user's optimizer and model that refuse a loop
    leaving the recipe. `step` is the schedule step the next optimizer.step() takes."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, initial: torch.nn.Module, recipe,
                 n: int, *, batches_per_epoch: int, ddp=None, first_batch_loss=None):
        """first_batch_loss: () -> retraining's loss of the schedule's first batch at the current
        weights (loss_probe.py), checked against the loop's first step; None: not checked."""
        self.model, self.optimizer, self.recipe, self.ddp = model, optimizer, recipe, ddp
        self._first_batch_loss = first_batch_loss
        # The autocast of the loop's forward, which the first step's recomputation repeats (until then).
        self._autocast = AutocastSeen(model) if first_batch_loss is not None and ddp is None else None
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
            self._passes = BackwardPasses(stepped, after_backward=keep)
            if keep is not None:
                ids = {id(p) for p in stepped}
                self._keeping = [p.register_post_accumulate_grad_hook(keep) for p in self._clipped if id(p) not in ids]

    # ---- the hooks -------------------------------------------------------------------------------

    def _keep(self, p: torch.Tensor) -> None:
        """A copy of the backward gradient (declared clipping): the step's gradient must be it, clipped."""
        self._backward_grads[id(p)] = p.grad.detach().clone()

    def _before_step(self, optimizer, args, kwargs) -> None:
        t = self.step
        if t >= self.total:
            raise RuntimeError(f"the loop takes more optimizer steps than the recipe's {self.recipe.epochs} epochs x "
                               f"{self.batches_per_epoch} batches = {self.total}: retraining and the history would "
                               "not match the schedule; pass the epochs the loop runs to make_unlearnable")
        if self.ddp is not None:
            self._check_rank_agreed(t)
            return
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
        if self._autocast is not None:
            self._autocast.remove()
            self._autocast = None
        self.step += 1
        if self.step < self.total:
            self._shadow_groups = next(self._scheduled)[1]

    # ---- the checks -------------------------------------------------------------------------------

    def _check_rank_agreed(self, t: int) -> None:
        """Under DDP, the checks whose inputs can differ between ranks, agreed on every rank: a rank
        refusing alone would leave the others waiting in the next step's gradient all-reduce until the
        group's timeout. A rank's learning rates (set by hand on one rank) and its later steps' training
        modes (a validation pass in eval mode on rank 0 only) can differ; the step count cannot (the
        ranks step together, held by DDP's all-reduce), so it is refused before, alone (a step on one
        rank alone after training, no backward with it, is refused there without waiting); the gradient
        checks are off (module docstring). One agreement of one int64 per rank and step (plus step 0's
        agreement on the modes, made by every rank first); the error texts cross only on a refusal."""
        if t == 0:
            modes = training_modes(self.model)
            check_same_training_modes(modes, self.ddp.group)
            self.recipe.train_modes = modes
        agree(lambda: self._check_learning_rates(t) or self._check_training_modes(t) or (), shared=(),
              group=self.ddp.group, failed=f"refused optimizer step {t}")

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
                        "loss) or a zero_grad(set_to_none=False) leaving zeros on a parameter the batch did not "
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

    def _check_first_loss(self) -> None:
        """The first step's backward gradients against retraining's (loss_probe.py); with declared
        clipping the copies taken before the clip, which _check_clipped held the step's to."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        loop = [self._backward_grads.get(id(p), p.grad).detach() for p in params]
        check_first_step(params, loop, self._names, self.model, self._first_batch_loss, self._autocast)

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
                    "change the gradients no other way (retraining clips the same)")

    # ---- the end of training ---------------------------------------------------------------------

    def check_finished(self) -> None:
        """The loop ran the recipe's steps; then the gradient hooks come off (the unlearner's own
        training runs on the same parameters with optimizers of its own). Under DDP checked on every rank together, so one rank's refusal is every
        rank's (the others would otherwise wait in the unlearner's first collective)."""
        if self.ddp is None:
            self._check_steps()
        else:
            agree(lambda: self._check_steps() or (), shared=(), group=self.ddp.group)
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
        if self._autocast is not None:
            self._autocast.remove()
            self._autocast = None
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
