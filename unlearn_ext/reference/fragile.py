"""Pure-PyTorch reference of fragile_compact (docs/design.md §4, per-request certificates).

The fragile coordinates of one step are those whose certified radius is below a threshold; they
come back in global-index order (the index of the list read as one long vector) with their values
as float32 and their radii. A NaN radius counts as fragile (never silently certified).
"""
from __future__ import annotations

import torch

from .smoothing import FLOAT_DTYPES  # the kernels' input dtypes



def fragile_compact(values, radii, threshold: float):
    if len(values) != len(radii):
        raise ValueError(f"values has {len(values)} tensors but radii has {len(radii)}")
    for i, (v, r) in enumerate(zip(values, radii)):
        if v.shape != r.shape:
            raise ValueError(f"values[{i}] has shape {tuple(v.shape)} but radii[{i}] has shape {tuple(r.shape)}")
        if v.dtype not in FLOAT_DTYPES or v.dtype != values[0].dtype:
            raise TypeError(f"values[{i}] has dtype {v.dtype}; expected one of float32, float16, bfloat16 "
                            "shared by the whole list")
        if r.dtype != torch.float32:
            raise TypeError(f"radii[{i}] must be float32, got {r.dtype}")
    device = values[0].device if values else torch.device("cpu")
    if not values:
        return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32),
                torch.empty(0, dtype=torch.float32))
    flat_v = torch.cat([v.reshape(-1).to(torch.float32) for v in values])
    flat_r = torch.cat([r.reshape(-1) for r in radii])
    threshold32 = torch.tensor(threshold, dtype=torch.float32, device=device)
    keep = ~(flat_r >= threshold32)
    index = torch.nonzero(keep).reshape(-1)
    return index, flat_v[index], flat_r[index]
