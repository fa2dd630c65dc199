"""What a user brings, for the user-loop tests: a map-style dataset whose items are made on the fly
(never held in memory as one tensor), small CNNs (GroupNorm, BatchNorm, dropout) and a tiny
transformer encoder over tokens, and the ordinary training loop."""
from __future__ import annotations

import torch
from torch import nn


class Pairs(torch.utils.data.Dataset):
    """Items (x[i], y[i]) of two tensors, through the Dataset protocol (not handed over as tensors)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class LazyImages(torch.utils.data.Dataset):
    """n 1x8x8 images of 3 classes, item i generated from its index (class i % 3 shifts the mean)."""

    def __init__(self, n: int, shift: float = 0.6):
        self.n, self.shift = n, shift

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i) + 1000)
        label = int(i) % 3
        image = torch.randn(1, 8, 8, generator=g) * 0.8
        image[:, label * 2:label * 2 + 3] += self.shift
        return image, label


class Augmented(torch.utils.data.Dataset):
    """LazyImages with a random flip and noise drawn from torch's global RNG (as torchvision's
    transforms do): reproducible only through SeededDataset."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.05 * torch.randn_like(x), y


class LazyTokens(torch.utils.data.Dataset):
    """n sequences of 6 tokens from a 12-token vocabulary; the class is whether token 3 appears
    more often than token 5 (ties: class 0)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i) + 7)
        tokens = torch.randint(0, 12, (6,), generator=g)
        return tokens, int((tokens == 3).sum() > (tokens == 5).sum())


def cnn(norm: str = "group", dropout: float = 0.0, classes: int = 3) -> nn.Module:
    layer = nn.GroupNorm(2, 4) if norm == "group" else nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer, nn.Tanh(), nn.Dropout(dropout),
                         nn.Flatten(), nn.Linear(256, classes))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 8, classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def user_loop(model, optimizer, loader, loss_fn, epochs: int, scheduler=None, per_step: bool = False):
    """The ordinary loop a user writes."""
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if scheduler is not None and per_step:
                scheduler.step()
        if scheduler is not None and not per_step:
            scheduler.step()
    return model


def scaled_step(model, optimizer, scaler, x, y, infinite_loss: bool = False) -> None:
    """One step of torch.amp's recipe without autocast or clipping (zero_grad, scaler.scale(loss)
    .backward(), scaler.step, scaler.update); infinite_loss: the loss times inf, which the scaler skips."""
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if infinite_loss else 1.0)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Parameters and buffers bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def distance_ratio(unlearned: nn.Module, original: nn.Module, retrained: nn.Module) -> float:
    return float((flat(unlearned) - flat(retrained)).norm() / (flat(original) - flat(retrained)).norm())
