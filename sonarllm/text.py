"""Documents to sentences, as SONAR-LLM consumes them.

Sentence segmentation uses pysbd (rule-based, offline, handles abbreviations such as "Mr." and
"U.S."), standing in for the paper's NLTK Punkt, which needs a model download. A document
becomes at most ``max_sentences`` sentences followed by the end sentence "End of sequence."
(sonar-llm.md §3); generation stops when a predicted sentence is close to that sentence's
embedding.

pysbd's time grows with the square of the text it is given (4.5 s for 72 KB, 70 s for 288 KB),
so a long document is never handed to it whole: ``iter_sentences`` segments a window of
``WINDOW`` characters, keeps the sentences that end well inside it, and continues from the first
one it did not keep, so the work is linear in the text actually read, and ``document_sentences``
stops reading after ``max_sentences``. Sentences are slices of the (whitespace-normalised) text
located by matching pysbd's pieces, not the pieces themselves: pysbd sometimes inserts or drops a
space or trailing punctuation, and the next window must start where the kept text really ends.
A run of more than ``MAX_SENTENCE_CHARS`` characters without a sentence end is cut at a space
into pieces of at most that length (SONAR encodes at most 512 tokens of a sentence anyway).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

EOS_SENTENCE = "End of sequence."
BEGIN_SENTENCE = "Begin of text."
"""The prefix sentence of models with ``SonarLLMConfig.add_begin`` (the paper's ``--add_begin_text``)."""
MAX_SENTENCES = 32
WINDOW = 4096
"""Characters handed to the segmenter at once."""
MARGIN = 256
"""A sentence is kept only if it ends this far before a window's cut end (the segmenter looks
ahead: a boundary near the cut may not be one in the whole text)."""
MAX_SENTENCE_CHARS = 8192


@functools.cache
def _segmenter(language: str):
    try:
        import pysbd
    except ImportError as exc:  # pragma: no cover - pysbd is a dependency of the train/dev extras
        raise ImportError("sentence segmentation needs pysbd: pip install 'sonarllm[train]'") from exc
    return pysbd.Segmenter(language=language, clean=False)


def _segment(text: str, language: str) -> list[str]:
    """pysbd's pieces of ``text``. With clean=False they are meant to concatenate to ``text``, but
    pysbd sometimes inserts a space ("Wait. . .(he" gives ". . " and "(he"), drops one ("Mr.....
    Brown"), or drops trailing punctuation at the end of the text; ``_piece_ends`` copes."""
    return _segmenter(language).segment(text)


RESYNC = 16
"""How far ahead in the text a piece's character is looked for when pysbd dropped some."""


def _piece_ends(text: str, pieces: list[str]) -> list[int]:
    """Where in ``text`` each of pysbd's ``pieces`` of it ends: a cursor advances over the text,
    matching each piece exactly where pysbd kept the text as it was, else character by character
    on non-space characters (whitespace pysbd inserted or dropped is skipped; a character it
    inserted is passed over, characters it dropped are stepped over when the piece's next
    character is found within ``RESYNC`` characters)."""
    ends, j = [], 0
    for piece in pieces:
        if text.startswith(piece, j):  # the usual case, at C speed
            j += len(piece)
        else:
            for ch in piece:
                if ch.isspace():
                    continue
                while j < len(text) and text[j].isspace():
                    j += 1
                found = text.find(ch, j, j + RESYNC)
                if found >= 0:
                    j = found + 1
        ends.append(j)
    return ends


def iter_sentences(text: str, language: str = "en") -> Iterator[str]:
    """Sentences of ``text`` (stripped, empty ones dropped), read window by window; ``language``
    is a pysbd code. Each sentence is a slice of the whitespace-normalised text, and the slices
    cover it: no character is lost or repeated, whatever pysbd does to the pieces it returns."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = " ".join(text.split())
    pos, window = 0, WINDOW
    while pos < len(text):
        end = pos + window
        chunk = text[pos:end]
        pieces = _segment(chunk, language)
        ends = _piece_ends(chunk, pieces)
        if end >= len(text):  # the rest of the text: every piece is a whole sentence
            ends[-1:] = [len(chunk)]  # what pysbd dropped at the end belongs to the last one
            yield from _slices(chunk, ends)
            return
        # pieces ending well inside the window; the last piece runs into the cut
        kept = list(itertools.takewhile(lambda e: e <= window - MARGIN, ends[:-1]))
        if kept and kept[-1] > 0:
            yield from _slices(chunk, kept)
            pos, window = pos + kept[-1], WINDOW
        elif window < MAX_SENTENCE_CHARS:
            window = min(2 * window, MAX_SENTENCE_CHARS)  # a long sentence: look further
        else:  # no sentence end in MAX_SENTENCE_CHARS characters: cut at the last space
            cut = text.rfind(" ", pos + 1, end)
            cut = end if cut < 0 else cut
            yield text[pos:cut].strip()
            pos = cut


def _slices(chunk: str, ends: list[int]) -> Iterator[str]:
    """The non-empty stripped pieces of ``chunk`` that end at ``ends`` (ascending)."""
    start = 0
    for stop in ends:
        if chunk[start:stop].strip():
            yield chunk[start:stop].strip()
        start = stop


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of ``text`` (stripped, empty ones dropped). ``language`` is a pysbd code."""
    return list(iter_sentences(text, language))


def document_sentences(text: str, *, max_sentences: int = MAX_SENTENCES, add_eos: bool = True,
                       language: str = "en") -> list[str]:  # fmt: skip
    """A document as the model sees it: its first ``max_sentences`` sentences, then the end
    sentence. A document with no sentence gives an empty list. Only as much of the text is
    segmented as those sentences need."""
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    sentences = list(itertools.islice(iter_sentences(text, language), max_sentences))
    if sentences and add_eos:
        sentences.append(EOS_SENTENCE)
    return sentences
