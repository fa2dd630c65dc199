"""SPD-GAN, the slightly perturbed distribution GAN, and the unlearning degree UD (docs/design.md §7,
our formulation).

Why: on a model that generalizes, a forget sample is classified the same way with or without it in
training, so accuracy on F cannot show whether a method forgot. SPD-GAN makes forget samples whose
answer *does* depend on membership: a small generator moves each forget input by at most `eps`
(standardized units) per feature,

    x~ = clip(x + eps * tanh(G(x, z)), feature range),   constant features frozen,

trained against a discriminator (real vs perturbed: stay on the data distribution) and against a
reference model trained without F (x~ must be hard for a model that never saw it). A model trained
on R + x~(F) then gets x~(F) right by memorizing it, and a model trained without F does not.
The unlearning degree of a method run on that model is

    UD = (A_before(x~) - A_after(x~)) / (A_before(x~) - A_retrain(x~)),  capped at 1,

1 = as far as retraining, 0 = did nothing. UD rewards damage (a method that breaks the model scores
well), so it is always read beside the test-accuracy drop. Two checks come with it:
  * a *fresh, held-out* detector (not the GAN's own discriminator) trained on retained points real
    vs perturbed, scored on F real vs x~(F): near 0.5 means the perturbation is "slight";
  * the perturbed-test control: the same generator applied to test points, where no model was
    trained on them: the accuracy a non-member gets on perturbed points (part of the gap on x~(F)
    is generic fragility to the perturbation, not membership).
UD is reported only where |F| >= MIN_FORGET (with fewer points the gap is a handful of samples).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch

MIN_FORGET = 30          # docs/design.md §7: "use only where |F| >= ~30"
MIN_GAP_SAMPLES = 2      # the same n/a rule as the forgetting rate


class SPDGenerator(torch.nn.Module):
    """x -> x + eps * tanh(G([x, z])), clipped to [low, high] per feature; features with
    low == high (constant in the training data) never move."""

    def __init__(self, features: int, low: torch.Tensor, high: torch.Tensor, *, eps: float = 0.5,
                 noise_dim: int = 8, hidden: int = 64):
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if low.shape != (features,) or high.shape != (features,):
            raise ValueError(f"low/high must have shape ({features},), got {tuple(low.shape)}, {tuple(high.shape)}")
        self.eps, self.noise_dim = float(eps), int(noise_dim)
        self.net = torch.nn.Sequential(torch.nn.Linear(features + noise_dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, features))
        self.register_buffer("low", low.detach().float().clone())
        self.register_buffer("high", high.detach().float().clone())
        self.register_buffer("movable", (high > low).float())

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        step = self.eps * torch.tanh(self.net(torch.cat([x, z], 1))) * self.movable
        return torch.minimum(torch.maximum(x + step, self.low), self.high)

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """One fixed perturbation per row (z drawn from a seeded generator)."""
        gen = torch.Generator().manual_seed(int(seed))
        return self(x, torch.randn(x.shape[0], self.noise_dim, generator=gen))


def fit_generator(x: torch.Tensor, y: torch.Tensor, reference: torch.nn.Module, low: torch.Tensor,
                  high: torch.Tensor, *, eps: float = 0.5, steps: int = 300, lr: float = 2e-3,
                  hard_weight: float = 1.0, hidden: int = 64, seed: int = 0) -> SPDGenerator:
    """Trains the generator on the forget inputs x (labels y). Generator loss (our formulation):
    the non-saturating GAN loss against the discriminator + hard_weight * the reference model's
    mean probability of the true label on x~ (bounded, so it cannot swamp the GAN term)."""
    if x.shape[0] == 0:
        raise ValueError("SPD-GAN needs at least one forget sample")
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        gen = SPDGenerator(x.shape[1], low, high, eps=eps, hidden=hidden)
        disc = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.LeakyReLU(0.2),
                                   torch.nn.Linear(hidden, 1))
        ref = copy.deepcopy(reference).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(x.shape[0], 1), torch.zeros(x.shape[0], 1)
        for _ in range(steps):
            fake = gen(x, torch.randn(x.shape[0], gen.noise_dim))
            d_loss = bce(disc(x), ones) + bce(disc(fake.detach()), zeros)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            p_true = torch.softmax(ref(fake), 1).gather(1, y.reshape(-1, 1)).mean()
            g_loss = bce(disc(fake), ones) + hard_weight * p_true
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
    return gen.eval()


def detector_accuracy(train_real: torch.Tensor, train_perturbed: torch.Tensor, test_real: torch.Tensor,
                      test_perturbed: torch.Tensor, seed: int = 0) -> float:
    """A fresh detector (an MLP, 64 hidden units) fit to tell train_real from train_perturbed, scored
    on held-out test_real vs test_perturbed (balanced accuracy; 0.5 = cannot tell them apart)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    for name, t in (("train_real", train_real), ("train_perturbed", train_perturbed), ("test_real", test_real),
                    ("test_perturbed", test_perturbed)):
        if t.ndim != 2 or t.shape[0] < 2:
            raise ValueError(f"{name} must be a 2-D set of at least 2 rows, got shape {tuple(t.shape)}")
    xtr = torch.cat([train_real, train_perturbed]).double().numpy()
    ytr = np.r_[np.ones(len(train_real)), np.zeros(len(train_perturbed))]
    with warnings.catch_warnings():  # on indistinguishable sets the fit never "converges": expected
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=int(seed)).fit(xtr, ytr)
    real_right = float((clf.predict(test_real.double().numpy()) == 1).mean())
    perturbed_right = float((clf.predict(test_perturbed.double().numpy()) == 0).mean())
    return (real_right + perturbed_right) / 2


