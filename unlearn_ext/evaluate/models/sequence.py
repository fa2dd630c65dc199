"""Small transformers on integer token sequences (N x T, tokens 0..vocab-1): an encoder classifier
(`TokenClassifier`) and a decoder-only causal language model (`CausalLM`, next-token logits at
every position; the same blocks with a causal mask).

Written from plain tensor ops (linear layers, softmax attention, LayerNorm) rather than
nn.TransformerEncoder, whose fused inference path and attention kernels lack the forward-mode and
vmap rules that per-sample gradients and Hessian-vector products use. Pre-norm blocks; the
classifier reads the mean of the last block's outputs over positions.

Dropout is `SeededDropout`: its masks come from its own generator, seeded from (seed, number of
training-mode calls so far), so a run does not depend on torch's global RNG, and retraining from
a copy of the initial model draws the same mask sequence as the original training did.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SeededDropout(nn.Module):
    def __init__(self, p: float, seed: int):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p, self.seed, self.calls = float(p), int(seed), 0

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class SelfAttention(nn.Module):
    """causal=True: position i attends to positions <= i only (a decoder's mask)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.qkv, self.out, self.causal = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), causal

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """A pre-norm transformer block; causal=True makes it a decoder block (masked attention)."""

    def __init__(self, dim: int, heads: int, dropout: float, seed: int, causal: bool = False):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), SelfAttention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop1, self.drop2 = SeededDropout(dropout, seed), SeededDropout(dropout, seed + 1)

    def forward(self, x):
        x = x + self.drop1(self.attention(self.norm1(x)))
        return x + self.drop2(self.mlp(self.norm2(x)))


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int, length: int, classes: int, *, dim: int = 32, heads: int = 4, blocks: int = 2,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.vocab = int(vocab)
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout, seed + 2 * i) for i in range(blocks))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class CausalLM(nn.Module):
    """Decoder-only language model: tokens [b, T] -> next-token logits [b, T, vocab] (the logits at
    position i read tokens 0..i only)."""

    def __init__(self, vocab: int, length: int, *, dim: int = 32, heads: int = 4, blocks: int = 2,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.vocab = int(vocab)
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout, seed + 2 * i, causal=True) for i in range(blocks))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
