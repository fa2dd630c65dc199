"""The causal language model setting (`--data corpus --model causal-lm`): the corpus's documents
and their ids, the per-sequence loss and the measures against straightforward loops, the decoder's
causal mask, forget sets of whole documents, and the harness end to end at tiny sizes."""
import json
import math

import numpy as np
import pytest
import torch

from unlearn_ext import mia
from unlearn_ext.evaluate import corpus, datasets, harness, language, models

pytest.importorskip("sklearn")


def loop_sequence_loss(logits, targets):
    """Each document's mean over its own positions of -log softmax(logits)[target], one by one."""
    out = []
    for doc_logits, doc_targets in zip(logits, targets):
        terms = [-torch.log_softmax(doc_logits[t].double(), 0)[int(doc_targets[t])]
                 for t in range(len(doc_targets)) if int(doc_targets[t]) != corpus.IGNORE]
        out.append(sum(terms) / len(terms))
    return torch.stack(out)


@pytest.fixture(scope="module")
def ds():
    return datasets.load("corpus", form="documents")


def test_documents_are_the_corpus_stream_under_their_ids(ds):
    x_all, y_all = corpus.generate(len(ds.x) + len(ds.x_test), 0)
    ids = ds.ids.numpy()
    assert np.array_equal(ds.x.numpy(), x_all[ids]) and np.array_equal(ds.y.numpy(), y_all[ids])
    assert len(np.unique(ids)) == len(ids) and not np.array_equal(ids, np.arange(len(ids)))  # corpus ids, not rows
    held_out = np.setdiff1d(np.arange(len(x_all)), ids)
    assert np.array_equal(ds.x_test.numpy(), x_all[held_out])
    for x, y in zip(x_all, y_all):  # BOS w1 .. w_{L-1} predicts w1 .. wL; padding after the document
        length = int((y != corpus.IGNORE).sum())
        assert corpus.MIN_WORDS <= length <= corpus.LENGTH and x[0] == corpus.BOS
        assert np.array_equal(x[1:length], y[:length - 1])
        assert (x[length:] == corpus.PAD).all() and (y[length:] == corpus.IGNORE).all()
        assert (y[:length] >= corpus.FIRST_WORD).all()
    again, other = corpus.generate(20, 0), corpus.generate(20, 1)
    assert np.array_equal(again[0], x_all[:20]) and not np.array_equal(other[0], x_all[:20])


def test_per_sequence_loss_and_measures_match_loops(ds):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ds.x[:40]), corpus.LENGTH, corpus.VOCAB, generator=g, dtype=torch.float64)
    targets = ds.y[:40]
    expected = loop_sequence_loss(logits, targets)
    data = ds.training_data()
    assert torch.allclose(data.loss(logits, targets), expected, rtol=1e-12, atol=0)
    assert torch.allclose(language.per_sequence_cross_entropy(logits, targets), expected, rtol=1e-12, atol=0)

    model = models.make("causal-lm", ds.input_shape, ds.classes, 0, vocab=ds.vocab).double()
    with torch.no_grad():
        out = model(ds.x[:40])
    assert torch.allclose(language.sequence_losses(model, ds.x[:40], targets), loop_sequence_loss(out, targets))
    right = total = 0
    for doc_out, doc_targets in zip(out, targets):
        for t in range(corpus.LENGTH):
            if int(doc_targets[t]) != corpus.IGNORE:
                right += int(doc_out[t].argmax()) == int(doc_targets[t])
                total += 1
    assert language.token_accuracy(model, ds.x[:40], targets) == pytest.approx(right / total, abs=1e-12)
    features = language.sequence_features(model, ds.x[:3], targets[:3])
    for row, doc_out, doc_targets in zip(features, out, targets[:3]):
        keep = doc_targets != corpus.IGNORE
        p = torch.softmax(doc_out[keep], -1)
        true = p.gather(1, doc_targets[keep].unsqueeze(1)).squeeze(1)
        assert row == pytest.approx([float(-true.log().mean()), float(true.mean()),
                                     float(-(p * p.log()).sum(1).mean())], rel=1e-9)


def test_the_decoder_reads_no_future_token(ds):
    model = models.make("causal-lm", ds.input_shape, ds.classes, 0, vocab=ds.vocab).eval()
    x = ds.x[:4].clone()
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 5) % corpus.VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])          # positions 0..8 read tokens 0..8 only
    assert not torch.allclose(a[:, 9:], b[:, 9:])   # the later ones do see the change


