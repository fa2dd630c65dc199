"""Mixed precision in the user's loop: torch.amp's recipe with clipping (GradScaler, scaler.unscale_,
clip_grad_norm_, scaler.step, scaler.update) under make_unlearnable(..., clip_grad_norm=max_norm,
grad_scaler=scaler). The guard holds the clip to the UNSCALED backward gradients (the scaler's
scale at the backward divides the kept copies as unscale_ divides p.grad); a step the scaler skips
(inf/NaN gradients) is refused, naming the step, since retraining in float32 takes every step.
Controls: the plain loop, GradScaler without clipping, clipping without GradScaler (test_user_loop_clipping.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from user_models import LazyImages, cnn, flat, same_state, scaled_step

N, BATCH, EPOCHS = 48, 16, 2
SMALL, LARGE = 0.05, 1e6  # a max_norm that clips every step, and one that never does


def wrap(method="retrain", clip_grad_norm=None, declare=True, scaler=None, model=None):
    torch.manual_seed(0)
    model = cnn("group") if model is None else model
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05) if method in ("mini", "deltagrad")  # plain SGD
                 else torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    scaler = torch.amp.GradScaler("cpu") if scaler is None else scaler
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=nn.CrossEntropyLoss(), clip_grad_norm=clip_grad_norm,
                                                       **({"grad_scaler": scaler} if declare else {}))
    return engine, model, optimizer, loader, scaler


def amp_loop(model, optimizer, loader, scaler, max_norm=None, autocast=None, unscale=True, on_step=None):
    """The torch.amp recipe (autocast: the dtype of torch.autocast around the forward, None: none).
    on_step(scale before, scale after update) after each batch; returning True stops the loop."""
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if max_norm is not None:
                if unscale:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if on_step is not None and on_step(before, scaler.get_scale()):
                return


@pytest.mark.parametrize("max_norm", [SMALL, LARGE])
@pytest.mark.parametrize("method", ["retrain", "finetune", "topk"])
def test_the_amp_recipe_with_clipping_is_accepted_and_repeated_by_retraining(method, max_norm):
    """Without autocast the scaling is by a power of two, exact: retraining (float32, no scaler,
    the same clip) repeats the loop bit for bit. Refused before (the clip was compared with the
    scaled gradients: 'not the backward's clipped' where it does not clip, '65536 times' at the
    first step where it does)."""
    engine, model, optimizer, loader, scaler = wrap(method, clip_grad_norm=max_norm)
    amp_loop(model, optimizer, loader, scaler, max_norm)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
    assert engine.unlearner().unlearn([3, 17]).weights_changed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_norm", [SMALL, LARGE])
def test_the_amp_recipe_under_autocast_is_accepted(dtype, max_norm):
    """Under autocast retraining runs in float32: close to the loop, not bit for bit (README)."""
    engine, model, optimizer, loader, scaler = wrap(clip_grad_norm=max_norm)
    amp_loop(model, optimizer, loader, scaler, max_norm, autocast=dtype)
    gold = flat(ue.retrain(engine.initial, engine.data, engine.recipe, []))
    # the loop's distance from retraining, against how far training moved the weights
    assert (flat(model) - gold).norm() < 0.1 * (gold - flat(engine.initial)).norm()
    engine.unlearner()


def test_clipping_the_scaled_gradients_is_refused_at_the_first_step():
    """The classic mistake: clip_grad_norm_ before scaler.unscale_ clips the scaled gradients by
    another coefficient than retraining's."""
    engine, model, optimizer, loader, scaler = wrap(clip_grad_norm=SMALL)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="optimizer step 0: .*not the backward's clipped.*scaler.unscale_"):
        amp_loop(model, optimizer, loader, scaler, SMALL, unscale=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("max_norm", [SMALL, LARGE])
def test_an_undeclared_scaler_with_clipping_is_refused_naming_grad_scaler(max_norm):
    engine, model, optimizer, loader, scaler = wrap(clip_grad_norm=max_norm, declare=False)
    with pytest.raises(RuntimeError, match="optimizer step 0: .*grad_scaler="):
        amp_loop(model, optimizer, loader, scaler, max_norm)


SKIPPING = {  # float16 autocast overflows at these scales (torch.amp's default starts at 2 ** 16)
    "the first steps": lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 20),
    "a later step, after the scale grew": lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_factor=4.0,
                                                                         growth_interval=1),
}


