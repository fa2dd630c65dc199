"""Per-sample clipped gradients (unlearn_ext/per_sample.py) against an eager loop over samples:
autograd per sample, clip to C, sum in float64. Also the column-blocked float64 sum against the
whole-tensor matrix-vector product it replaced (same bits), and chunking invariance."""
import pytest
import torch

from unlearn_ext import per_sample
from unlearn_ext.pcmu.trainer import DEFAULT_MARGIN_FACTOR
from unlearn_ext.per_sample import clip_scales, clipped_per_sample, clipped_sum64, weighted_row_sum64

LOSS = torch.nn.functional.cross_entropy


def model_and_batch(seed=0, n=37):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(11, 23), torch.nn.Tanh(), torch.nn.Linear(23, 5))
    x = torch.randn(n, 11) * 2.0
    y = torch.randint(0, 5, (n,))
    return model, x, y


def eager_clipped_sum(model, x, y, clip_norm):
    params = [p for p in model.parameters()]
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(LOSS(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        norms.append(norm)
        scale = min(1.0, clip_norm / norm)
        for t, g in zip(total, grads):
            t += g.double() * scale
    return total, torch.tensor(norms)


def test_clipped_sum_matches_an_eager_loop():
    model, x, y = model_and_batch()
    _, norms = eager_clipped_sum(model, x, y, 1.0)
    clip_norm = float(norms.median())  # about half the samples are clipped
    want, _ = eager_clipped_sum(model, x, y, clip_norm)
    got = clipped_sum64(model, LOSS, x, y, clip_norm)
    assert all(g.dtype == torch.float64 for g in got.values())
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-6 * clip_norm, msg=name)


def test_clipped_per_sample_norms_and_scales():
    model, x, y = model_and_batch(seed=1)
    _, norms = eager_clipped_sum(model, x, y, 1.0)
    clip_norm = float(norms.median())
    clipped = clipped_per_sample(model, LOSS, x, y, clip_norm)
    row_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in clipped.values()))
    expected = torch.minimum(norms.double(), torch.tensor(clip_norm, dtype=torch.float64))
    torch.testing.assert_close(row_norms, expected, rtol=1e-5, atol=0)
    scales = clip_scales({"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), "b": torch.zeros(3, 0)}, 1.0)
    torch.testing.assert_close(scales, torch.tensor([0.2, 1.0, 1.0]))


def test_chunking_moves_the_mean_far_less_than_the_pcmu_margin():
    """vmap computes per-sample gradients with batched matmuls whose float32 roundings depend on
    how many samples share the call, so the clipped sum depends on chunking (and on the batch's
    other samples) by float32 roundings. PCMU's certificates assume such differences of the step's
    mean stay below its rounding margin with a >= 100x safety factor (pcmu/trainer.py): check that here."""
    clip_norm, n = 0.5, 50
    model, x, y = model_and_batch(seed=2, n=n)
    whole = clipped_sum64(model, LOSS, x, y, clip_norm)
    for chunk in (1, 7, 16):
        chunked = clipped_sum64(model, LOSS, x, y, clip_norm, chunk=chunk)
        worst = max(float((chunked[k] - whole[k]).abs().max()) for k in whole) / n
        assert worst <= DEFAULT_MARGIN_FACTOR * clip_norm / 100, (chunk, worst)
    # A sample's contribution is (nearly) the same alone as inside the batch.
    alone = clipped_sum64(model, LOSS, x[3:4], y[3:4], clip_norm)
    rest = clipped_sum64(model, LOSS, torch.cat([x[:3], x[4:]]), torch.cat([y[:3], y[4:]]), clip_norm)
    worst = max(float((alone[k] + rest[k] - whole[k]).abs().max()) for k in whole) / n
    assert worst <= DEFAULT_MARGIN_FACTOR * clip_norm / 100, worst


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
