"""SONAR's NLLB tokenizer, with ids identical to fairseq2's ``NllbTokenizer``.

fairseq2 builds the vocabulary from the SentencePiece model by inserting ``<pad>`` at index 0
(every SentencePiece id shifts by one: pad 0, unk 1, bos 2, eos 3 for NLLB's model) and by
appending one control symbol per language (``__eng_Latn__``, ...) and the three data tags
``<MINED_DATA>``, ``<MMT_BT_DATA>``, ``<SMT_BT_DATA>``: 256,000 + 1 + 202 + 3 = 256,206 ids.
Control symbols never match text, so ordinary text encodes as SentencePiece's ids plus one.

Modes (fairseq2 >= 0.3): ``source`` = ``[__lang__] pieces </s>``; ``target`` =
``</s> __lang__ pieces </s>`` (the decoder input). SONAR-LLM's labels are the target sequence
shifted left plus one extra </s> (see ``decoder_inputs_and_labels``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

import sentencepiece as spm

from sonarllm.sonar.langs import NLLB_LANGS

DATA_TAGS = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")
MODES = ("source", "target")


class SonarTokenizer:
    """Text <-> token ids for the SONAR encoder (source mode) and decoder (target mode).

    Args:
        model_path: the SentencePiece model (SONAR's ``sentencepiece.source.256000.model``, or a
            small one for tests).
        langs: language codes in vocabulary order (default: the 202 of the real vocabulary).
        default_lang: language used when a call gives none.
    """

    pad_idx = 0

    def __init__(self, model_path: str | os.PathLike, langs: Sequence[str] = NLLB_LANGS, default_lang: str = "eng_Latn"):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise ValueError(f"{path} is not a valid SentencePiece model ({exc})") from exc
        self.langs = tuple(langs)
        if len(set(self.langs)) != len(self.langs):
            raise ValueError("langs must not contain duplicates")
        n_pieces = self.sp.GetPieceSize()
        self.unk_idx = self.sp.unk_id() + 1
        self.bos_idx = self.sp.bos_id() + 1
        self.eos_idx = self.sp.eos_id() + 1
        self.first_lang_idx = n_pieces + 1
        self._lang_ids = {lang: self.first_lang_idx + i for i, lang in enumerate(self.langs)}
        self.data_tag_ids = {tag: self.first_lang_idx + len(self.langs) + i for i, tag in enumerate(DATA_TAGS)}
        self.vocab_size = n_pieces + 1 + len(self.langs) + len(DATA_TAGS)
        self.default_lang = self._check_lang(default_lang)

    def _check_lang(self, lang: str) -> str:
        if lang not in self._lang_ids:
            close = difflib.get_close_matches(lang, self.langs, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(self.langs)} codes, e.g. eng_Latn)"
            raise ValueError(f"unknown language code {lang!r}{hint}")
        return lang

    def lang_id(self, lang: str) -> int:
        """Token id of the language tag ``__lang__``."""
        return self._lang_ids[self._check_lang(lang)]

    def is_special(self, token_id: int) -> bool:
        return token_id in (self.pad_idx, self.bos_idx, self.eos_idx) or token_id >= self.first_lang_idx

    def pieces(self, text: str) -> list[int]:
        """Token ids of the text alone (no language tag, no </s>)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [i + 1 for i in self.sp.EncodeAsIds(text)]

    def encode(self, texts: str | Sequence[str], lang: str | None = None, mode: str = "source"):
        """Token ids of one text (a list) or of several (a list of lists) in the given mode."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        lang_tok = self.lang_id(lang or self.default_lang)
        prefix = [lang_tok] if mode == "source" else [self.eos_idx, lang_tok]
        one = isinstance(texts, str)
        out = [prefix + self.pieces(t) + [self.eos_idx] for t in ([texts] if one else texts)]
        return out[0] if one else out

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]):
        """Text of one id sequence, or a list of texts; special tokens are skipped."""
        if len(ids) and not isinstance(ids[0], int) and hasattr(ids[0], "__len__"):
            return [self.decode(x) for x in ids]
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self.sp.DecodeIds([i - 1 for i in ids if not self.is_special(i)])

    def decoder_inputs_and_labels(
        self, pieces: Sequence[int], lang: str | None = None, *, duplicate_eos: bool = True
    ) -> tuple[list[int], list[int]]:
        """Teacher-forcing pair for one target sentence given its piece ids.

        Paper convention (``duplicate_eos=True``, the SONAR-LLM reference code): inputs
        ``[</s>, lang, t1..tn, </s>]``, labels ``[lang, t1..tn, </s>, </s>]``. Clean variant:
        inputs ``[</s>, lang, t1..tn]``, labels ``[lang, t1..tn, </s>]``.
        """
        lang_tok = self.lang_id(lang or self.default_lang)
        inputs = [self.eos_idx, lang_tok, *pieces]
        labels = [lang_tok, *pieces, self.eos_idx]
        if duplicate_eos:
            inputs.append(self.eos_idx)
            labels.append(self.eos_idx)
        return inputs, labels
