"""The two PCMU examples of docs/design.md §4, run by `unlearn-ext pcmu` (demo code: it sits with the
evaluation, above the library, and the digits setting is the one the harness runs PCMU with on the
tabular models; networks get their own profile, pcmu_profiles.py).

* synthetic: make_classification (20k train, 5 features, 3 classes), logistic regression, full batch,
  C = 1, tau = 0.1, sigma = 0.005, lr*scale = 0.1, T = 20 — the regime where m* >= 1;
* digits: sklearn's bundled 8x8 digits (1400 train / 397 test), logistic regression, b = 350,
  C = 1, tau = 0.006, sigma = 0.01, lr*scale = 0.05, 6 epochs (chosen on a held-out split with
  seed 1, reported with seed 0) — the regime where m* = 0 and the per-request check decides.

Each prints PCMU vs plain SGD accuracy (same batches, same initial weights), the a-priori
certificate, PCMU's training cost over plain SGD, and how deletion requests are answered, with the
check's cost against retraining from scratch.
"""
from __future__ import annotations

import tempfile
import time

import torch

from ..ledger import DeletionLedger
from ..pcmu import PCMUTrainer, PCMUUnlearner

SETTINGS = {
    "synthetic": dict(batch_size=20000, clip_norm=1.0, lr=0.1, tau=0.1, sigma=0.005, max_request=8, epochs=20,
                      plain_lr=0.5),
    "digits": dict(batch_size=350, clip_norm=1.0, lr=0.05, tau=0.006, sigma=0.01, max_request=3, epochs=6,
                   plain_lr=0.5),
}


def load(name: str):
    if name == "synthetic":
        from sklearn.datasets import make_classification
        x, y = make_classification(n_samples=25000, n_features=5, n_informative=4, n_redundant=0, n_classes=3,
                                   n_clusters_per_class=1, class_sep=1.5, random_state=0)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        mean, std = x[:20000].mean(0), x[:20000].std(0)
        return (x[:20000] - mean) / std, y[:20000], (x[20000:] - mean) / std, y[20000:]
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        return x[:1400], y[:1400], x[1400:], y[1400:]
    raise ValueError(f"unknown example {name!r}; choose 'synthetic' or 'digits'")


def _model(name, d_in, classes, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(d_in, classes)
    if name == "synthetic":
        torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    return model


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _trainer(name, x, y, seed, mode, exclude=None):
    s = SETTINGS[name]
    model = _model(name, x.shape[1], int(y.max()) + 1, seed)
    return PCMUTrainer(model, torch.nn.functional.cross_entropy, (x, y), batch_size=s["batch_size"],
                       clip_norm=s["clip_norm"], lr=s["lr"], tau=s["tau"], sigma=s["sigma"], mode=mode,
                       max_request=s["max_request"], seed=seed, exclude=exclude)


def _train(trainer, name):
    s = SETTINGS[name]
    began = time.perf_counter()
    if name == "synthetic":
        trainer.train(steps=s["epochs"])
    else:
        trainer.train(epochs=s["epochs"])
    return time.perf_counter() - began


def _plain_sgd(name, x, y, seed, steps_like: PCMUTrainer) -> tuple[torch.nn.Module, float]:
    """Plain SGD on the mean loss over the same batches from the same initial weights."""
    model = _model(name, x.shape[1], int(y.max()) + 1, seed)
    opt = torch.optim.SGD(model.parameters(), lr=SETTINGS[name]["plain_lr"])
    began = time.perf_counter()
    for r in steps_like.records:
        rows = steps_like.rows(steps_like.batch_ids(r.step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return model, time.perf_counter() - began


def run(name: str, seed: int = 0, requests: int = 12, mode: str = "analytic") -> dict:
    x, y, x_test, y_test = load(name)
    _trainer(name, x, y, seed, mode).train(steps=1)  # warm-up: one-time setup is not training cost
    trainer = _trainer(name, x, y, seed, mode)
    pcmu_seconds = _train(trainer, name)
    plain, plain_seconds = _plain_sgd(name, x, y, seed, trainer)
    cert = trainer.certificate()
    out = {"example": name, "mode": mode, "pcmu_test_accuracy": _accuracy(trainer.model, x_test, y_test),
           "plain_sgd_test_accuracy": _accuracy(plain, x_test, y_test), "pcmu_seconds": pcmu_seconds,
           "plain_sgd_seconds": plain_seconds, "cost_over_plain_sgd": pcmu_seconds / max(plain_seconds, 1e-9),
           "certificate": cert.to_dict(), "certificate_text": str(cert)}
    # Single-id requests checked against the record (no retraining): what fraction is certified,
    # where the others diverge, and what a check costs next to retraining (measured once).
    gen = torch.Generator().manual_seed(1000 + seed)
    shuffled = trainer.schedule.ids[torch.randperm(trainer.schedule.ids.numel(), generator=gen)]
    ids, to_delete = shuffled[:requests], shuffled[requests:requests + 4]
    checks = [trainer.check_request(ids[i:i + 1]) for i in range(requests)]
    retrain = _trainer(name, x, y, seed, mode, exclude=ids[:1])
    out["requests"] = {
        "checked": requests,
        "certified": sum(c.certified for c in checks),
        "by_status": {s: sum(c.status == s for c in checks) for s in sorted({c.status for c in checks})},
        "first_divergent_steps": [c.first_divergent_step for c in checks if not c.certified],
        "mean_check_seconds": sum(c.seconds for c in checks) / requests,
        "retrain_seconds": _train(retrain, name),
        "steps": trainer.steps_done,
    }
    # Prompt deletion through the ledger: a request within m* (if any) and one beyond it.
    with tempfile.TemporaryDirectory() as directory:
        with DeletionLedger(PCMUUnlearner(trainer), directory) as ledger:
            answers = []
            if cert.budget >= 1:
                answers.append(ledger.forget(to_delete[:min(cert.budget, 2)].tolist()))
            answers.append(ledger.forget(to_delete[2:4].tolist()))
            out["deletions"] = [f"request {i}: {a}" for i, a in enumerate(answers)]
    out["pcmu_test_accuracy_after_deletions"] = _accuracy(trainer.model, x_test, y_test)
    return out


def report(r: dict) -> str:
    q = r["requests"]
    lines = [
        f"== PCMU example: {r['example']} ({r['mode']}) ==",
        f"  test accuracy: PCMU {r['pcmu_test_accuracy']:.4f} vs plain SGD {r['plain_sgd_test_accuracy']:.4f}",
        f"  training time: PCMU {r['pcmu_seconds']:.2f} s vs plain SGD {r['plain_sgd_seconds']:.2f} s "
        f"({r['cost_over_plain_sgd']:.1f}x)",
        f"  {r['certificate_text']}",
        f"  {q['checked']} single-id requests checked against the record: {q['certified']} certified exact, "
        f"by status {q['by_status']}; first divergent steps of the others {q['first_divergent_steps']} "
        f"(of {q['steps']} steps)",
        f"  a check costs {q['mean_check_seconds'] * 1e3:.1f} ms vs {q['retrain_seconds']:.2f} s to retrain",
    ]
    lines += [f"  ledger: {a}" for a in r["deletions"]]
    lines.append(f"  test accuracy after the deletions: {r['pcmu_test_accuracy_after_deletions']:.4f}")
    return "\n".join(lines)
