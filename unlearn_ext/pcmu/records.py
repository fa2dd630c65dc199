"""What PCMU training records per step, so that deletion requests can be answered later without
retraining (docs/design.md §4, per-request certificate):

* the step size, which with the initial weights and the codes replays every w_t bit for bit
  (codes packed 2 bits each). The batch's ids are not stored: the trainer's seeded schedule and the
  step each forgotten id was excluded from give them again (`PCMUTrainer.batch_ids`);
* the smallest certified radius (the a-priori certificate);
* the fragile coordinates — radius < M*C/b + margin — with their exact pre-quantization values
  (`FragileSet`), in whichever of two layouts is smaller for that step:
    sparse: the fragile coordinates' indices (int32 while d < 2^31) and values;
    dense:  every coordinate's value, the fragile ones being those whose radius is below the
            threshold (with M = 4 at b = 256 every coordinate was fragile at every step).
  Radii are stored only in `mc` mode: there they come from random draws. In `analytic` mode the
  radius is | |v| - beta |, recomputed from the value by the same kernel that computed it during
  training (same per-element float32 math, so bit for bit the same), so no radius is stored.
  Per fragile coordinate: sparse 8 bytes (analytic) / 12 (mc); dense 4 (analytic) / 8 (mc) per
  coordinate of the model, whether fragile or not. Our choice: the layout with fewer bytes, per step.
  `check_request` reads either layout through the same accessors (indices, values, radii).

One encoding: `PCMUStep.to_record()` gives a step as named 1-D tensors (packed codes; fragile values,
indices, radii) and JSON scalars (RNG offset, applied, smallest radius, layout...), its step size
apart. A history store writes exactly these as one step's exact fields, lr and meta (history.py);
`to_state()` (a trainer's state_dict, the deletion ledger's record chunks) holds the same pieces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import ops as _ops

SPARSE, DENSE = "sparse", "dense"
LAYOUTS = ("auto", SPARSE, DENSE)
_INT32_MAX = 2**31 - 1
# Steps per window of the vectorized per-step reads (the trainer's per-step arrays): bounds a
# request's working memory at any history length.
STEP_WINDOW = 1 << 16


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


# ---- fragile coordinates ---------------------------------------------------------------------------

def index_itemsize(coordinates: int) -> int:
    """Bytes per stored index: int32 while every index (< d) fits, else int64."""
    return 4 if coordinates - 1 <= _INT32_MAX else 8


def fragile_bytes(layout: str, coordinates: int, fragile: int, stores_radius: bool) -> int:
    """Bytes of one step's fragile set: `fragile` of `coordinates` coordinates in `layout`."""
    per_value = 8 if stores_radius else 4  # float32 value (+ float32 radius in mc mode)
    if layout == SPARSE:
        return fragile * (index_itemsize(coordinates) + per_value)
    if layout == DENSE:
        return coordinates * per_value
    raise ValueError(f"layout must be {SPARSE!r} or {DENSE!r}, got {layout!r}")


def smaller_layout(coordinates: int, fragile: int, stores_radius: bool) -> str:
    """The layout with fewer bytes (sparse on a tie)."""
    sparse = fragile_bytes(SPARSE, coordinates, fragile, stores_radius)
    return SPARSE if sparse <= fragile_bytes(DENSE, coordinates, fragile, stores_radius) else DENSE


