"""Sentence-level text metrics of the paper's NLG evaluation (docs/sonar-llm.md §6.3), computed
exactly as the reference ``evaluate_nlg.py`` does, plus the cosine of embeddings.

* BLEU: ``nltk.translate.bleu_score.sentence_bleu([reference.split()], hypothesis.split(),
  smoothing_function=SmoothingFunction().method4)`` on whitespace tokens (uniform 4-gram
  weights). method4 only smooths n-gram orders with no match; note that it still scores two
  identical strings shorter than 4 tokens below 100.
* ROUGE-L: the F1 (``fmeasure``) of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"],
  use_stemmer=True)``, which lowercases and tokenizes on its own.

Both return percentages (x100), so a mean over pairs is the paper's number directly. They need
the ``eval`` extra (nltk, rouge-score); a missing package raises ImportError saying so.

Shape legend: N pairs of vectors, E embedding width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_INSTALL_HINT = "pip install 'sonarllm[eval]'"


@functools.cache
def _bleu_parts():
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    except ImportError as exc:
        raise ImportError(f"BLEU needs nltk, part of the eval extra: {_INSTALL_HINT}") from exc
    return sentence_bleu, SmoothingFunction().method4


@functools.cache
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ImportError(
            f"ROUGE-L needs rouge-score, part of the eval extra: {_INSTALL_HINT}"
        ) from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def check_available() -> None:
    """Raise ImportError (with the install command) unless both metric packages import."""
    _bleu_parts()
    _rouge_scorer()


def _check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU x100 of ``hypothesis`` against one ``reference`` (see module docstring);
    0 when either has no token."""
    hyp = _check_text(hypothesis, "hypothesis").split()
    ref = _check_text(reference, "reference").split()
    if not hyp or not ref:
        return 0.0
    sentence_bleu, smoothing = _bleu_parts()
    return 100.0 * float(sentence_bleu([ref], hyp, smoothing_function=smoothing))


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 x100 (stemmed) of ``hypothesis`` against ``reference``."""
    hyp = _check_text(hypothesis, "hypothesis")
    ref = _check_text(reference, "reference")
    return 100.0 * float(_rouge_scorer().score(ref, hyp)["rougeL"].fmeasure)


def cosine(a_NE: torch.Tensor, b_NE: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity [N] (float32) of two [N, E] (or [E]) tensors."""
    if a_NE.shape != b_NE.shape:
        raise ValueError(
            f"cosine needs tensors of one shape, got {tuple(a_NE.shape)} and {tuple(b_NE.shape)}"
        )
    return F.cosine_similarity(a_NE.float(), b_NE.float().to(a_NE.device), dim=-1)
