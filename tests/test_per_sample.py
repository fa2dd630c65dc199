"""Per-sample clipped gradient sums (unlearn_ext/per_sample/) against an eager loop over samples:
autograd on one sample at a time, norms, clip to C and sum, all in float64. Every closed form
(linear with and without positions, convolutions, embedding, layer/group norm) and the fallback
(a module without a closed form, tied parameters) is compared on float64 models, where the closed
forms must agree to float64 rounding, and on float32 models, where the forward pass's float32
roundings dominate. Also: losses that reduce, in-place ops after a layer, chunking, buffer reuse."""
import pytest
import torch

from unlearn_ext import per_sample
from unlearn_ext.parameters import trainable
from unlearn_ext.per_sample import clip_scales, clipped_per_sample, clipped_sum64, plan_for, weighted_row_sum64

LOSS = torch.nn.functional.cross_entropy
CLASSES = 5


class ScaledTanh(torch.nn.Module):
    """A module with its own parameter and no closed form (the per-module fallback), around a child
    Linear that keeps its closed form."""

    def __init__(self, width):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(width))
        self.inner = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.inner(x) * self.scale)


class Tied(torch.nn.Module):
    """One weight used by two modules: norms do not add per module (the whole-model path)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = torch.nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make(kind: str, n: int = 29):
    """(model, inputs) of one layer family, seeded."""
    torch.manual_seed(len(kind))
    S, nn = torch.nn.Sequential, torch.nn
    if kind == "linear":
        return S(nn.Linear(11, 23), nn.Tanh(), nn.Linear(23, CLASSES)), torch.randn(n, 11) * 2
    if kind == "linear_positions":  # T^2 <= d_in d_out: Gram form
        return S(nn.Linear(11, 7), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7, CLASSES)), torch.randn(n, 4, 11)
    if kind == "linear_long_positions":  # T^2 > d_in d_out: per-sample gradients a few at a time
        return S(nn.Linear(3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9 * 2, CLASSES)), torch.randn(n, 9, 3)
    if kind == "conv2d":
        return (S(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(inplace=True), nn.Conv2d(4, 3, (2, 1), dilation=(1, 2)),
                  nn.Flatten(), nn.Linear(3 * 2 * 3, CLASSES)), torch.randn(n, 2, 6, 6))
    if kind == "conv1d":
        return S(nn.Conv1d(2, 4, 3, dilation=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, CLASSES)), \
            torch.randn(n, 2, 8)
    if kind == "embedding":  # repeated indices in a sample, and a padding index
        return S(nn.Embedding(9, 6, padding_idx=0), nn.Flatten(), nn.Linear(6 * 5, CLASSES)), torch.randint(0, 9, (n, 5))
    if kind == "layer_norm":
        return S(nn.Linear(11, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, CLASSES)), torch.randn(n, 11)
    if kind == "layer_norm_positions":
        return S(nn.Linear(5, 6), nn.LayerNorm((3, 6)), nn.Flatten(), nn.Linear(18, CLASSES)), torch.randn(n, 3, 5)
    if kind == "group_norm":
        return S(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES)), \
            torch.randn(n, 2, 6, 6)
    if kind == "fallback":
        return S(nn.Linear(11, 7), ScaledTanh(7), nn.Linear(7, CLASSES)), torch.randn(n, 11)
    if kind == "tied":
        return Tied(), torch.randn(n, 6)
    raise ValueError(kind)


KINDS = ["linear", "linear_positions", "linear_long_positions", "conv2d", "conv1d", "embedding", "layer_norm",
         "layer_norm_positions", "group_norm", "fallback", "tied"]


def loop_reference(model, x, y, clip_norm):
    """Per-sample autograd in float64 (on a float64 copy of the model): norms and clipped sum."""
    model = _as_double(model)
    x = x.double() if x.is_floating_point() else x
    params = list(trainable(model).values())
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(LOSS(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        scale = torch.clamp(clip_norm / norm, max=1.0)
        for t, g in zip(total, grads):
            t += g * scale
    return dict(zip(trainable(model), total)), torch.stack(norms)


def _as_double(model):
    import copy
    return copy.deepcopy(model).double()


def relative_error(got: dict, want: dict) -> float:
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want) ** 0.5
    den = sum(float(want[k].pow(2).sum()) for k in want) ** 0.5
    return num / den


@pytest.mark.parametrize("kind", KINDS)
def test_float64_model_matches_the_loop_to_float64_rounding(kind):
    model, x = make(kind)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    model = model.double()
    xd = x.double() if x.is_floating_point() else x
    _, norms = loop_reference(model, x, y, 1.0)
    clip_norm = float(norms.median())  # about half the samples are clipped
    want, want_norms = loop_reference(model, x, y, clip_norm)
    got = clipped_sum64(model, LOSS, xd, y, clip_norm)
    assert set(got) == set(want) and all(g.dtype == torch.float64 for g in got.values())
    assert relative_error(got, want) <= 1e-12, kind
    plan = plan_for(model, trainable(model))
    if not plan.whole_model:
        torch.testing.assert_close(plan.last_norms, want_norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_model_matches_the_loop_to_float32_forward_rounding(kind):
    model, x = make(kind)
    y = torch.randint(0, CLASSES, (x.shape[0],))
    _, norms = loop_reference(model, x, y, 1.0)
    clip_norm = float(norms.median())
    want, _ = loop_reference(model, x, y, clip_norm)
    got = clipped_sum64(model, LOSS, x, y, clip_norm)
    assert all(got[k].shape == want[k].shape for k in want)
    assert relative_error(got, want) <= 1e-5, kind


def test_which_modules_take_which_path():
    plan = plan_for(*make("fallback")[:1], trainable(make("fallback")[0]))
    assert [type(f).__name__ for f in plan.forms] == ["LinearForm", "FallbackForm", "LinearForm", "LinearForm"]
    assert not plan.closed_form_only
    tied = make("tied")[0]
    assert plan_for(tied, trainable(tied)).whole_model
    linear = make("linear")[0]
    assert plan_for(linear, trainable(linear)).closed_form_only


def test_reducing_losses_are_made_per_sample():
    model, x = make("linear")
    y = torch.randint(0, CLASSES, (x.shape[0],))
    want = clipped_sum64(model, LOSS, x, y, 0.5)
    for loss in (torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="sum"),
                 lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")):
        got = clipped_sum64(model, loss, x, y, 0.5)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="one value per sample"):
        clipped_sum64(model, lambda out, t: out.sum(), x, y, 0.5)


def test_frozen_parameters_and_given_values():
    model, x = make("layer_norm")
    y = torch.randint(0, CLASSES, (x.shape[0],))
    model[0].weight.requires_grad_(False)
    values = {k: v.detach() + 0.01 for k, v in trainable(model).items()}
    got = clipped_sum64(model, LOSS, x, y, 0.5, values)
    assert "0.weight" not in got
    with torch.no_grad():
        for k, v in values.items():
            dict(model.named_parameters())[k].copy_(v)
    want, _ = loop_reference(model, x, y, 0.5)
    assert relative_error(got, want) <= 1e-5


def test_chunking_and_buffer_reuse():
    model, x = make("linear", n=50)
    y = torch.randint(0, CLASSES, (50,))
    whole = clipped_sum64(model, LOSS, x, y, 0.5)
    out = {k: torch.full_like(v, 7.0) for k, v in whole.items()}
    for chunk in (1, 7, 16):
        got = clipped_sum64(model, LOSS, x, y, 0.5, chunk=chunk, out=out)
        assert got is out
        # float32 forward passes of other batch shapes round differently: a few float32 ulps.
        assert relative_error(got, whole) <= 1e-6, chunk
    assert clipped_sum64(model, LOSS, x[:0], y[:0], 0.5)["0.weight"].abs().sum() == 0


def test_removing_samples_subtracts_their_part():
    """PCMU's check: sum without F = stored sum - F's part, up to the forward pass's float32
    roundings for other batch shapes (the rounding margin in pcmu/trainer.py covers them)."""
    model, x = make("linear", n=50)
    y = torch.randint(0, CLASSES, (50,))
    whole = clipped_sum64(model, LOSS, x, y, 0.5)
    keep = torch.ones(50, dtype=torch.bool)
    keep[[3, 17]] = False
    part = clipped_sum64(model, LOSS, x[~keep], y[~keep], 0.5)
    rest = clipped_sum64(model, LOSS, x[keep], y[keep], 0.5)
    worst = max(float((whole[k] - part[k] - rest[k]).abs().max()) for k in whole)
    assert worst <= 2.0**-20 * 0.5, worst


# ---- the whole-model vmap path (vmap.py) --------------------------------------------------------------

def test_clipped_per_sample_norms_and_scales():
    model, x = make("linear", n=37)
    y = torch.randint(0, CLASSES, (37,))
    _, norms = loop_reference(model, x, y, 1.0)
    clip_norm = float(norms.median())
    clipped = clipped_per_sample(model, LOSS, x, y, clip_norm)
    row_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in clipped.values()))
    expected = torch.minimum(norms, torch.tensor(clip_norm, dtype=torch.float64))
    torch.testing.assert_close(row_norms, expected, rtol=1e-5, atol=0)
    scales = clip_scales({"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), "b": torch.zeros(3, 0)}, 1.0)
    torch.testing.assert_close(scales, torch.tensor([0.2, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(9, 2 * per_sample.SUM_COLUMNS + 5), (4, 3, 7), (5, 0, 3), (0, 6), (3,)])
def test_weighted_row_sum_is_the_whole_tensor_mv(shape):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(shape, generator=gen)
    w = torch.rand(shape[0], generator=gen, dtype=torch.float64)
    want = torch.mv(g.reshape(shape[0], -1).t().double(), w).reshape(shape[1:]) if g.numel() else \
        torch.zeros(shape[1:], dtype=torch.float64)
    got = weighted_row_sum64(g, w)
    assert got.shape == shape[1:] and got.dtype == torch.float64
    assert torch.equal(got, want)


def test_batch_norm_in_training_mode_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, CLASSES))
    x, y = torch.randn(8, 4), torch.randint(0, CLASSES, (8,))
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        clipped_sum64(model, LOSS, x, y, 1.0)
    model.eval()  # eval mode: per-sample, the fallback handles its affine parameters
    got = clipped_sum64(model, LOSS, x, y, 1.0)
    want, _ = loop_reference(model, x, y, 1.0)
    assert relative_error(got, want) <= 1e-5