@dataclass
class FragileSet:
    """One step's fragile coordinates (radius < threshold) with their pre-quantization values.

    Read it through indices() / values() / radii() (ascending global coordinate order, the same in
    both layouts) and count_below(); `layout` and `nbytes` say how it is stored.
    beta: analytic mode's decision threshold; radii are then recomputed from the values. None (mc
    mode, or a record from before this format): radii are stored in `radius`.
    """
    layout: str                     # SPARSE or DENSE
    coordinates: int                # d
    threshold: float                # fragile: radius < threshold (compared in float32, as the kernel)
    beta: float | None
    count: int                      # number of fragile coordinates
    value: torch.Tensor             # float32: fragile values (sparse) or every value (dense)
    index: torch.Tensor | None = None   # sparse: int32/int64 ascending coordinate indices
    radius: torch.Tensor | None = None  # stored radii (mc), aligned with `value`
    _below: dict = field(default_factory=dict, repr=False, compare=False)  # count_below memo

    @classmethod
    def empty(cls, coordinates: int = 0, threshold: float = 0.0) -> "FragileSet":
        return cls(SPARSE, coordinates, threshold, None, 0, torch.empty(0),
                   torch.empty(0, dtype=torch.int32), torch.empty(0))

    @classmethod
    def record(cls, values: list[torch.Tensor], radii: list[torch.Tensor], threshold: float, *,
               beta: float | None, layout: str = "auto") -> "FragileSet":
        """The fragile set of one step from its values v and radii (lists shaped like the params).
        beta: give analytic mode's threshold to store values only (radii recomputed on reading)."""
        if layout not in LAYOUTS:
            raise ValueError(f"fragile layout must be one of {LAYOUTS}, got {layout!r}")
        d = sum(v.numel() for v in values)
        stores_radius = beta is None
        flat_r = torch.cat([r.reshape(-1) for r in radii]) if radii else torch.empty(0)
        count = int(_fragile_mask(flat_r, threshold).sum())
        if layout == "auto":
            layout = smaller_layout(d, count, stores_radius)
        if layout == SPARSE:
            index, value, radius = _ops.fragile_compact(values, radii, threshold)
            index = index.to(torch.int32 if index_itemsize(d) == 4 else torch.int64)
            return cls(SPARSE, d, float(threshold), beta, count, value.cpu(), index.cpu(),
                       radius.cpu() if stores_radius else None)
        value = torch.cat([v.reshape(-1).to(torch.float32) for v in values]).cpu()
        return cls(DENSE, d, float(threshold), beta, count, value, None, flat_r.cpu() if stores_radius else None)

    # ---- reading (the same answers in both layouts) ----------------------------------------------

    def _stored_radii(self) -> torch.Tensor:
        """Radii aligned with `value`: stored (mc) or recomputed by the training kernel (analytic)."""
        if self.radius is not None:
            return self.radius
        if self.value.numel() == 0:
            return torch.empty(0)
        return _ops.quantize_analytic([self.value], self.beta, 0.0)[1][0]

    def _selection(self):
        """(index int64, positions in `value`) of the fragile coordinates."""
        if self.layout == SPARSE:
            return self.index.to(torch.int64), None
        keep = torch.nonzero(_fragile_mask(self._stored_radii(), self.threshold)).reshape(-1)
        return keep, keep

    def selected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, values, radii) of the fragile coordinates, the radii computed once (what a
        deletion check reads per step; the three accessors below each recompute them)."""
        radii = self._stored_radii()
        if self.layout == SPARSE:
            return self.index.to(torch.int64), self.value, radii
        keep = torch.nonzero(_fragile_mask(radii, self.threshold)).reshape(-1)
        return keep, self.value[keep], radii[keep]

    def indices(self) -> torch.Tensor:
        """int64 global coordinate indices of the fragile coordinates, ascending."""
        return self._selection()[0]

    def values(self) -> torch.Tensor:
        """float32 pre-quantization values at indices()."""
        pos = self._selection()[1]
        return self.value if pos is None else self.value[pos]

    def radii(self) -> torch.Tensor:
        """float32 certified radii at indices()."""
        pos = self._selection()[1]
        radii = self._stored_radii()
        return radii if pos is None else radii[pos]

    def count_below(self, bounds) -> list[int]:
        """For each bound: fragile coordinates with radius < bound (the certificate's counts)."""
        key = tuple(float(b) for b in bounds)
        if key not in self._below:
            radii = self._stored_radii()
            if self.layout == DENSE:
                radii = radii[_fragile_mask(radii, self.threshold)]
            self._below[key] = [int((radii < b).sum()) for b in key]
        return list(self._below[key])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.value, self.index, self.radius) if t is not None)

    # ---- persistence: PCMUStep.to_record writes a fragile set; this reads the form records held
    # before it (a dict of these fields, torch.load(weights_only=True) safe).

    @classmethod
    def from_state(cls, s: dict) -> "FragileSet":
        return cls(**s)


