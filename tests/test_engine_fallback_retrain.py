"""Through the engine, the history methods' exact fallback is the recipe's retraining bit for bit,
also on a model with dropout (the fallback starts each epoch from the RNG state the user's loop
started it from, as retraining does) and for plain SGD with weight decay (torch.optim.SGD's
arithmetic)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.mini import deltagrad
from unlearn_ext.mini.vectors import FlatModel

from user_models import LazyImages, cnn, same_state, user_loop

N, BATCH, EPOCHS, FORGET = 48, 16, 2, [3, 17]
# Options that make each method fall back: Mini's retained-loss check with a limit no answer meets;
# DeltaGrad's prediction check after a short exact prefix, with no error allowed.
FORCE = {"mini": {"loss_rise_limit": -1.0}, "deltagrad": {"burn_in": 2, "period": 2, "max_prediction_error": 0.0}}


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fallback_is_the_recipes_retraining(method, momentum, dropout):
    torch.manual_seed(0)
    model = cnn("group", dropout=dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, opt, loader = engine.make_unlearnable(model, opt, loader, method=method, epochs=EPOCHS, **FORCE[method])
    user_loop(model, opt, loader, nn.CrossEntropyLoss(), EPOCHS)
    report = engine.unlearner().unlearn(FORGET)
    assert report.status == "fallback", report.reason
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), model)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_fallback_trains_in_the_loops_modes_whatever_mode_the_model_is_left_in(method):
    """The user evaluates the trained model (model.eval()) before asking for the unlearner: the
    fallback still trains as the loop did (dropout on), so it is still retraining bit for bit."""
    torch.manual_seed(0)
    model = cnn("group", dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, opt, loader = engine.make_unlearnable(model, opt, loader, method=method, epochs=EPOCHS, **FORCE[method])
    user_loop(model, opt, loader, nn.CrossEntropyLoss(), EPOCHS)
    model.eval()
    report = engine.unlearner().unlearn(FORGET)
    assert report.status == "fallback", report.reason
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), model)
    assert not any(m.training for m in model.modules())  # the user's model is left in the mode it was in


def test_deltagrad_prefix_pairs_take_eval_mode_gradients(monkeypatch):
    """DeltaGrad's exact prefix steps retraining's run (dropout on, as retraining draws it), but the
    gradient difference of its quasi-Newton pair takes its kept and removed gradients in eval mode,
    as every other replayed gradient: at step 0 (retraining's weights are the initial ones) the
    pair's grad L_B(w_0) is the whole batch's eval-mode mean gradient."""
    torch.manual_seed(0)
    model = cnn("group", dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, opt, loader = engine.make_unlearnable(model, opt, loader, method="deltagrad", epochs=EPOCHS, burn_in=2)
    user_loop(model, opt, loader, nn.CrossEntropyLoss(), EPOCHS)
    unlearner = engine.unlearner()
    store = unlearner.store
    seen = []
    add_scaled = deltagrad._add_scaled_

    def spy(values, y, alpha):  # records the gradient difference each recorded gradient is taken off
        seen.append(y.clone())
        return add_scaled(values, y, alpha)

    monkeypatch.setattr(deltagrad, "_add_scaled_", spy)
    batch0 = next(ids for t, _, _, ids in store.schedule() if t == 0)
    assert len(batch0) > len(set(FORGET) & set(batch0.tolist()))  # step 0 updates: its pair is the first one
    unlearner.unlearn(FORGET)
    w0 = FlatModel(engine.initial, engine.data).flat()
    expected = FlatModel(engine.initial, engine.data).mean_loss_grad(w0, batch0)  # eval mode, the whole batch
    assert seen and torch.allclose(seen[0], expected, rtol=1e-4, atol=1e-6), float((seen[0] - expected).abs().max())


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
@pytest.mark.parametrize("limit", [0.0, -1.0])
def test_one_loss_rise_limit_rule_for_both_history_methods(method, limit):
    """loss_rise_limit is a threshold for both methods (mini/options.check_limits): <= 0 asks every
    answer whose retained loss does not fall by that much to fall back (DeltaGrad refused it while
    Mini-Unlearning took it). With -1 no answer meets it: the request falls back to retraining."""
    torch.manual_seed(0)
    model = cnn("group")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, opt, loader = engine.make_unlearnable(model, opt, loader, method=method, epochs=EPOCHS,
                                                 loss_rise_limit=limit)
    user_loop(model, opt, loader, nn.CrossEntropyLoss(), EPOCHS)
    report = engine.unlearner().unlearn(FORGET)
    if limit < 0:
        assert report.status == "fallback", report.reason
        assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), model)
