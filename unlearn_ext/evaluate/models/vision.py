"""Convolutional models for images (C x H x W) and signals (C x L): the same code builds the 2-D
and the 1-D version, chosen by the input's rank.

  cnn     two 3x3 convolutions (16, 32 channels, the second with stride 2), GroupNorm and ReLU after
          each, global average pooling, a linear classifier (~6k parameters on 1x8x8).
  resnet  a small ResNet: a 3x3 stem (16 channels) and three stages of one basic block each (16, 32,
          64 channels, stride 1, 2, 2), global average pooling, a linear classifier (~75k parameters);
          sized for 8x8 and 32x32 inputs. norm='group' (GroupNorm, per-sample: every method can
          serve it) or 'batch' (BatchNorm, which mixes the samples of a batch in training mode:
          methods that need per-sample quantities refuse it).
"""
from __future__ import annotations

import torch
from torch import nn


def _layers(spatial_dims: int):
    if spatial_dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"convolutional models take images (C x H x W) or signals (C x L), got {spatial_dims} "
                     "spatial dimensions")


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(4, channels), channels)  # 4 groups: per-sample, batch-size independent
    if kind == "batch":
        return _layers(spatial_dims)[1](channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


def cnn(input_shape, classes: int) -> nn.Module:
    channels, dims = int(input_shape[0]), len(input_shape) - 1
    conv, _, pool = _layers(dims)
    return nn.Sequential(
        conv(channels, 16, 3, padding=1), _norm("group", 16, dims), nn.ReLU(),
        conv(16, 32, 3, padding=1, stride=2), _norm("group", 32, dims), nn.ReLU(),
        pool(1), nn.Flatten(), nn.Linear(32, classes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, dims: int):
        super().__init__()
        conv = _layers(dims)[0]
        self.conv1, self.norm1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(norm, cout, dims)
        self.conv2, self.norm2 = conv(cout, cout, 3, padding=1, bias=False), _norm(norm, cout, dims)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout, dims))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape, classes: int, norm: str = "group") -> nn.Module:
    channels, dims = int(input_shape[0]), len(input_shape) - 1
    conv, _, pool = _layers(dims)
    return nn.Sequential(
        conv(channels, 16, 3, padding=1, bias=False), _norm(norm, 16, dims), nn.ReLU(),
        BasicBlock(16, 16, 1, norm, dims), BasicBlock(16, 32, 2, norm, dims), BasicBlock(32, 64, 2, norm, dims),
        pool(1), nn.Flatten(), nn.Linear(64, classes))
