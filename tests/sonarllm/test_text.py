"""Sentence splitting (sonarllm.text): windowed segmentation gives the sentences of whole-text
segmentation, hands the segmenter a bounded amount of text (linear work, and only the beginning
of a document when max_sentences is reached), and cuts runs without a sentence end."""

from __future__ import annotations

import gzip
import json

import pytest

from sonarllm import text
from sonarllm.text import (
    EOS_SENTENCE,
    MAX_SENTENCE_CHARS,
    WINDOW,
    document_sentences,
    split_sentences,
)
from training.config import EXAMPLE_CORPUS

PYSBD = text._segmenter  # before any test replaces it


@pytest.fixture(scope="module")
def stories() -> list[str]:
    with gzip.open(EXAMPLE_CORPUS, "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture
def handed(monkeypatch) -> list[int]:
    """Records the length of every text handed to pysbd."""
    lengths = []
    segmenter = PYSBD("en")

    class Recording:
        def segment(self, chunk):
            lengths.append(len(chunk))
            return segmenter.segment(chunk)

    monkeypatch.setattr(text, "_segmenter", lambda language: Recording())
    return lengths


def _whole(doc: str) -> list[str]:
    """pysbd on the whole text at once (the reference; quadratic in its length)."""
    return [s.strip() for s in PYSBD("en").segment(" ".join(doc.split())) if s.strip()]


def test_windows_give_the_sentences_of_the_whole_text(stories):
    for start in (0, 700, 1400, 2100):  # documents of about 13,000 characters: four windows each
        doc = "\n".join(stories[start : start + 40])
        assert len(doc) > 3 * WINDOW
        assert split_sentences(doc) == _whole(doc)


def test_a_long_document_is_read_only_as_far_as_max_sentences_needs(stories, handed):
    long_doc = " ".join(stories) * 2  # about 2 MB in one document
    sentences = document_sentences(long_doc, max_sentences=32)
    assert len(sentences) == 33 and sentences[-1] == EOS_SENTENCE
    assert sentences[:32] == _whole(" ".join(stories[:40]))[:32]
    assert sum(handed) <= 2 * WINDOW  # not the 2 MB


def test_segmentation_work_is_linear_in_the_text(stories, handed):
    doc = " ".join(stories[:600])  # about 200,000 characters
    sentences = split_sentences(doc)
    assert " ".join(sentences) == " ".join(doc.split())  # nothing lost or repeated at window seams
    assert max(handed) <= WINDOW and sum(handed) <= 1.3 * len(doc)


def test_a_run_without_sentence_end_is_cut_at_spaces(handed):
    run_on = "and then the cat ran " * 2000  # 42,000 characters, no full stop
    pieces = split_sentences(run_on + ". Then it slept.")
    assert all(len(p) <= MAX_SENTENCE_CHARS for p in pieces) and len(pieces) == 7
    assert " ".join(pieces) == " ".join((run_on + ". Then it slept.").split())
    assert pieces[-1] == "Then it slept."
    assert max(handed) <= MAX_SENTENCE_CHARS and sum(handed) <= 3 * len(run_on)


PIECES = [  # sentences pysbd splits unusually: it inserts a space in ". . .(" and drops one in "Mr..... B"
    "The cat sat on the mat.", "Wait. . .(he said) nothing.", "Mr..... Brown came.", "He waited . . . and waited.",
    "Really?!", 'She said: "Go home." Then left.', "It cost $3.50 in the U.S. today.", "Hmm... okay.",
    "What?! No way!?", "(See p. 4.) Next.", "Lily went to the park with Mr. Brown.", "Café «crème» für Jürgen…",
    "日本語の文です。", "Wow!” said he.", "x !y.", "A . B . C.", "Ok.. fine.", "It was 5 p.m. Then.", "😀 Yes!",
    "e.g. this one", "Go!(now) he said.", "He left.[1] Then.",
]


def _squash(s: str) -> str:
    return "".join(s.split())


@pytest.mark.parametrize("seed", range(12))
def test_windowed_splitting_keeps_every_character_of_the_text(seed):
    """Sentences are the text's own characters, in order, none lost or repeated at window seams,
    whatever pysbd does to whitespace and punctuation inside a window."""
    import random

    rng = random.Random(seed)
    doc = " ".join(rng.choice(PIECES) for _ in range(rng.randint(900, 1500)))
    assert len(doc) > 4 * WINDOW
    sentences = split_sentences(doc)
    normalized = " ".join(doc.split())
    assert _squash("".join(sentences)) == _squash(doc)
    assert all(s and s in normalized for s in sentences)


def test_text_pysbd_respaces_is_kept_in_every_window():
    """The reviewer's case: 'Wait. . .(he said)' repeated across many windows lost 'To' of 'Tom'."""
    unit = "Lily played. Wait. . .(he said) nothing. Tom slept."
    sentences = split_sentences(" ".join([unit] * 120))
    assert set(sentences) == {"Lily played.", "Wait.", ". .", "(he said) nothing.", "Tom slept."}
    assert sentences.count("Tom slept.") == 120