def test_forget_sets_are_whole_documents_and_the_mia_reads_their_mean_losses(ds):
    run = harness.train_run(ds, "causal-lm", 0, epochs=1)
    forget = harness.forget_ids(run.data, 0.05, 0)
    assert forget.numel() == round(0.05 * len(ds.x)) and bool(torch.isin(forget, ds.ids).all())
    xf, yf = run.data.batch(forget)
    x_all, y_all = corpus.generate(len(ds.x) + len(ds.x_test), 0)
    assert np.array_equal(xf.numpy(), x_all[forget.numpy()]) and np.array_equal(yf.numpy(), y_all[forget.numpy()])
    lengths = [sum(int(t) != corpus.IGNORE for t in doc) for doc in yf]
    assert harness.accuracy_units(ds, run.data, forget) == (sum(lengths), "tokens")
    measured = harness.measure(run.original, ds, run.data, forget)
    with torch.no_grad():
        members = loop_sequence_loss(run.original.eval()(xf), yf)
        outsiders = loop_sequence_loss(run.original(ds.x_test), ds.y_test)
    assert measured["mia_auc"] == pytest.approx(mia.loss_auc(members, outsiders), abs=1e-12)
    assert not math.isnan(measured["mia_efficacy"])


def test_pcmus_clipped_sums_are_per_document(ds):
    """PCMU clips each document's gradient of its per-sequence loss: the closed-form sums on the
    decoder equal a loop over documents (one backward each, clipped, added in float64)."""
    from unlearn_ext.parameters import trainable
    from unlearn_ext.per_sample import clipped_sum64

    model = models.make("causal-lm", ds.input_shape, ds.classes, 0, vocab=ds.vocab).double()
    x, y, clip = ds.x[:6], ds.y[:6], 0.5
    params = trainable(model)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        loss = loop_sequence_loss(model(x[i:i + 1]), y[i:i + 1])[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        for (k, _), g in zip(params.items(), grads):
            want[k] += g * min(1.0, clip / norm)
    got = clipped_sum64(model, language.per_sequence_cross_entropy, x, y, clip)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k


def test_distillation_repair_is_refused_on_per_position_logits(ds):
    rows = harness.evaluate(datasets.load("corpus", form="documents", limit=40), model="causal-lm",
                            methods=["topk-distill"], ratios=[0.1], epochs=1, noise_floor_seeds=0)
    row = next(r for r in rows if r["method"] == "topk-distill")
    assert row["status"] == "refused" and "distills (batch, classes) logits" in row["reason"]


def test_unlearn_ext_eval_on_the_corpus_end_to_end(tmp_path):
    from unlearn_ext.cli import main
    pytest.importorskip("matplotlib")
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["eval", "--data", "corpus", "--model", "causal-lm", "--limit", "60", "--epochs", "2",
                 "--ratios", "0.1", "--seeds", "0", "--noise-floor", "1", "--quiet", "--methods",
                 "finetune,topk,randomk,mini,deltagrad", "--out", str(out), "--json", str(js)]) == 0
    for name in ("report.md", "accuracy.png", "cost.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads(js.read_text())
    by = {r["method"]: r for r in payload["records"]}
    assert set(by) == {"original", "retrain", "finetune", "topk", "randomk", "mini", "deltagrad"}
    assert all(by[m]["status"] == "unlearned" for m in ("finetune", "topk", "randomk"))
    for m in ("mini", "deltagrad"):  # answered, or fell back to retraining's answer at retraining's cost
        assert by[m]["status"] in ("unlearned", "fallback"), by[m]["reason"]
        if by[m]["status"] == "fallback":
            assert by[m]["d_d0"] == 0.0 and by[m]["cost_vs_retrain"] <= 1.05
    assert all(r["forget_size"] == 6 for r in payload["records"])
    note = by["original"]["fr_note"]  # FR's n/a rule counts what the accuracy counts: tokens
    assert note.endswith(" tokens") or " forget tokens (< " in note, note
    assert by["original"]["ud"] is None and "discrete" in by["original"]["ud_note"]
    s = payload["settings"]
    assert s["data"] == "corpus" and s["data_kind"] == "documents" and s["input_shape"] == [corpus.LENGTH]
    assert "forget sets are whole documents" in (out / "report.md").read_text()
