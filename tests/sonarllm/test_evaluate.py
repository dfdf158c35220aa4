"""Metrics (sonarllm.metrics) against hand-computed values, and held-out evaluation
(sonarllm.evaluate) on a tiny corpus with the session's toy bundle (from test_generate).

Shape legend: N target sentences, E SONAR dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from sonarllm import metrics
from sonarllm.evaluate import EvalOptions, evaluate, format_table, prefix_length
from sonarllm.generate import GenerationOptions, generate
from sonarllm.loss import SonarTokenLoss
from sonarllm.text import document_sentences

pytestmark = pytest.mark.usefixtures("one_thread")


CORPUS = [
    "The cat sat on the mat. A dog ran in the park. Tom had a red ball. She was very happy today.",
    "Tom had a red ball.",
    "   ",
    "She was very happy today. They played all day long.",
    "Once upon a time there was a little cat. The sun was warm and bright. The cat sat on the mat.",
]
FAST = EvalOptions(batch_size=2, beam_size=2, max_tokens=6)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_bleu_of_identical_sentences_is_100():
    assert metrics.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_bleu_hand_computed():
    # no zero n-gram count: plain BLEU, p1..p4 = 5/6, 4/5, 3/4, 2/3, equal lengths (BP = 1)
    assert metrics.bleu("a b c d e g", "a b c d e f") == pytest.approx(100 * (1 / 3) ** 0.25)
    # brevity penalty: 4 hypothesis tokens for 6 reference tokens, all n-grams match
    assert metrics.bleu("a b c d", "a b c d e f") == pytest.approx(100 * math.exp(1 - 6 / 4))
    # method4 smooths the 4-gram precision 0/1 to 1 / (2 * 5 / ln 4)
    p4 = math.log(4) / 10
    assert metrics.bleu("a b c x", "a b c d") == pytest.approx(
        100 * (3 / 4 * 2 / 3 * 1 / 2 * p4) ** 0.25
    )
    # ... and, quirk of the paper's setting, identical 2-token strings: p3 = ln2/10, p4 = ln2/20
    p3, p4 = math.log(2) / 10, math.log(2) / 20
    assert metrics.bleu("a b", "a b") == pytest.approx(100 * (p3 * p4) ** 0.25)
    assert metrics.bleu("", "a b") == 0.0
    assert metrics.bleu("x y z", "a b c") == 0.0


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(
        500 / 6
    )
    # P = 1, R = 1/2 -> F1 = 2/3
    assert metrics.rouge_l("the cat", "the cat sat down") == pytest.approx(200 / 3)
    # lowercased and stemmed: cats -> cat, running -> run; were/was differ: LCS 3 of 4
    assert metrics.rouge_l("The cats were running", "the cat was run") == pytest.approx(75.0)
    assert metrics.rouge_l("", "the cat") == 0.0


def test_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(metrics.cosine(a, b), torch.tensor([1.0, -(0.5**0.5)]))
    with pytest.raises(ValueError, match="one shape"):
        metrics.cosine(a, b[:1])


def test_missing_metric_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import fails
    metrics._rouge_scorer.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'sonarllm\[eval\]'"):
            metrics.rouge_l("a", "a")
    finally:
        metrics._rouge_scorer.cache_clear()


def test_metrics_reject_non_text():
    with pytest.raises(TypeError, match="hypothesis"):
        metrics.bleu(["a"], "a")


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_prefix_lengths_of_the_two_protocols():
    assert [prefix_length("short", n) for n in (1, 2, 3, 9)] == [None, None, 2, 2]
    assert [prefix_length("long", n) for n in (1, 2, 3, 5, 8)] == [None, 1, 1, 2, 4]
    with pytest.raises(ValueError, match="protocol"):
        prefix_length("medium", 3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_documents", 0),
        ("batch_size", 0),
        ("beam_size", 0),
        ("nlg", "yes"),
        ("temperature", -1.0),
        ("short_prefix", 0),
        ("max_tokens", 0),
    ],
)
def test_options_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"EvalOptions.{field}"):
        EvalOptions(**{field: value})


@pytest.fixture(scope="module")
def results(toy):
    return evaluate(toy.model, toy.pipeline, CORPUS, FAST)


def test_evaluate_counts_and_finite_numbers(results):
    # sentences per document (end sentence excluded): 4, 1, -, 2, 3
    assert (results["documents"], results["empty_documents"]) == (5, 1)
    assert results["target_sentences"] == 4 + 1 + 2 + 3  # sentences 2..n and the end sentence
    assert (results["short"]["documents"], results["short"]["skipped"]) == (2, 2)  # n >= 3
    assert (results["long"]["documents"], results["long"]["skipped"]) == (3, 1)  # n >= 2
    for value in (
        results["cross_entropy"],
        results["cosine"],
        *(results[p][m] for p in ("short", "long") for m in ("rouge_l", "bleu", "cosine")),
    ):
        assert math.isfinite(value)
    assert 0 < results["cross_entropy"] < 2 * math.log(256)
    assert len(results["short"]["samples"]) == 2 and len(results["long"]["samples"]) == 3
    json.dumps(results)  # serialisable as is


def test_cross_entropy_is_the_training_objective(toy, results):
    """Token mean over all labels of all documents of SonarTokenLoss, recomputed per document
    with the padded forward."""
    loss_fn = SonarTokenLoss(toy.pipeline.decoder, toy.pipeline.tokenizer)
    total, tokens = 0.0, 0
    for text in CORPUS:
        sentences = document_sentences(text)
        if not sentences:
            continue
        with torch.inference_mode():
            emb_NE = toy.pipeline.encode(sentences)
            pred_NE = toy.model(emb_NE[None])[0, :-1]
            targets = loss_fn.targets(sentences[1:])
            total += float(loss_fn(pred_NE, targets, num_items=1))
        tokens += sum(len(toy.pipeline.tokenizer.pieces(s)) + 3 for s in sentences[1:])
        assert targets.num_tokens == sum(
            len(toy.pipeline.tokenizer.pieces(s)) + 3 for s in sentences[1:]
        )
    assert results["target_tokens"] == tokens
    assert results["cross_entropy"] == pytest.approx(total / tokens, rel=1e-5)


def test_next_sentence_is_the_first_generated_sentence(toy, results):
    opts = GenerationOptions(beam_size=2, max_tokens=6, eos_threshold=None)
    for name in ("short", "long"):
        for sample in results[name]["samples"]:
            prefix_len = len(document_sentences(sample["prefix"], add_eos=False))
            gen = dataclasses.replace(opts, max_sentences=prefix_len + 1)
            (out,) = generate(toy.model, toy.pipeline, [sample["prefix"]], gen)
            assert out.sentences == [sample["prediction"]]


def test_results_do_not_depend_on_the_batch_size(toy, results):
    one = evaluate(toy.model, toy.pipeline, CORPUS, dataclasses.replace(FAST, batch_size=1))
    assert one["cross_entropy"] == pytest.approx(results["cross_entropy"], rel=1e-5)
    assert one["short"]["samples"] == results["short"]["samples"]
    assert one["long"]["rouge_l"] == pytest.approx(results["long"]["rouge_l"])


def test_max_documents_and_no_nlg(toy):
    out = evaluate(
        toy.model, toy.pipeline, iter(CORPUS), dataclasses.replace(FAST, max_documents=2, nlg=False)
    )
    assert (out["documents"], out["target_sentences"]) == (2, 4 + 1)
    assert out["short"] is None and out["long"] is None
    assert "ROUGE-L" not in format_table(out)


def test_format_table(results):
    table = format_table(results)
    assert "token cross-entropy" in table and "ROUGE-L, short prefix" in table
    assert f"{results['cross_entropy']:.4f}" in table
    assert "2 documents, 2 skipped" in table


def test_bad_documents_raise(toy):
    with pytest.raises(TypeError, match="not a single str"):
        evaluate(toy.model, toy.pipeline, "The cat sat.", FAST)
    with pytest.raises(TypeError, match="texts"):
        evaluate(toy.model, toy.pipeline, [b"The cat sat."], FAST)
