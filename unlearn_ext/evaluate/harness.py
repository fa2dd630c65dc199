"""The evaluation harness (docs/design.md §8): every method against retraining, per forget ratio
and seed, with the do-nothing row beside them and the noise floor of retraining itself.

    records = evaluate(load("digits"), model="mlp", methods=["pcmu", "finetune"],
                       ratios=[0.01, 0.1], seeds=[0, 1], epochs=20)

One record per (dataset, model, method, ratio, seed) with plain measure names (see RECORD_FIELDS);
`summarize` gives means and spreads over seeds. Rows: `original` (no unlearning) and `retrain`
always, then the methods. Per-run MIA gaps are |MIA - MIA of that run's reference retrain|.

A method that cannot serve the run (e.g. one needing per-sample quantities on a BatchNorm model)
is recorded, not raised: its rows carry status 'refused' and the method's message in `reason`,
and the other methods go on. Cost is reported three ways against that ratio's retraining: wall
time, CPU time of the process (all threads) and sample-gradient evaluations. One-off warm-ups are
paid while the unlearner is built (build_seconds), outside the timed request.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch

from .. import metrics, mia
from ..data import TrainingData, retrain
from . import language, models
from .datasets import Dataset
from .training import RecipeOptions
from .memory import PeakMemory
from . import ud as ud_column
from .methods import OTHER_SEED_OFFSET, Method, Run, other_seed_config, reinitialized, resolve

RECORD_FIELDS = {
    "dataset": "dataset name", "model": "model name", "method": "original | retrain | a method (| <method>-original, <method>-retrain for methods with "
              "their own training, e.g. pcmu)",
    "reference": "what the row is compared with: retrain (plain SGD without F) or pcmu-coupled-retrain",
    "ratio": "forget ratio |F| / n", "seed": "training seed", "forget_size": "|F|",
    "status": "the method's report status (original/retrain rows: 'reference'; 'refused': the method cannot serve "
              "this model or data, its message in reason, measures None)",
    "reason": "the method's report reason (e.g. which safety check made it fall back) or, when refused, its message",
    "test_acc": "accuracy on the test set", "retain_acc": "accuracy on R = D \\ F",
    "forget_acc": "accuracy on F", "mia_auc": "loss-threshold MIA AUC, F vs test",
    "mia_gap": "|mia_auc - mia_auc of the reference retrain| (this run)",
    "mia_efficacy": "fraction of F a retain-vs-test classifier calls members",
    "d_d0": "||w - w_retrain|| / ||w_orig - w_retrain|| (primary for history methods; diagnostic otherwise)",
    "fr": "forgetting rate, retrain-normalized (None where the orig-vs-retrain gap on F < 2 samples; on documents "
          "< 2 tokens, the unit of their accuracy)",
    "fr_raw": "raw forgetting rate (A_orig(F) - A_new(F)) / A_orig(F)", "fr_note": "why fr is None",
    "mrr": "memory retention rate A_new(R) / A_orig(R)",
    "seconds": "wall time of the unlearning call (retrain row: of retraining)",
    "cpu_seconds": "CPU time of the process (all threads) during the unlearning call (retrain row: of retraining)",
    "build_seconds": "wall time of building the unlearner: one-off warm-ups (the first forward-over-reverse "
                     "product in a process) are paid here, not inside the request (None on reference rows)",
    "speedup": "reference retrain seconds / seconds", "cost_vs_retrain": "sample-gradient cost / retraining's",
    "wall_vs_retrain": "seconds / the reference retrain's seconds (this ratio)",
    "cpu_vs_retrain": "cpu_seconds / the reference retrain's cpu_seconds (this ratio)",
    "history_bytes": "history bytes the method read",
    "peak_memory_bytes": "peak memory growth of the unlearning call (method rows; else None), as peak_memory_kind "
                         "says: cpu_rss_growth = peak resident set during the call minus the resident set at its "
                         "start (Linux VmHWM, reset per call; a lower bound: memory the allocators already held "
                         "and reused is not counted; None where not measurable), cuda_max_allocated = CUDA "
                         "tensor memory (unlearn_ext/evaluate/memory.py)",
    "peak_memory_kind": "cpu_rss_growth | cuda_max_allocated | None (rows without an unlearning call)",
    "retrain_spread_test_acc": "max - min test accuracy over the reference retrain and the retrains with other seeds",
    "retrain_spread_mia_auc": "max - min MIA AUC over the reference retrain and the retrains with other seeds",
    "retrain_floor_test_gaps": "the noise floor: |test accuracy - the reference retrain's| of each retrain with another "
                               "seed (other initial weights and batch order; noise_floor_seeds of them; [] if 0)",
    "retrain_floor_mia_gaps": "the noise floor: |MIA AUC - the reference retrain's| of each retrain with another seed",
    "retrain_floor_test_gap": "max of retrain_floor_test_gaps (None without retrains): a method's |test gap| at or "
                              "below it is within retraining's own variation in this run",
    "retrain_floor_mia_gap": "max of retrain_floor_mia_gaps (None without retrains), the same for the per-run MIA gap",
    "ud": "SPD-GAN unlearning degree (A_before(x~F) - A_after(x~F)) / (A_before(x~F) - A_retrain(x~F)), capped at "
          "1, on a model trained on R + x~(F) (None where |F| < 30, the gap is < 2 points, or not computed; "
          "read it beside the test accuracy: UD rewards damage)",
    "details": "the method's evidence for this request (UnlearnReport.details), its plain JSON values only "
               "(numbers, strings, booleans, None, and lists / dicts of them; tensors and other objects left out), "
               "e.g. Top-K's selected, the adaptive K's k_chosen / k_stop_reached / k_trials; {} on rows without an "
               "unlearning call",
    "ud_note": "why ud is None, or the size of its gap", "ud_checks": "SPD-GAN's checks for this (seed, ratio): "
    "detector_acc (fresh held-out detector, F real vs x~(F); 0.5 = indistinguishable), max_shift, before/after/"
    "retrain accuracy on x~(F), control_* (accuracy on the perturbed test points), after_test_acc; None with ud",
}


def forget_ids(data: TrainingData, ratio: float, seed: int) -> torch.Tensor:
    """A seeded uniformly random forget set of round(ratio * n) ids (at least one) of the training
    items (on documents each id is a whole document)."""
    if not 0 < ratio < 1:
        raise ValueError(f"forget ratios must be in (0, 1), got {ratio}")
    k = max(1, int(round(ratio * len(data))))
    rng = np.random.default_rng([seed, int(round(ratio * 1e6)), 17])
    return data.ids[torch.from_numpy(rng.choice(len(data), k, replace=False))].sort().values


def check_forget_sizes(n: int, ratios) -> None:
    """Refuses ratios whose forget set would be the whole training set (nothing left to retrain on)."""
    for ratio in ratios:
        k = max(1, int(round(ratio * n)))
        if k >= n:
            raise ValueError(f"forget ratio {ratio:g} of n = {n} training samples forgets {k}, all of them: "
                             "use more samples or a smaller ratio")


# The share of the test pool the harness sets aside as the validation split (the user's validation
# set: Top-K / Random-k's held-out accuracy guard reads it); reported test accuracy reads the rest.
VALIDATION_FRACTION = 0.25


def validation_size(n_test: int, fraction: float = VALIDATION_FRACTION) -> int:
    """How many of a test pool of n_test samples carve_validation sets aside: at least one, leaving at
    least one test sample; none from a pool of one."""
    return min(max(1, int(round(fraction * n_test))), n_test - 1) if n_test > 1 else 0


def check_validation(specs, model: str, n_test: int) -> None:
    """Refuses, before training, methods that read the validation split (the held-out guard) when a
    test pool of n_test samples leaves none to carve."""
    needing = [spec.name for spec in specs if spec.reads_validation(model)]
    if needing and validation_size(n_test) == 0:
        raise ValueError(f"{', '.join(needing)}: the held-out accuracy guard reads the validation split carved "
                         f"from the test pool, which needs at least 2 test samples (one to validate on, one to "
                         f"test); the test pool has {n_test} sample(s)")


def carve_validation(ds: Dataset, fraction: float = VALIDATION_FRACTION) -> tuple[Dataset, tuple]:
    """(ds with the validation split removed from its test pool, (x_val, y_val)). The split is a
    fixed seeded draw (the same for every training seed), at least one sample, and leaves at least
    one test sample; a test pool of one sample gives an empty validation split (check_validation
    refuses the methods that would read it)."""
    n = int(ds.y_test.shape[0])
    count = validation_size(n, fraction)
    order = torch.from_numpy(np.random.default_rng(20261207).permutation(n)).to(ds.y_test.device)
    val, test = order[:count].sort().values, order[count:].sort().values
    return (dataclasses.replace(ds, x_test=ds.x_test[test], y_test=ds.y_test[test]),
            (ds.x_test[val], ds.y_test[val]))


def train_run(ds: Dataset, model: str, seed: int, epochs: int | None = None, widths=None,
              sgd: dict | None = None, *, recipe: RecipeOptions | None = None, model_options: dict | None = None,
              device: str = "cpu", validation: tuple | None = None) -> Run:
    """Trains one seed's original. recipe: the run's training options (training.RecipeOptions) over
    `sgd` (a named setting's SGD fields) or the model's defaults; epochs overrides both.
    model_options: norm / dropout of the models that take them. validation: the (x, y) split the
    methods may read as the user's validation set (carve_validation), never ds's test pool."""
    data = ds.training_data()
    initial = build_model(ds, model, seed, widths, model_options).to(device)
    options = recipe or RecipeOptions()
    if epochs:
        options = dataclasses.replace(options, epochs=epochs)
    config = options.build(model, seed, len(data), base=sgd)
    began = time.perf_counter()
    original = config.train(copy.deepcopy(initial), data)
    # Held-out non-members for normalized ascent's stop: every other test sample.
    return Run(ds.name, model, seed, data, initial, config, original, time.perf_counter() - began,
               holdout=(ds.x_test[::2], ds.y_test[::2]), validation=validation)


def build_model(ds: Dataset, model: str, seed: int, widths=None, model_options: dict | None = None):
    """The initial model of seed `seed` for these data, checked to give (batch, classes) outputs
    ((batch, T, vocab) next-token logits on documents)."""
    net = models.make(model, ds.input_shape, ds.classes, seed, widths, vocab=ds.vocab, **(model_options or {}))
    models.check_outputs(net, ds.x, ds.classes, model, per_position=ds.kind == "documents")
    return net


def measure(model, ds: Dataset, data: TrainingData, forget: torch.Tensor) -> dict:
    """Accuracy on the test split, the retained and the forgotten samples, and membership inference
    (loss AUC and efficacy) of `model` after forgetting `forget`: the measured columns of a row.
    On documents: next-token accuracy, and the MIA on each document's mean loss (language.py)."""
    accuracy, losses, features = (language.token_accuracy, language.sequence_losses, language.sequence_features) \
        if ds.kind == "documents" else (metrics.accuracy, metrics.per_sample_losses, mia.features)
    keep = data.without(forget)
    xr, yr = data.batch(keep)
    xf, yf = data.batch(forget)
    return {"test_acc": accuracy(model, ds.x_test, ds.y_test),
            "retain_acc": accuracy(model, xr, yr), "forget_acc": accuracy(model, xf, yf),
            "mia_auc": mia.loss_auc(losses(model, xf, yf), losses(model, ds.x_test, ds.y_test)),
            "mia_efficacy": mia.efficacy(model, (xr, yr), (ds.x_test, ds.y_test), (xf, yf), features=features)}


def accuracy_units(ds: Dataset, data: TrainingData, forget) -> tuple[int, str]:
    """What forget accuracy counts: F's samples, or on documents F's (unpadded) target tokens."""
    if ds.kind == "documents":
        return int((data.batch(forget)[1] != language.IGNORE).sum()), "tokens"
    return int(forget.numel()), "samples"


def _row(run: Run, method: str, reference: str, ratio: float, forget, measured: dict, ref: dict,
         orig: dict, w, w_orig, w_ref, units: tuple[int, str], **extra) -> dict:
    fr, fr_raw, note = metrics.forgetting_rate(orig["forget_acc"], measured["forget_acc"], ref["forget_acc"], *units)
    row = {"dataset": run.dataset, "model": run.model_name, "method": method, "reference": reference,
           "ratio": ratio, "seed": run.seed, "forget_size": int(forget.numel()), "status": "reference",
           **measured, "mia_gap": abs(measured["mia_auc"] - ref["mia_auc"]),
           "d_d0": metrics.distance_ratio(w, w_orig, w_ref), "fr": fr, "fr_raw": fr_raw, "fr_note": note,
           "mrr": metrics.retention_rate(measured["retain_acc"], orig["retain_acc"]),
           "reason": "", "seconds": None, "cpu_seconds": None, "build_seconds": None, "speedup": None,
           "cost_vs_retrain": None, "wall_vs_retrain": None, "cpu_vs_retrain": None, "history_bytes": 0,
           "peak_memory_bytes": None, "peak_memory_kind": None, "details": {}, "ud": None, "ud_note": None,
           "ud_checks": None}
    row.update(extra)
    return row


def evaluate(ds: Dataset | Callable[[int], Dataset], *, model: str = "mlp", methods=("pcmu", "finetune"), ratios=(0.01, 0.05, 0.1, 0.2, 0.3),
             seeds=(0,), epochs: int | None = None, widths=None, noise_floor_seeds: int = 2,
             ud: bool = False, progress: Callable[[str], None] | None = None, sgd: dict | None = None,
             recipe: RecipeOptions | None = None, model_options: dict | None = None,
             device: str = "cpu") -> list[dict]:
    """Runs every method against retraining; returns one record per row (RECORD_FIELDS). ud=True
    adds SPD-GAN's unlearning degree (evaluate/ud.py: about doubles the cost where |F| >= 30).
    sgd: the SGD fields of a named setting (settings.py) instead of the model's defaults; recipe:
    the command line's training options over either (training.py); model_options: norm / dropout.
    ds: a Dataset, or a function seed -> Dataset when the data depend on the training seed (label
    noise drawn per seed: datasets.per_seed)."""
    specs = resolve(methods)
    tick = progress or (lambda what: None)
    records = []
    for seed in seeds:
        seed_ds = _on_device(ds(seed) if callable(ds) else ds, device)
        check_validation(specs, model, int(seed_ds.y_test.shape[0]))
        seed_ds, validation = carve_validation(seed_ds)
        run = train_run(seed_ds, model, seed, epochs, widths, sgd, recipe=recipe, model_options=model_options,
                        device=device, validation=validation)
        tick(f"seed {seed}: trained the original ({run.train_seconds:.1f} s)")
        prepared = {}
        for spec in specs:
            prepared[spec.name] = _attempt(lambda: spec.prepare(run))
            tick(f"seed {seed}: prepared {spec.name}")
        for ratio in ratios:
            records += _evaluate_ratio(seed_ds, run, specs, prepared, ratio, noise_floor_seeds, tick, ud)
    return records


@dataclasses.dataclass
class Refusal:
    """What a method raised instead of serving the run: recorded as its rows' reason."""
    message: str


def _attempt(work: Callable):
    """work(), or a Refusal with its error in one line: one method that cannot serve a model must
    not end the whole evaluation with a traceback."""
    try:
        return work()
    except Exception as exc:  # any method's refusal or failure is recorded on its rows
        return Refusal(" ".join(f"{type(exc).__name__}: {exc}".split()))


def _on_device(ds: Dataset, device: str) -> Dataset:
    if device == "cpu":
        return ds
    return dataclasses.replace(ds, x=ds.x.to(device), y=ds.y.to(device), x_test=ds.x_test.to(device),
                               y_test=ds.y_test.to(device))


def _evaluate_ratio(ds, run: Run, specs: list[Method], prepared: dict, ratio: float, noise_floor_seeds: int,
                    tick, ud: bool = False) -> list[dict]:
    forget = forget_ids(run.data, ratio, run.seed)
    clock = _Clock()
    gold = retrain(run.initial, run.data, run.config, forget)
    retrain_cost = clock.stop()
    orig_m, gold_m = (measure(m, ds, run.data, forget) for m in (run.original, gold))
    common = _noise_floor(ds, run, forget, noise_floor_seeds, gold_m)
    units = accuracy_units(ds, run.data, forget)
    rows = [
        _row(run, "original", "retrain", ratio, forget, orig_m, gold_m, orig_m, run.original, run.original, gold,
             units, **common),
        _row(run, "retrain", "retrain", ratio, forget, gold_m, gold_m, orig_m, gold, run.original, gold, units,
             seconds=retrain_cost.wall, cpu_seconds=retrain_cost.cpu, speedup=1.0, cost_vs_retrain=1.0,
             wall_vs_retrain=1.0, cpu_vs_retrain=1.0, **common),
    ]
    tick(f"seed {run.seed}, ratio {ratio:g}: retrained ({retrain_cost.wall:.1f} s)")
    for spec in specs:
        rows += _run_method(ds, run, spec, prepared[spec.name], forget, ratio, orig_m, gold_m, gold,
                            retrain_cost, common, units)
        tick(f"seed {run.seed}, ratio {ratio:g}: {spec.name} ({rows[-1]['status']})")
    if ud and ds.kind in ("tokens", "documents"):
        ud_column.not_computed(rows, "n/a: SPD-GAN perturbs continuous inputs; token ids are discrete")
    elif ud:
        done = _attempt(lambda: ud_column.attach(rows, ds, run, specs, lambda spec, r: spec.prepare(r), forget, gold))
        if isinstance(done, Refusal):
            ud_column.not_computed(rows, f"n/a: SPD-GAN failed on these data ({done.message})")
        tick(f"seed {run.seed}, ratio {ratio:g}: SPD-GAN unlearning degree")
    else:
        ud_column.not_computed(rows, "not computed (ud=False; `unlearn-ext eval` computes it, the demo with --ud)")
    return rows


@dataclasses.dataclass
class Cost:
    wall: float
    cpu: float


class _Clock:
    """Wall time and the process's CPU time (every thread's) from construction to stop()."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Cost:
        return Cost(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def _run_method(ds, run, spec: Method, prepared, forget, ratio, orig_m, gold_m, gold, retrain_cost: Cost,
                common, units: tuple[int, str]) -> list[dict]:
    """The method's row; for a method with its own training (PCMU) also that training's original
    and coupled-retrain rows (<name>-original, <name>-retrain), its reference. A method that
    raises gives one row with status 'refused' and its message."""
    if isinstance(prepared, Refusal):
        return [_refused_row(run, spec, ratio, forget, prepared.message, common)]
    rows = []
    if spec.own_original is not None:
        original = spec.own_original(run, prepared)
        clock = _Clock()
        reference = _attempt(lambda: spec.own_retrain(run, prepared, forget))
        if isinstance(reference, Refusal):
            return [_refused_row(run, spec, ratio, forget, reference.message, common)]
        reference_cost = clock.stop()
        orig_m, ref_m = (measure(m, ds, run.data, forget) for m in (original, reference))
        rows.append(_row(run, f"{spec.name}-original", spec.reference, ratio, forget, orig_m, ref_m, orig_m,
                         original, original, reference, units, **common))
        rows.append(_row(run, f"{spec.name}-retrain", spec.reference, ratio, forget, ref_m, ref_m, orig_m,
                         reference, original, reference, units, seconds=reference_cost.wall,
                         cpu_seconds=reference_cost.cpu, speedup=1.0, cost_vs_retrain=1.0, wall_vs_retrain=1.0,
                         cpu_vs_retrain=1.0, **common))
    else:
        original, reference, reference_cost, ref_m = run.original, gold, retrain_cost, gold_m
    clock = _Clock()
    unlearner = _attempt(lambda: spec.build(run, prepared))
    build = clock.stop()
    if isinstance(unlearner, Refusal):
        return rows + [_refused_row(run, spec, ratio, forget, unlearner.message, common)]
    with PeakMemory(cuda=_on_cuda(unlearner.model)) as peak:
        clock = _Clock()
        report = _attempt(lambda: unlearner.unlearn(forget))
        cost = clock.stop()
    if isinstance(report, Refusal):
        return rows + [_refused_row(run, spec, ratio, forget, report.message, common)]
    measured = measure(unlearner.model, ds, run.data, forget)
    row = _row(run, spec.name, spec.reference, ratio, forget, measured, ref_m, orig_m, unlearner.model, original,
               reference, units, status=report.status, reason=report.reason, seconds=report.seconds,
               cpu_seconds=cost.cpu, build_seconds=build.wall,
               speedup=reference_cost.wall / report.seconds if report.seconds > 0 else math.inf,
               cost_vs_retrain=report.cost_vs_retrain, wall_vs_retrain=_ratio(report.seconds, reference_cost.wall),
               cpu_vs_retrain=_ratio(cost.cpu, reference_cost.cpu), history_bytes=report.history_bytes_read,
               peak_memory_bytes=peak.bytes, peak_memory_kind=peak.kind if peak.bytes is not None else None,
               details=plain_details(report.details), **common)
    return rows + [row]


_UNMEASURED = ("test_acc", "retain_acc", "forget_acc", "mia_auc", "mia_gap", "mia_efficacy", "d_d0", "fr", "fr_raw",
               "mrr", "history_bytes")


def _refused_row(run, spec: Method, ratio, forget, message: str, common) -> dict:
    row = {"dataset": run.dataset, "model": run.model_name, "method": spec.name, "reference": spec.reference,
           "ratio": ratio, "seed": run.seed, "forget_size": int(forget.numel()), "status": "refused",
           "reason": message, **{k: None for k in _UNMEASURED}, "fr_note": "the method refused",
           "seconds": None, "cpu_seconds": None, "build_seconds": None, "speedup": None, "cost_vs_retrain": None,
           "wall_vs_retrain": None, "cpu_vs_retrain": None, "peak_memory_bytes": None, "peak_memory_kind": None,
           "details": {}, "ud": None, "ud_note": None, "ud_checks": None}
    row.update(common)
    return row


_PLAIN = (bool, int, float, str, type(None))
_DROP = object()  # marks a value plain_details leaves out


def plain_details(details: dict) -> dict:
    """The entries of a report's details as strict JSON values (recursively through lists, tuples and
    string-keyed dicts), so every record serializes with allow_nan=False whatever a method puts in
    its report: numpy scalars and 0-d tensors become Python numbers, non-finite floats become None
    (a fallback's ||e|| can be inf or NaN); anything else (a tensor with elements, a dataclass) is
    left out rather than converted, since its meaning is the method's to state."""
    def plain(value):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar, 0-d tensor
            value = value.item()
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, (list, tuple)):
            items = [plain(v) for v in value]
            return _DROP if any(v is _DROP for v in items) else items
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                return _DROP
            items = {k: plain(v) for k, v in value.items()}
            return _DROP if any(v is _DROP for v in items.values()) else items
        return _DROP
    out = {k: plain(v) for k, v in details.items() if isinstance(k, str)}
    return {k: v for k, v in out.items() if v is not _DROP}


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _noise_floor(ds, run: Run, forget, count: int, gold_m: dict) -> dict:
    """Retraining's own variation (docs/design.md §8): `count` retrains without F from other seeds --
    other initial weights and another batch order, seed + OTHER_SEED_OFFSET * j for j = 1..count, as the
    `retrain-other` row draws them (j = 1 is that row's retrain) -- each compared with the reference
    retrain (`gold_m`, already measured). Returns the record fields retrain_spread_* (max - min over
    the reference and the others), retrain_floor_*_gaps (each other retrain's |gap| to the
    reference) and retrain_floor_*_gap (their max)."""
    if count < 1:
        return dict(retrain_spread_test_acc=None, retrain_spread_mia_auc=None, retrain_floor_test_gaps=[],
                    retrain_floor_mia_gaps=[], retrain_floor_test_gap=None, retrain_floor_mia_gap=None)
    accs, aucs = [gold_m["test_acc"]], [gold_m["mia_auc"]]
    for j in range(1, count + 1):
        seed = run.seed + OTHER_SEED_OFFSET * j
        m = measure(retrain(reinitialized(run.initial, seed), run.data, other_seed_config(run.config, seed), forget),
                     ds, run.data, forget)
        accs.append(m["test_acc"])
        aucs.append(m["mia_auc"])
    test_gaps = [abs(a - accs[0]) for a in accs[1:]]
    mia_gaps = [abs(a - aucs[0]) for a in aucs[1:]]
    return dict(retrain_spread_test_acc=max(accs) - min(accs), retrain_spread_mia_auc=max(aucs) - min(aucs),
                retrain_floor_test_gaps=test_gaps, retrain_floor_mia_gaps=mia_gaps,
                retrain_floor_test_gap=max(test_gaps), retrain_floor_mia_gap=max(mia_gaps))


