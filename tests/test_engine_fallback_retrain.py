"""Through the engine, the history methods' exact fallback is the recipe's retraining bit for bit,
also on a model with dropout (the fallback starts each epoch from the RNG state the user's loop
started it from, as retraining does) and for plain SGD with weight decay (torch.optim.SGD's
arithmetic)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue

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
