"""What generation takes and gives: ``GenerationOptions`` (checked on construction, each bad value
named), ``GeneratedText`` (one document's result) and ``StreamedSentence`` (one streamed
sentence), with the stop reasons and the seed bounds (sonarllm/generate.py generates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from sonarllm.sonar.generation import BeamSearchOptions
from sonarllm.text import EOS_SENTENCE, MAX_SENTENCES

STOP_EOS = "eos"
STOP_MAX_SENTENCES = "max_sentences"
STOP_REPETITION = "repetition"
_SEED_STRIDE = 1_000_003  # prompt i of seed s draws from a generator seeded s * stride + i
_REPEAT_SEED_OFFSET = 2**62  # its repetition redraws from one seeded 2**62 + s * stride + i
MAX_SEED = (2**64 - _REPEAT_SEED_OFFSET) // _SEED_STRIDE - 1  # generator seeds must fit 64 bits


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


REFERENCE_MAX_SEQ_LEN = 256  # the SONAR-LLM reference decodes with predict(..., max_seq_len=256)


@dataclass(frozen=True)
class GenerationOptions:
    """How ``generate`` / ``stream`` run (see the module docstring for the exact semantics)."""

    max_sentences: int = MAX_SENTENCES
    """Most sentences in a finished document, prompt + generated (the paper's T_max = 32)."""
    eos_threshold: float | None = 0.98
    """Stop a prompt when cos(re-encoded sentence, embedding of ``eos_sentence``) >= this (that
    sentence is not emitted); in [-1, 1]. None disables the test (stop at max_sentences only)."""
    eos_sentence: str = EOS_SENTENCE
    """The end sentence the model was trained to predict last ("End of sequence.")."""
    beam_size: int = 5
    """SONAR decoder beam size (1 = greedy); the reference uses fairseq2's default 5."""
    max_tokens: int | None = None
    """Most tokens per decoded sentence, its final </s> included (``BeamSearchOptions
    max_gen_len=(0, max_tokens)``). None decodes as the paper's generate.py does: SONAR's
    pipeline defaults with ``max_seq_len=256`` (prompt included, so at most 254 tokens)."""
    temperature: float = 0.0
    """Embedding-space noise: p + T * rms(p) * z, z ~ N(0, I). 0 = deterministic decoding."""
    seed: int = 0
    """Seed of the noise generators (prompt i uses ``seed * 1_000_003 + i``)."""
    lang: str | None = None
    """SONAR language code of prompts and outputs (None: the tokenizer's default, eng_Latn)."""
    batch_size: int = 32
    """Prompts generated together (results do not depend on it)."""
    recompute: bool = False
    """Re-run the full forward over the context every step instead of the KV cache (the
    reference's way; slower, kept to test that both agree)."""
    no_repeat_sentences: int = 0
    """Repetition control: compare each decoded sentence with the document's last this many
    sentences (see the module docstring). 0 (default) = off, the paper's algorithm."""
    repeat_threshold: float = 0.95
    """A sentence is a repeat when its re-encoded embedding's cosine with one of those sentences'
    is >= this; in [-1, 1]."""
    repeat_retries: int = 2
    """Redraws of a repeat before the prompt stops with stop reason "repetition" (0: stop at once)."""
    repeat_noise: float = 0.2
    """Noise of a redraw, as ``temperature``: p + repeat_noise * rms(p) * z; > 0."""

    def __post_init__(self) -> None:
        for name, low in (("max_sentences", 1), ("beam_size", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"GenerationOptions.{name} must be an int >= {low}, got {value!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"GenerationOptions.max_tokens must be None or an int >= 1, got {self.max_tokens!r}"
            )
        if self.eos_threshold is not None and (
            not _is_real(self.eos_threshold) or not -1.0 <= self.eos_threshold <= 1.0
        ):
            raise ValueError(
                "GenerationOptions.eos_threshold must be None or a number in [-1, 1], "
                f"got {self.eos_threshold!r}"
            )
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(
                "GenerationOptions.temperature must be a finite number >= 0, "
                f"got {self.temperature!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"GenerationOptions.seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.eos_sentence, str) or not self.eos_sentence.strip():
            raise ValueError(
                f"GenerationOptions.eos_sentence must be a non-empty str, got {self.eos_sentence!r}"
            )
        if self.lang is not None and not isinstance(self.lang, str):
            raise ValueError(f"GenerationOptions.lang must be None or a str, got {self.lang!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"GenerationOptions.recompute must be a bool, got {self.recompute!r}")
        for name in ("no_repeat_sentences", "repeat_retries"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"GenerationOptions.{name} must be an int >= 0, got {value!r}")
        if not _is_real(self.repeat_threshold) or not -1.0 <= self.repeat_threshold <= 1.0:
            raise ValueError(
                "GenerationOptions.repeat_threshold must be a number in [-1, 1], "
                f"got {self.repeat_threshold!r}"
            )
        if not _is_real(self.repeat_noise) or self.repeat_noise <= 0:
            raise ValueError(
                f"GenerationOptions.repeat_noise must be a finite number > 0, got {self.repeat_noise!r}"
            )

    def beam_search_options(self) -> BeamSearchOptions:
        """The SONAR decoder's beam search settings for these options."""
        if self.max_tokens is None:
            return BeamSearchOptions(beam_size=self.beam_size, max_seq_len=REFERENCE_MAX_SEQ_LEN)
        return BeamSearchOptions(beam_size=self.beam_size, max_gen_len=(0.0, self.max_tokens))


@dataclass
class GeneratedText:
    """One prompt's result.

    Attributes:
        prompt_sentences: the prompt as split into sentences (the model's context).
        sentences: generated sentences in order (the end sentence is never included).
        scores: the decoder's beam score of each generated sentence (length-normalised
            log-probability given the decoded embedding).
        stop_reason: "eos" (the end sentence was predicted), "max_sentences", or "repetition"
            (repetition control: a sentence kept repeating one of the last ones).
    """

    prompt_sentences: list[str]
    sentences: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    stop_reason: str = STOP_MAX_SENTENCES

    @property
    def continuation(self) -> str:
        """The generated sentences joined by single spaces (empty ones skipped)."""
        return " ".join(s for s in self.sentences if s)

    @property
    def text(self) -> str:
        """Prompt and continuation joined by single spaces, as the reference prints them."""
        return " ".join(s for s in [*self.prompt_sentences, *self.sentences] if s)

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text}


class StreamedSentence(NamedTuple):
    """A sentence of prompt ``index`` (its position in the ``prompts`` list), as produced."""

    index: int
    sentence: str