MEASURES = ("test_acc", "retain_acc", "forget_acc", "mia_auc", "mia_gap", "mia_efficacy", "d_d0", "fr", "mrr", "ud",
            "seconds", "cpu_seconds", "build_seconds", "speedup", "wall_vs_retrain", "cpu_vs_retrain",
            "cost_vs_retrain", "history_bytes", "peak_memory_bytes", "retrain_spread_test_acc",
            "retrain_spread_mia_auc", "retrain_floor_test_gap", "retrain_floor_mia_gap")
# Fields measured on this machine rather than computed: they differ from run to run.
TIMING_FIELDS = ("seconds", "cpu_seconds", "build_seconds", "speedup", "wall_vs_retrain", "cpu_vs_retrain",
                 "peak_memory_bytes", "peak_memory_kind")
# Where a record says why a measure is None.
_NOTES = {"ud": "ud_note", "fr": "fr_note"}


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread (max - min) over seeds per (dataset, model, method, ratio). A measure no
    seed could give keeps its place as None, with why in `<measure>_note` (the records' notes, or
    the method's refusal)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (dataset, model, method, ratio), rows in groups.items():
        s = {"dataset": dataset, "model": model, "method": method, "ratio": ratio, "seeds": len(rows),
             "reference": rows[0]["reference"], "statuses": sorted({r["status"] for r in rows})}
        refusals = sorted({r["reason"] for r in rows if r["status"] == "refused"})
        if refusals:
            s["refused"] = refusals
        for k in MEASURES:
            vals = [r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
            s[k] = float(np.mean(vals)) if vals else None
            s[k + "_spread"] = float(max(vals) - min(vals)) if len(vals) > 1 else None
            if not vals:
                notes = sorted({r.get(_NOTES[k]) or "" for r in rows} - {""}) if k in _NOTES else []
                s[k + "_note"] = "; ".join(notes or [f"refused: {m}" for m in refusals]) or None
        out.append(s)
    return out
