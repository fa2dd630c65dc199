"""Data and models as users bring them, beyond the plain (image, int label) pair: label dtypes,
memory formats, samplers and loader settings, float64 models. Each either works -- the library's
retraining equals a loop the test writes, a request's answer moves toward that retraining -- or is
refused in make_unlearnable, before training, naming the problem and the fix."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.data import BatchSchedule
from unlearn_ext.mini.curvature import HessianOperator
from unlearn_ext.mini.vectors import FlatModel
from user_models import LazyImages, cnn, distance_ratio, same_state, user_loop

N, BATCH, EPOCHS = 48, 16, 2
FORGET = [3, 17, 42]


class Relabelled(torch.utils.data.Dataset):
    """LazyImages with the label as a tensor of `dtype` and the image in `memory_format`."""

    def __init__(self, dtype=torch.int64, memory_format=torch.contiguous_format):
        self.base, self.dtype, self.memory_format = LazyImages(N), dtype, memory_format

    def __len__(self):
        return N

    def __getitem__(self, i):
        x, y = self.base[i]
        return x.contiguous(memory_format=self.memory_format), torch.tensor(y, dtype=self.dtype)


def channels_last_batch(items):
    """A user's collate_fn that hands the model a channels_last batch (4-d NHWC strides)."""
    x = torch.stack([x for x, _ in items]).to(memory_format=torch.channels_last)
    return x, torch.as_tensor([int(y) for _, y in items])


def channels_last_cnn():
    """cnn() converted to channels_last, as users do for speed (the weights' strides change)."""
    return cnn("group").to(memory_format=torch.channels_last)


def hessian_product(data, v):
    torch.manual_seed(1)
    flat = FlatModel(cnn("group"), data)
    return HessianOperator(flat, flat.flat(), data.ids, weight_decay=0.01)(v)


def test_hessian_products_of_uint8_targets_equal_those_of_int64_targets():
    """torch's forward-mode decomposition of the loss refuses a uint8 class index (its scatter)
    although the ordinary kernel takes it: the product must still come out, the same."""
    plain = ue.TrainingData(Relabelled())
    v = torch.randn(FlatModel(cnn("group"), plain).dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    product = hessian_product(ue.TrainingData(Relabelled(torch.uint8)), v)
    torch.testing.assert_close(product, hessian_product(plain, v), rtol=1e-5, atol=1e-6)


def wrap_and_train(method, dataset, make_model=lambda: cnn("group"), **loader_settings):
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, **loader_settings)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=nn.CrossEntropyLoss())
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    return engine, model


def my_retraining(engine, make_model, collate=None):
    """The user's loop over the schedule's batches without FORGET, written here, not the library's."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.set_rng_state(engine.recipe.rng_state)
    batches = engine.data.sampler(BatchSchedule(engine.data.ids, BATCH, 0), torch.tensor(FORGET))
    loader = torch.utils.data.DataLoader(engine.data.items, batch_sampler=batches,
                                         **({"collate_fn": collate} if collate else {}))
    return user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
@pytest.mark.parametrize("variant", ["uint8 targets", "channels_last inputs"])
def test_history_methods_train_and_unlearn_with_uint8_labels_or_channels_last_batches(method, variant):
    """Their edge-of-stability estimate takes Hessian products during training: it must not fail
    the user's loop where the loop itself runs."""
    if variant == "uint8 targets":
        make_model, dataset, collate = (lambda: cnn("group")), Relabelled(torch.uint8), None
    else:
        make_model, dataset, collate = channels_last_cnn, LazyImages(N), channels_last_batch
    engine, model = wrap_and_train(method, dataset, make_model, **({"collate_fn": collate} if collate else {}))
    trained = copy.deepcopy(model)
    report = engine.unlearner().unlearn(FORGET)
    gold = my_retraining(engine, make_model, collate)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), gold)
    assert report.status == "unlearned", report.reason
    assert distance_ratio(model, trained, gold) < 1.0


@pytest.mark.parametrize("method", ["retrain", "finetune", "topk", "randomk", "pcmu"])
def test_the_other_methods_train_retrain_and_unlearn_with_uint8_labels(method):
    """uint8 class indices are what torch's cross_entropy takes besides int64: every method serves them."""
    options = {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "max_request": 3} if method == "pcmu" else {}
    torch.manual_seed(0)
    model = cnn("group")
    loader = torch.utils.data.DataLoader(Relabelled(torch.uint8), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                                       method=method, epochs=EPOCHS, **options)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    if method != "pcmu":  # PCMU trains with its own step, not the recipe's
        assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
    report = engine.unlearner().unlearn(FORGET)
    assert report.weights_changed and report.ids == FORGET


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
@pytest.mark.parametrize("method", ["retrain", "topk", "mini", "deltagrad", "pcmu"])
def test_narrow_integer_labels_are_refused_when_wrapping_naming_dtype_and_fix(method, dtype):
    """torch's cross_entropy refuses int32 / int16 / int8 class indices: the user's loop could not
    run either, so wrapping says which labels and how to make them int64 (it does not convert them)."""
    options = {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "max_request": 3} if method == "pcmu" else {}
    model = cnn("group")
    loader = torch.utils.data.DataLoader(Relabelled(dtype), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    with pytest.raises(TypeError, match=f"targets are {dtype}.*dtype=torch.long"):
        engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader, method=method,
                                epochs=EPOCHS, **options)
    assert engine.run is None