def skips(taken, after_skip, model):
    """on_step for amp_loop: counts the steps taken before the first skip, and keeps the weights after it."""
    def note(before, after):
        if after < before:  # update() lowers the scale only when the step was skipped
            after_skip.append(copy.deepcopy(model.state_dict()))
        elif not after_skip:
            taken.append(1)
    return note


@pytest.mark.parametrize("max_norm", [None, LARGE])
@pytest.mark.parametrize("case", list(SKIPPING))
def test_a_step_the_scaler_skips_is_refused_naming_it(case, max_norm):
    """Retraining in float32 takes every step. Before: refused as '2 backward passes' (or by the
    step count) without naming the skip."""
    engine, model, optimizer, loader, scaler = wrap(clip_grad_norm=max_norm, scaler=SKIPPING[case]())
    taken, after_skip = [], []
    with pytest.raises(RuntimeError, match=r"optimizer step \d+ was skipped by the GradScaler") as refusal:
        amp_loop(model, optimizer, loader, scaler, max_norm, autocast=torch.float16,
                 on_step=skips(taken, after_skip, model))
    assert after_skip, "the scaler never skipped: the test proves nothing"
    assert f"optimizer step {len(taken)} was skipped" in str(refusal.value)
    # refused before the next step's update: the weights are those after the skip
    assert all(torch.equal(v, after_skip[0][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", list(SKIPPING))
def test_a_loop_ending_on_a_step_the_scaler_skipped_is_refused_by_the_unlearner(case):
    engine, model, optimizer, loader, scaler = wrap(scaler=SKIPPING[case]())
    taken, after_skip = [], []
    note = skips(taken, after_skip, model)
    amp_loop(model, optimizer, loader, scaler, autocast=torch.float16,
             on_step=lambda before, after: note(before, after) or bool(after_skip))  # stops at the skip
    assert after_skip
    with pytest.raises(RuntimeError, match=f"optimizer step {len(taken)} was skipped by the GradScaler"):
        engine.unlearner()


@pytest.mark.parametrize("method", ["retrain", "mini", "deltagrad"])
@pytest.mark.parametrize("case", ["plain loop", "scaler declared, no clipping", "scaler undeclared, no clipping"])
def test_controls_pass_and_are_repeated_by_retraining(case, method):
    if case == "plain loop":
        engine, model, optimizer, loader, scaler = wrap(method, declare=False)
        for _ in range(EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    else:
        engine, model, optimizer, loader, scaler = wrap(method, declare=case.startswith("scaler declared"))
        amp_loop(model, optimizer, loader, scaler)
    engine.unlearner()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


def test_grad_scaler_must_be_a_grad_scaler_and_pcmu_refuses_it():
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        wrap(scaler=object())
    model = cnn("group")
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    with pytest.raises(ue.UnsupportedModelError, match="grad_scaler"):
        ue.UnlearningEngine().make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                               method="pcmu", epochs=EPOCHS, clip_norm=1.0, tau=0.006, sigma=0.01,
                                               grad_scaler=torch.amp.GradScaler("cpu"))


def test_unscale_leaves_the_version_counter_as_the_guard_assumes():
    """What the guard relies on (loop_guard.py): scaler.unscale_ multiplies p.grad in place by the
    float32 reciprocal of the scale without moving its version counter, so a declared clip is the
    one write the counter sees. Should torch start counting it, this names the cause."""
    model = nn.Linear(4, 3)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(5, 4)).square().mean()).backward()
    kept = [(p.grad._version, p.grad.clone()) for p in model.parameters()]
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    inverse = torch.tensor(1.0 / scaler.get_scale(), dtype=torch.float64).float()
    for p, (version, scaled) in zip(model.parameters(), kept):
        assert p.grad._version == version
        assert torch.equal(p.grad, scaled * inverse)


class NearTargets(torch.utils.data.Dataset):
    """Regression targets a few hundredths from a fixed model's outputs (fine-tuning a model that
    already fits): the mean squared error's gradients are small enough that float16 rounds them into
    its subnormals unless the loss is scaled, which is what GradScaler is for."""

    def __init__(self, model: nn.Module, n: int = N):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 64, generator=g)
        with torch.no_grad():
            self.y = model(self.x) + 0.01 * torch.randn(n, 3072, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("loss_factor", [1.0, 4.0])
def test_a_float16_loop_whose_unscaled_gradients_would_underflow_is_judged_at_the_scale_it_ran(loss_factor):
    """The first step's comparison recomputes the loss at the scaler's scale, as the loop's backward
    ran, and unscales as unscale_ does: unscaled, float16 rounded the small gradients into its
    subnormals and differed from the loop's by 5% (refused before as 'not those of the loss given',
    advising an unscaled backward). A loss the loop scales itself is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3072))
    loader = torch.utils.data.DataLoader(NearTargets(model), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="retrain", epochs=1,
                                                       loss_fn=nn.MSELoss(), grad_scaler=scaler)

    def loop():
        for x, y in loader:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss * loss_factor).backward()
            scaler.step(optimizer)
            scaler.update()

    if loss_factor != 1.0:
        with pytest.raises(RuntimeError, match="optimizer step 0: the loop's gradients are not those of the loss"):
            loop()
        return
    loop()
    engine.unlearner()


def test_an_undeclared_scaler_refused_at_the_first_step_is_told_to_declare_it():
    """The same float16 loop with its GradScaler not declared: the comparison cannot know the scale
    and refuses; the refusal names grad_scaler= (before: only 'backpropagate that loss unscaled')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3072))
    loader = torch.utils.data.DataLoader(NearTargets(model), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    model, optimizer, loader = ue.UnlearningEngine().make_unlearnable(model, optimizer, loader, method="retrain",
                                                                      epochs=1, loss_fn=nn.MSELoss())
    with pytest.raises(RuntimeError, match="optimizer step 0: the loop's gradients .*grad_scaler="):
        for x, y in loader:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def _ddp_skipping_worker(rank, world, directory):
    """deltagrad in a 2-rank DDP loop whose second batch's loss is infinite: the GradScaler skips that
    step on every rank (the averaged gradients are inf everywhere)."""
    import os

    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    trained = DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    items = torch.utils.data.TensorDataset(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    loader = torch.utils.data.DataLoader(items, batch_size=24, shuffle=True)
    scaler = torch.amp.GradScaler("cpu")
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(trained, optimizer, loader, method="deltagrad", epochs=2,
                                                         loss_fn=nn.CrossEntropyLoss(),
                                                         history=os.path.join(directory, "history"), grad_scaler=scaler)
    batches = 0
    try:
        for _ in range(2):
            for x, y in loader:
                scaled_step(trained, optimizer, scaler, x, y, infinite_loss=batches == 1)
                batches += 1
        engine.unlearner()
        return batches, "no error"
    except Exception as exc:
        return batches, f"{type(exc).__name__}: {exc}"


def test_a_step_the_scaler_skips_under_ddp_is_refused_at_the_next_step_naming_it():
    """Before: no rank refused in the loop (the skip check read the scale in the gradient hooks that
    DDP does without); the whole run trained on and unlearner() refused by the step count alone."""
    import tempfile

    from distributed_setup import launch
    with tempfile.TemporaryDirectory() as directory:
        got = launch(_ddp_skipping_worker, 2, 90, directory)
    for rank, (batches, message) in enumerate(got):
        assert batches == 2, (rank, batches, message)  # refused at the step after the skip, before its update
        assert "optimizer step 1 was skipped by the GradScaler" in message, (rank, message)