def _fragile_mask(radii: torch.Tensor, threshold: float) -> torch.Tensor:
    """fragile_compact's test: radius < threshold in float32; a NaN radius counts as fragile."""
    return ~(radii >= torch.tensor(threshold, dtype=torch.float32))


# ---- one step ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PCMUStep:
    step: int
    step_size: float               # lr * scale of this step
    offset: int                    # RNG block offset used by this step (mc mode)
    applied: bool                  # False for an empty batch (no update)
    min_radius: float
    fragile: FragileSet            # the fragile coordinates (either layout)
    codes: torch.Tensor            # packed codes (uint8), empty when not applied

    # The accessors check_request reads, whatever the layout.
    @property
    def fragile_index(self) -> torch.Tensor:
        return self.fragile.indices()

    @property
    def fragile_value(self) -> torch.Tensor:
        return self.fragile.values()

    @property
    def fragile_radius(self) -> torch.Tensor:
        return self.fragile.radii()

    def nbytes(self) -> dict:
        """Bytes this record holds: packed codes, fragile set (plus a few scalars, not counted)."""
        codes = self.codes.numel() * self.codes.element_size()
        return {"codes": codes, "fragile": self.fragile.nbytes, "total": codes + self.fragile.nbytes}

    def to_record(self) -> tuple[dict, dict]:
        """(tensors, meta): the record's 1-D tensors by name (RECORD_TENSORS; index and radius only
        when the layout stores them) and its scalars as JSON values (a non-finite smallest radius,
        an empty batch's, as a string). With `step` and `step_size` that is the whole record."""
        f = self.fragile
        tensors = {"codes": self.codes, "fragile_value": f.value}
        if f.index is not None:
            tensors["fragile_index"] = f.index
        if f.radius is not None:
            tensors["fragile_radius"] = f.radius
        meta = {"offset": self.offset, "applied": self.applied,
                "min_radius": self.min_radius if math.isfinite(self.min_radius) else repr(self.min_radius),
                "layout": f.layout, "coordinates": f.coordinates, "threshold": f.threshold, "beta": f.beta,
                "count": f.count}
        return tensors, meta

    @classmethod
    def from_record(cls, step: int, step_size: float, tensors: dict, meta: dict) -> "PCMUStep":
        """Inverse of to_record."""
        fragile = FragileSet(meta["layout"], int(meta["coordinates"]), float(meta["threshold"]),
                             None if meta["beta"] is None else float(meta["beta"]), int(meta["count"]),
                             tensors["fragile_value"], tensors.get("fragile_index"), tensors.get("fragile_radius"))
        if fragile.layout not in (SPARSE, DENSE):
            raise ValueError(f"unknown fragile layout {fragile.layout!r}")
        return cls(int(step), float(step_size), int(meta["offset"]), bool(meta["applied"]),
                   float(meta["min_radius"]), fragile, tensors["codes"])

    def to_state(self) -> dict:
        tensors, meta = self.to_record()
        return {"step": self.step, "step_size": self.step_size, "tensors": tensors, "meta": meta}

    @classmethod
    def from_state(cls, s: dict, coordinates: int = 0, threshold: float = 0.0) -> "PCMUStep":
        """From to_state's dict (to_record's pieces). Earlier forms load too: records with a
        "fragile" dict (FragileSet.from_state's fields), and records saved before the layouts existed (keys fragile_index,
        fragile_value, fragile_radius: int64 indices with stored radii) load as sparse sets with
        stored radii, exactly as they were recorded; `coordinates` and `threshold` (the trainer's)
        fill in what those records did not keep. Batch ids that earlier records stored are dropped
        here (the trainer's load derives what they told and checks them first: persistence.py)."""
        if "meta" in s:
            return cls.from_record(s["step"], s["step_size"], s["tensors"], s["meta"])
        s = dict(s)
        s.pop("ids", None)
        if "fragile" in s:
            s["fragile"] = FragileSet.from_state(s["fragile"])
        else:
            index, value, radius = s.pop("fragile_index"), s.pop("fragile_value"), s.pop("fragile_radius")
            s["fragile"] = FragileSet(SPARSE, coordinates, threshold, None, index.numel(), value, index, radius)
        return cls(**s)


