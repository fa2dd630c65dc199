"""What PCMU training records per step, so that deletion requests can be answered later without
retraining (DESIGN section 4, per-request certificate):

* the ids present in the batch and the step size, which with the initial weights and the codes
  replay every w_t bit for bit (codes packed 2 bits each);
* the smallest certified radius (the a-priori certificate);
* the fragile coordinates — radius < M*C/b + margin — with their exact pre-quantization values and
  radii, compacted by the `fragile_compact` kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_codes(codes: list[torch.Tensor]) -> torch.Tensor:
    """Ternary codes (int8 -1/0/+1, any shapes) -> uint8, four codes per byte (code + 1 in 2 bits)."""
    flat = torch.cat([c.reshape(-1) for c in codes]).to(torch.uint8).add_(1) if codes else torch.zeros(0, dtype=torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, torch.ones(pad, dtype=torch.uint8, device=flat.device)])
    q = flat.view(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).cpu()


def unpack_codes(packed: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Inverse of pack_codes: int8 codes shaped like `shapes`."""
    parts = [(packed >> s) & 3 for s in (0, 2, 4, 6)]
    flat = torch.stack(parts, 1).reshape(-1).to(torch.int8) - 1
    out, pos = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        out.append(flat[pos:pos + n].reshape(shape))
        pos += n
    return out


@dataclass
class PCMUStep:
    step: int
    ids: torch.Tensor              # int64 ids present in the batch
    step_size: float               # lr * scale of this step
    offset: int                    # RNG block offset used by this step (mc mode)
    applied: bool                  # False for an empty batch (no update)
    min_radius: float
    fragile_index: torch.Tensor    # int64 global coordinate indices, ascending
    fragile_value: torch.Tensor    # float32 pre-quantization values at those coordinates
    fragile_radius: torch.Tensor   # float32 certified radii there
    codes: torch.Tensor            # packed codes (uint8), empty when not applied

    def to_state(self) -> dict:
        return {"step": self.step, "ids": self.ids, "step_size": self.step_size, "offset": self.offset,
                "applied": self.applied, "min_radius": self.min_radius, "fragile_index": self.fragile_index,
                "fragile_value": self.fragile_value, "fragile_radius": self.fragile_radius,
                "codes": self.codes}

    @classmethod
    def from_state(cls, s: dict) -> "PCMUStep":
        return cls(**s)
