"""PCMU in the user's own loop (UnlearningEngine.make_unlearnable(method="pcmu")): the user's model,
DataLoader over a map-style dataset, SGD and scheduler; the run must be PCMUTrainer's run bit for bit
(records and weights), requests must answer as through PCMUTrainer, and forgetting must give exactly
PCMU's coupled retraining. Refusals: BatchNorm in training mode, optimizers other than plain SGD."""
import copy
import re

import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import unlearn_ext as ue
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner

PCMU = dict(clip_norm=1.0, tau=0.006, sigma=0.01, max_request=3)
LR, GAMMA, EPOCHS = 0.05, 0.5, 3


def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(d.target)


X, Y = _digits()
N_TRAIN = 1000  # 1000 = 15 x 64 + 40: the last batch of each epoch is not a power of two


class DigitImages(torch.utils.data.Dataset):
    """A user's map-style dataset: (1x8x8 image, label) per index."""

    def __init__(self, lo=0, hi=N_TRAIN):
        self.x, self.y = X[lo:hi], Y[lo:hi]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def small_cnn(seed=1, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(4 * 36, 10))


def step_lr(spe):
    """The lr StepLR(step_size=1, gamma) gives at step t (halving is exact in floating point)."""
    return lambda t: LR * GAMMA ** (t // spe)


def user_run(model, batch_size=64, loss_fn=None, epochs=EPOCHS, **options):
    """The user's loop, unchanged: zero_grad, loss.backward, step; the scheduler once per epoch."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    loader = torch.utils.data.DataLoader(DigitImages(), batch_size=batch_size, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="pcmu", epochs=epochs,
                                                       loss_fn=loss_fn, scheduler=scheduler, **{**PCMU, **options})
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step()
    return engine, optimizer


def reference(initial, batch_size=64, exclude=None, epochs=EPOCHS):
    """PCMUTrainer's own run: same data, seed, schedule and step sizes."""
    data = ue.TrainingData(DigitImages())
    spe = -(-len(data) // batch_size)
    trainer = PCMUTrainer(copy.deepcopy(initial), None, data, batch_size=batch_size, seed=0, lr=step_lr(spe),
                          exclude=exclude, **PCMU)
    return trainer.train(epochs=epochs)


def assert_same_state(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where} differs ({a} vs {b})"


def assert_same_run(a: PCMUTrainer, b: PCMUTrainer):
    """Every record field (ids, step size, RNG offset, smallest radius, codes, fragile set) and
    every weight equal bit for bit."""
    assert len(a.records) == len(b.records)
    for ra, rb in zip(a.records, b.records):
        assert_same_state(ra.to_state(), rb.to_state(), f"step {ra.step}")
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))


def same_report(a, b):
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("seconds")
        d["details"]["check"].pop("seconds")
    assert da == db


@pytest.mark.parametrize("batch_size,routes", [(64, {"backward", "recomputed"}), (100, {"recomputed"})])
def test_user_loop_is_pcmu_trainers_run_bit_for_bit(batch_size, routes):
    """Batches of 64 take the sums from the user's backward (the epoch's last batch of 40 is
    recomputed: undoing a mean over 40 is not exact); batches of 100 are all recomputed. Either
    way the records and weights are PCMUTrainer's, and a request answers the same."""
    initial = small_cnn()
    engine, optimizer = user_run(copy.deepcopy(initial), batch_size)
    assert {k for k, v in optimizer.sources.items() if v} == routes
    ref = reference(initial, batch_size)
    assert_same_run(optimizer.trainer, ref)

    unlearner = engine.unlearner()
    assert isinstance(unlearner, PCMUUnlearner)
    forget = torch.tensor([3, 250, 777])
    ref_unlearner = PCMUUnlearner(ref)
    same_report(unlearner.unlearn(forget), ref_unlearner.unlearn(forget))
    assert unlearner.trainer.certificate().to_dict() == ref.certificate().to_dict()
    assert_same_run(unlearner.trainer, ref)


def test_sum_reduced_loss_takes_every_step_from_the_backward():
    initial = small_cnn()
    _, optimizer = user_run(copy.deepcopy(initial), 64, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    assert optimizer.sources == {"backward": EPOCHS * 16, "recomputed": 0}
    assert_same_run(optimizer.trainer, reference(initial, 64))


def test_class_weighted_mean_is_never_undone():
    """A class-weighted mean divides by the batch's total weight, not by n, so the sums are always
    recomputed. (The wrap-time probe refuses such a loss unless its probe samples share one class of
    weight 1, as here: the first four items are all of class 0.)"""
    first = torch.nonzero(Y[:N_TRAIN] == 0).flatten()[:4]
    order = torch.cat([first, torch.tensor([i for i in range(N_TRAIN) if i not in set(first.tolist())])])

    class Reordered(DigitImages):
        def __init__(self):
            self.x, self.y = X[order], Y[order]

    initial = small_cnn()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 1.5, 0.7, 1.3, 0.9, 1.1, 0.6, 1.4, 0.8]))
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(Reordered(), batch_size=64, shuffle=True)
    model, optimizer, loader = ue.UnlearningEngine().make_unlearnable(model, optimizer, loader, method="pcmu",
                                                                      epochs=1, loss_fn=weighted, **PCMU)
    for x, y in loader:
        optimizer.zero_grad()
        weighted(model(x), y).backward()
        optimizer.step()
    assert optimizer.sources == {"backward": 0, "recomputed": 16}
    ref = PCMUTrainer(copy.deepcopy(initial), ue.policy.per_sample_loss_of(weighted), ue.TrainingData(Reordered()),
                      batch_size=64, seed=0, lr=LR, **PCMU).train(epochs=1)
    assert_same_run(optimizer.trainer, ref)