def unlearning_degree(acc_before: float, acc_after: float, acc_retrain: float,
                      forget_size: int) -> tuple[float | None, str]:
    """(UD capped at 1, note); None with the reason when |F| < MIN_FORGET or when the model before
    unlearning and the retrained one differ on fewer than MIN_GAP_SAMPLES perturbed forget points."""
    if forget_size < MIN_FORGET:
        return None, f"n/a: |F| = {forget_size} < {MIN_FORGET} (too few points for SPD-GAN)"
    gap = acc_before - acc_retrain
    if gap * forget_size < MIN_GAP_SAMPLES - 1e-9:
        return None, (f"n/a: before and retrained models differ on {gap * forget_size:.1f} of {forget_size} "
                      f"perturbed forget points (< {MIN_GAP_SAMPLES})")
    return min(1.0, (acc_before - acc_after) / gap), f"gap of {gap * forget_size:.0f} perturbed points"


@dataclass
class SPDSet:
    """A forget set replaced by its SPD-GAN perturbation, with its checks."""
    x_forget: torch.Tensor      # x~(F), to train the model on in place of F
    x_test: torch.Tensor        # the same generator on the test inputs (the control)
    detector_acc: float         # fresh held-out detector, F real vs x~(F)
    max_shift: float            # largest |x~ - x| over F (<= eps by construction)


def perturb_forget_set(x_forget: torch.Tensor, y_forget: torch.Tensor, x_retain: torch.Tensor,
                       x_test: torch.Tensor, reference: torch.nn.Module, low: torch.Tensor, high: torch.Tensor,
                       *, eps: float = 0.5, steps: int = 300, seed: int = 0) -> SPDSet:
    """Fits the generator on F against `reference` (a model trained without F), perturbs F and the
    test inputs, and scores a fresh detector trained on retained points (one half real, the other
    half perturbed, so it cannot pair them) and tested on F real vs x~(F)."""
    gen = fit_generator(x_forget, y_forget, reference, low, high, eps=eps, steps=steps, seed=seed)
    x_tilde = gen.perturb(x_forget, seed + 1)
    order = torch.randperm(x_retain.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    half = x_retain.shape[0] // 2
    real, to_perturb = x_retain[order[:half]], x_retain[order[half:2 * half]]
    detector = detector_accuracy(real, gen.perturb(to_perturb, seed + 3), x_forget, x_tilde, seed)
    return SPDSet(x_tilde, gen.perturb(x_test, seed + 4), detector, float((x_tilde - x_forget).abs().max()))