def test_hessian_products_of_a_channels_last_model_equal_those_of_the_contiguous_one():
    """torch's forward-mode decomposition of group_norm views NHWC strides it cannot view; the
    ordinary kernel (the user's loop) takes them: the product must still come out, the same."""
    data = ue.TrainingData(LazyImages(N), collate=channels_last_batch)
    v = torch.randn(FlatModel(cnn("group"), data).dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    flat = FlatModel(channels_last_cnn(), data)
    product = HessianOperator(flat, flat.flat(), data.ids, weight_decay=0.01)(v)
    torch.testing.assert_close(product, hessian_product(ue.TrainingData(LazyImages(N)), v), rtol=1e-5, atol=1e-6)


# ---- DataLoader settings the batch schedule would silently replace: refused when wrapping ------------

class SeededPermutation(torch.utils.data.Sampler):
    """A user's own sampler with a generator of its own."""

    def __init__(self, n):
        self.n, self.generator = n, torch.Generator().manual_seed(1)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def own_sampling():
    data = LazyImages(N)
    return {
        "drop_last": ({"batch_size": BATCH, "shuffle": True, "drop_last": True}, "drop_last=True"),
        "weighted": ({"batch_size": BATCH, "sampler": torch.utils.data.WeightedRandomSampler(torch.ones(N), N)},
                     "sampler \\(WeightedRandomSampler\\)"),
        "with replacement": ({"batch_size": BATCH, "sampler": torch.utils.data.RandomSampler(data, replacement=True)},
                             "sampler \\(RandomSampler\\)"),
        "subset": ({"batch_size": BATCH, "sampler": torch.utils.data.RandomSampler(data, num_samples=N // 2)},
                   "sampler \\(RandomSampler\\)"),
        "own sampler": ({"batch_size": BATCH, "sampler": SeededPermutation(N)}, "sampler \\(SeededPermutation\\)"),
        "distributed": ({"batch_size": BATCH, "sampler": torch.utils.data.DistributedSampler(data, 2, 0)},
                        "whole step's batch size"),
        "own batch sampler": ({"batch_sampler": [list(range(i, N, 3)) for i in range(3)]},
                              "batch_sampler \\(list\\) decides which items each batch holds"),
        "unbatched": ({"batch_size": None}, "batch_size=None"),
    }


@pytest.mark.parametrize("case", list(own_sampling()))
@pytest.mark.parametrize("method", ["mini", "deltagrad", "topk"])
def test_a_loader_whose_sampling_the_schedule_would_replace_is_refused_when_wrapping(method, case):
    settings, names = own_sampling()[case]
    model = cnn("group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = ue.UnlearningEngine()
    loader = torch.utils.data.DataLoader(LazyImages(N), **settings)
    for batch_size in (None, BATCH):  # refused also when batch_size= is given to make_unlearnable
        with pytest.raises(ValueError, match=names):
            engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS, batch_size=batch_size)
    assert engine.run is None  # nothing wrapped: the user's loop cannot start on a replaced sampler


def plain_orders():
    data = LazyImages(N)
    return {
        "shuffle": {"batch_size": BATCH, "shuffle": True},
        "batch sampler": {"batch_sampler": torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data),
                                                                         BATCH, drop_last=False)},
        "two persistent workers": {"batch_size": BATCH, "shuffle": True, "num_workers": 2,
                                   "persistent_workers": True},
    }


@pytest.mark.parametrize("case", list(plain_orders()))
def test_plain_orders_are_the_schedules_seeded_order(case):
    """shuffle=True, a plain BatchSampler over a RandomSampler or workers only set an order, a size
    and how items load; the order is seed='s: the loop trains what the library retrains, at the
    loader's batch size. (shuffle=False is kept as it is: tests/test_user_loop_sequential.py.)"""
    torch.manual_seed(0)
    model = cnn("group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = ue.UnlearningEngine()
    loader = torch.utils.data.DataLoader(LazyImages(N), **plain_orders()[case])
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="retrain", epochs=EPOCHS)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    assert engine.recipe.batch_size == BATCH
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


# ---- float64 models ------------------------------------------------------------------------------------

class Doubles(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        x, y = LazyImages(N)[i]
        return x.double(), y


@pytest.mark.parametrize("method", ["topk", "randomk", "pcmu"])
def test_kernel_methods_refuse_a_float64_model_when_wrapping_naming_parameter_and_fix(method):
    """Their kernels take float32/float16/bfloat16: refused before training, not at the first
    request (Top-K, Random-k) or step (PCMU)."""
    model = cnn("group").double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"clip_norm": 1.0, "tau": 1.0, "sigma": 0.1} if method == "pcmu" else {}
    engine = ue.UnlearningEngine()
    with pytest.raises(ue.UnsupportedModelError, match="parameter '0.weight' is torch.float64.*model.float"):
        engine.make_unlearnable(model, optimizer, Doubles(), batch_size=BATCH, method=method, epochs=EPOCHS, **options)
    assert engine.run is None


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_history_methods_unlearn_a_float64_model_toward_its_retraining(method):
    engine, model = wrap_and_train(method, Doubles(), lambda: cnn("group").double())
    trained = copy.deepcopy(model)
    report = engine.unlearner().unlearn(FORGET)
    gold = my_retraining(engine, lambda: cnn("group").double())
    assert next(model.parameters()).dtype == torch.float64
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), gold)
    assert report.status == "unlearned", report.reason
    assert distance_ratio(model, trained, gold) < 1.0