def test_forgetting_5_percent_equals_pcmus_coupled_retraining(tmp_path):
    """The issue's user story: a small GroupNorm CNN, the user's DataLoader over a map-style dataset,
    the user's loop; it trains; forgetting 5% through the ledger gives PCMU's coupled retraining
    (PCMU training without those ids, same schedule) bit for bit, whichever route answers."""
    initial = small_cnn()
    engine, optimizer = user_run(copy.deepcopy(initial), 64)
    model = engine.run.model
    test_x, test_y = X[N_TRAIN:], Y[N_TRAIN:]
    with torch.no_grad():
        before = float((initial(test_x).argmax(1) == test_y).float().mean())
        after = float((model(test_x).argmax(1) == test_y).float().mean())
    assert after > max(0.5, before + 0.3), (before, after)

    forget = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(5))[:N_TRAIN // 20]
    ledger = ue.DeletionLedger(engine.unlearner(), tmp_path / "ledger")
    report = ledger.forget(forget)
    assert report.status in ("certified", "retrained")
    retrained = reference(initial, 64, exclude=forget)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), retrained.model.parameters()))
    ledger.close()


def test_dropout_runs_the_per_sample_sums_in_eval_mode_and_says_so():
    initial = small_cnn(dropout=0.5)
    engine, optimizer = user_run(copy.deepcopy(initial), 64)
    assert optimizer.sources["backward"] == 0  # the user's forward drew dropout masks
    assert_same_run(optimizer.trainer, reference(initial, 64))  # PCMUTrainer: eval mode too
    report = engine.unlearner().unlearn([1])
    assert "eval mode" in report.details["stochastic_layers"] and "4" in report.details["stochastic_layers"]


def test_dataset_backed_trainer_equals_the_in_memory_one():
    initial = small_cnn()
    spe = -(-N_TRAIN // 64)
    runs = [PCMUTrainer(copy.deepcopy(initial), None, data, batch_size=64, lr=step_lr(spe), **PCMU).train(epochs=2)
            for data in (ue.TrainingData(DigitImages()), ue.TrainingData(X[:N_TRAIN], Y[:N_TRAIN]))]
    assert_same_run(*runs)


# ---- refusals, before any training ----------------------------------------------------------------

def wrap(model, optimizer, **options):
    loader = torch.utils.data.DataLoader(DigitImages(), batch_size=64)
    return ue.UnlearningEngine().make_unlearnable(model, optimizer, loader, method="pcmu", epochs=1,
                                                  **{**PCMU, **options})


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 10))
    with pytest.raises(ue.UnsupportedModelError, match=r"BatchNorm in training mode.*layers: 1.*GroupNorm"):
        wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_batchnorm_switched_to_training_in_the_loop_is_refused_at_the_step():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 10))
    model.eval()  # frozen statistics: accepted
    model, optimizer, loader = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ue.UnsupportedModelError, match="BatchNorm in training mode"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("make,message", [
    (lambda p: torch.optim.Adam(p, lr=1e-3), "torch.optim.SGD.*got Adam"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum=0.9"),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), "weight_decay=0.0001"),
])
def test_optimizers_other_than_plain_sgd_are_refused(make, message):
    model = small_cnn()
    with pytest.raises(ue.UnsupportedModelError, match=message):
        wrap(model, make(model.parameters()))


def test_groups_with_other_learning_rates_and_missing_parameters_are_refused():
    model = small_cnn()
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.01},
              {"params": model[4].parameters()}]
    with pytest.raises(ue.UnsupportedModelError, match="one step size"):
        wrap(model, torch.optim.SGD(groups, lr=0.1))
    with pytest.raises(ue.UnsupportedModelError, match="does not hold 4.weight, 4.bias"):
        wrap(model, torch.optim.SGD(list(model[0].parameters()) + list(model[1].parameters()), lr=0.1))