# The tensors a record may hold (to_record), each 1-D of any length: a history store's exact fields.
RECORD_TENSORS = ("codes", "fragile_value", "fragile_index", "fragile_radius")


def check_step_sizes(trainer, steps) -> None:
    """Refuses recorded (step, step size) pairs that this trainer's lr does not give. The learning
    rate is a function of the step, so it is checked on the recorded steps: a resumed or replayed
    step with another lr would not be the coupled retraining. (A step size given per step has no
    function to check against: the records are its only record.)"""
    for step, size in [] if trainer.lr_given_per_step else steps:
        if float(size) != float(trainer._lr(step)):
            raise ValueError(f"saved PCMU state was trained with another learning rate (differs in: lr; step "
                             f"{step} used {size!r}, this trainer's lr gives {trainer._lr(step)!r})")


# ---- bytes, recorded and expected --------------------------------------------------------------

def record_bytes(records) -> dict:
    """What step records hold, in bytes: totals by part, per step, and layouts used. One pass over
    `records` (a history store's are read from its file one at a time)."""
    parts, fragile_coordinates, layouts = [], 0, {SPARSE: 0, DENSE: 0}
    for r in records:
        parts.append(r.nbytes())
        fragile_coordinates += r.fragile.count
        if r.applied:
            layouts[r.fragile.layout] += 1
    out = {k: sum(p[k] for p in parts) for k in ("codes", "fragile", "total")}
    out["steps"] = len(parts)
    out["per_step"] = [p["total"] for p in parts]
    out["fragile_per_step"] = [p["fragile"] for p in parts]
    out["mean_per_step"] = out["total"] / len(parts) if parts else 0.0
    out["fragile_coordinates"] = fragile_coordinates
    out["layouts"] = layouts
    return out


def estimate_record_bytes(coordinates: int, steps: int, *, mode: str = "analytic",
                          fragile_fraction: float = 1.0) -> dict:
    """Bytes the records of `steps` PCMU steps will need, before training: codes (d/4) and the
    fragile set of `fragile_fraction` of the d coordinates, in the smaller layout. The fraction is unknown before training; 1.0 (the default) is the worst case, which a
    large max_request at a small batch reaches (M = 4, b = 256 on a 64-256-256-10 MLP). A
    trainer's estimate_record_bytes uses the fraction its own steps so far have shown."""
    if not 0.0 <= fragile_fraction <= 1.0:
        raise ValueError(f"fragile_fraction must be in [0, 1], got {fragile_fraction}")
    if mode not in ("analytic", "mc"):
        raise ValueError(f"mode must be 'analytic' or 'mc', got {mode!r}")
    stores_radius = mode == "mc"
    fragile = math.ceil(fragile_fraction * coordinates)
    layout = smaller_layout(coordinates, fragile, stores_radius)
    per_step = {"codes": -(-coordinates // 4),
                "fragile": fragile_bytes(layout, coordinates, fragile, stores_radius)}
    out = {k: steps * v for k, v in per_step.items()}
    out["total"] = sum(out.values())
    out.update(steps=steps, per_step=sum(per_step.values()), layout=layout, fragile_fraction=fragile_fraction)
    return out