# ---- items that are not (input, target) pairs ------------------------------------------------------------

class Records(torch.utils.data.Dataset):
    """Items as dicts with an extra field, as datasets read from tables often are."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        x, y = LazyImages(N)[i]
        return {"image": x, "label": y, "row": i}


def records_batch(items):
    """The user's collate_fn: the (inputs, targets) their loop unpacks."""
    return torch.stack([r["image"] for r in items]), torch.tensor([r["label"] for r in items])


@pytest.mark.parametrize("method", ["mini", "topk"])
def test_dict_items_with_the_users_collate_fn_train_retrain_and_unlearn(method):
    engine, model = wrap_and_train(method, Records(), collate_fn=records_batch)
    trained = copy.deepcopy(model)
    report = engine.unlearner().unlearn(FORGET)
    gold = my_retraining(engine, lambda: cnn("group"), records_batch)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), gold)
    assert report.status == "unlearned", report.reason
    if method == "mini":  # the history methods promise to move toward retraining
        assert distance_ratio(model, trained, gold) < 1.0


def test_dict_items_without_a_collate_fn_are_refused_when_wrapping_naming_the_fix():
    model = cnn("group")
    engine = ue.UnlearningEngine()
    with pytest.raises(TypeError, match="collated to dict.*collate_fn that returns \\(inputs, targets\\)"):
        engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                torch.utils.data.DataLoader(Records(), batch_size=BATCH), method="mini", epochs=EPOCHS)
    assert engine.run is None


# ---- a sequence of requests across a ledger restart -----------------------------------------------------

@pytest.mark.parametrize("method", ["mini", "deltagrad", "topk"])
def test_requests_across_a_ledger_restart_equal_the_uninterrupted_sequence(method, tmp_path):
    """Request [3], close, rebuild the run as a restarted process would and reopen, request the
    rest: the same weights as both requests to one unlearner (asked for twice: the same one)."""
    engine, uninterrupted = wrap_and_train(method, LazyImages(N))
    assert engine.unlearner() is engine.unlearner()
    engine.unlearner().unlearn(FORGET[:1])
    engine.unlearner().unlearn(FORGET[1:])

    first, _ = wrap_and_train(method, LazyImages(N))
    with ue.DeletionLedger(first.unlearner(), tmp_path) as ledger:
        ledger.forget(FORGET[:1])
    restarted, model = wrap_and_train(method, LazyImages(N))
    with ue.DeletionLedger(restarted.unlearner(), tmp_path) as ledger:
        assert ledger.forgotten == FORGET[:1]
        report = ledger.forget(FORGET[1:])
    assert report.ids == FORGET[1:]
    assert same_state(model, uninterrupted)


# ---- a token-level loss over padded sequences ------------------------------------------------------------

class PaddedSequences(torch.utils.data.Dataset):
    """Next-token targets with a padded tail of varying length (ignore_index -100)."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        tokens = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(i))
        targets = torch.roll(tokens, -1)
        targets[3 + i % 3:] = -100
        return tokens, targets


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 10)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))).transpose(1, 2)  # [batch, vocab, tokens]


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_a_token_mean_with_ignore_index_is_refused_by_the_history_methods_naming_it(method):
    """It divides by the batch's count of targets, not by its samples: no mean of per-sample losses."""
    model = TokenModel()
    loader = torch.utils.data.DataLoader(PaddedSequences(), batch_size=BATCH, shuffle=True)
    with pytest.raises(ue.UnsupportedModelError, match="tokens with ignore_index"):
        ue.UnlearningEngine().make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                               method=method, epochs=EPOCHS,
                                               loss_fn=nn.CrossEntropyLoss(ignore_index=-100))