def test_a_refused_option_leaves_the_engine_free_and_the_loop_is_held_to_the_schedule():
    model = small_cnn()
    engine = ue.UnlearningEngine()
    loader = torch.utils.data.DataLoader(DigitImages(), batch_size=500)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip_norm"):
        engine.make_unlearnable(model, sgd, loader, method="pcmu", epochs=1, **{**PCMU, "clip_norm": 0.0})
    with pytest.raises(ValueError, match=r"lr= is not an option of make_unlearnable\(method='pcmu'\)"):
        engine.make_unlearnable(model, sgd, loader, method="pcmu", epochs=1, lr=0.1, **PCMU)
    model, optimizer, loader = engine.make_unlearnable(model, sgd, loader, method="pcmu", epochs=1, **PCMU)
    loss_fn = nn.CrossEntropyLoss()
    batches = list(loader)
    optimizer.zero_grad()
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="finish them"):
        engine.unlearner()
    optimizer.step()
    with pytest.raises(RuntimeError, match="more optimizer steps"):
        optimizer.step()
    assert isinstance(engine.unlearner(), PCMUUnlearner)


@pytest.mark.parametrize("zero_grad_between", [False, True])
def test_several_backward_passes_per_step_are_refused_at_the_step(zero_grad_between):
    """Gradient accumulation (or a backward whose step was skipped) runs the loop over two batches
    for one PCMU step: the step must not take its per-sample sums from the last batch's backward
    (batch t+1 of the same size) under batch t's ids, nor leave the schedule. Refused at that step,
    before its update."""
    model = small_cnn()
    model, optimizer, loader = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    batches = iter(loader)
    for _ in range(2):
        x, y = next(batches)
        if zero_grad_between:  # a step skipped (e.g. on a non-finite loss); without: accumulation
            optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
    with pytest.raises(RuntimeError, match=r"optimizer step 0: .* 2 backward passes since the last step"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert optimizer.trainer.steps_done == 0


@pytest.mark.parametrize("change", ["clip_grad_norm_", "noise", "replaced", "clamped into a new tensor"])
def test_a_gradient_changed_between_backward_and_step_is_refused_at_the_step(change):
    """PCMU's step does not read p.grad (it clips each sample's gradient to clip_norm itself): a loop
    that clips or perturbs the gradients would see its change silently dropped. Refused at that
    step, before its update, naming PCMU's own clipping."""
    model = small_cnn()
    model, optimizer, loader = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if change == "clip_grad_norm_":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    elif change == "noise":
        with torch.no_grad():
            model[4].bias.grad.add_(torch.randn_like(model[4].bias.grad))
    elif change == "replaced":  # a new tensor: a version counter of its own, which reads as unchanged
        model[4].bias.grad = model[4].bias.grad * 0.5
    else:
        model[4].bias.grad = torch.clamp(model[4].bias.grad, -1e-3, 1e-3)
    with pytest.raises(RuntimeError, match=r"optimizer step 0: the loop changed the gradient of .*clip_norm="):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_scaled_loss_is_refused_at_the_first_step():
    """PCMU takes its per-sample sums from the loop's backward: (loss * 4).backward() made them another
    loss's, silently (the run was no longer PCMUTrainer's over the data). The first step compares the
    backward's gradients with the given loss's own and refuses, before its update."""
    model = small_cnn()
    model, optimizer, loader = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    optimizer.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * 4).backward()
    with pytest.raises(RuntimeError, match=r"optimizer step 0: the loop's gradients are not those of the loss.*"
                                           r"about 4 times it"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert optimizer.trainer.steps_done == 0


def test_an_undeclared_grad_scaler_is_refused_at_the_step():
    """An undeclared GradScaler backpropagates the loss times 65536, then unscale_ divides p.grad in
    place without moving its version counter: the first-step loss comparison (it reads p.grad) and
    the gradient-change check pass, while the per-sample sums PCMU takes from that backward are the
    scaled loss's -- silently another run than PCMUTrainer's. Refused at the step, before its
    update; the plain loop is test_user_loop_is_pcmu_trainers_run_bit_for_bit."""
    model = small_cnn()
    model, optimizer, loader = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    unscaled = re.escape(f"(about {1 / scaler.get_scale():.4g} times them")
    with pytest.raises(RuntimeError, match=r"optimizer step 0: the gradients at the step are not the ones the "
                                           rf"loop's backward computed {unscaled}.*GradScaler"):
        scaler.step(optimizer)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert optimizer.trainer.steps_done == 0


def test_user_loop_records_into_a_disk_store(tmp_path):
    """history=path: the user's loop writes PCMUTrainer's records into a disk store; a trainer built
    over the file restores that run; a path that exists is refused before training."""
    path = str(tmp_path / "pcmu.hist")
    initial = small_cnn()
    engine, optimizer = user_run(copy.deepcopy(initial), epochs=1, history=path)
    ref = reference(initial, epochs=1)
    assert_same_run(optimizer.trainer, ref)
    optimizer.trainer.close()
    spe = -(-N_TRAIN // 64)
    reopened = PCMUTrainer(copy.deepcopy(initial), None, ue.TrainingData(DigitImages()), batch_size=64, seed=0,
                           lr=None, history=path, **PCMU)
    assert reopened.steps_done == spe
    assert_same_run(reopened, ref)
    reopened.close()
    with pytest.raises(FileExistsError, match="exists: make_unlearnable records this run's history there anew"):
        user_run(small_cnn(), epochs=1, history=path)
