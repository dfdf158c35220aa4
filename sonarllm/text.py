"""Documents to sentences, as SONAR-LLM consumes them.

Sentence segmentation uses pysbd (rule-based, offline, handles abbreviations such as "Mr." and
"U.S."), standing in for the paper's NLTK Punkt, which needs a model download. A document
becomes at most ``max_sentences`` sentences followed by the end sentence "End of sequence."
(sonar-llm.md §3); generation stops when a predicted sentence is close to that sentence's
embedding.
"""

from __future__ import annotations

import functools

EOS_SENTENCE = "End of sequence."
MAX_SENTENCES = 32


@functools.cache
def _segmenter(language: str):
    try:
        import pysbd
    except ImportError as exc:  # pragma: no cover - pysbd is a dependency of the train/dev extras
        raise ImportError("sentence segmentation needs pysbd: pip install 'sonarllm[train]'") from exc
    return pysbd.Segmenter(language=language, clean=False)


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of ``text`` (stripped, empty ones dropped). ``language`` is a pysbd code."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        return []
    return [s.strip() for s in _segmenter(language).segment(text) if s.strip()]


def document_sentences(text: str, *, max_sentences: int = MAX_SENTENCES, add_eos: bool = True,
                       language: str = "en") -> list[str]:  # fmt: skip
    """A document as the model sees it: its first ``max_sentences`` sentences, then the end
    sentence. A document with no sentence gives an empty list."""
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    sentences = split_sentences(text, language)[:max_sentences]
    if sentences and add_eos:
        sentences.append(EOS_SENTENCE)
    return sentences
