"""Text <-> SONAR embeddings: tokenizer + encoder + decoder in one object.

``encode`` follows SONAR's ``TextToEmbeddingModelPipeline``: source-mode tokens
``[lang] pieces </s>``, and a sentence longer than the encoder's positions (514 for the real
model) is cut to fit by keeping its first tokens — so it loses its final </s> — with a warning
(``on_long="truncate"``, SONAR's behaviour) or rejected (``on_long="error"``).
``decode`` follows ``EmbeddingToTextModelPipeline``: beam search from the prompt
``[</s>, lang]`` and the best hypothesis detokenised.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sonarllm.sonar.checkpoint import load_sonar_decoder, load_sonar_encoder
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder
from sonarllm.sonar.generation import BeamSearchOptions, Hypothesis, beam_search
from sonarllm.sonar.tokenizer import SonarTokenizer


@dataclass(frozen=True)
class SonarSpec:
    """Where a SONAR space's files are: paths, asset names or URLs (``None`` when not needed).

    Stored as ``sonar.json`` beside prepared data and trained models, so that training,
    evaluation and generation use the same tokenizer, encoder and decoder. Relative paths are
    relative to the JSON file. ``encoder_config`` / ``decoder_config`` (dicts of SonarTextConfig
    fields) complete checkpoints that record no configuration and are not a released
    architecture; a ``sonar.json`` beside such a checkpoint file that names it gives them to
    ``load_sonar_encoder`` / ``load_sonar_decoder`` too.
    """

    tokenizer: str
    encoder: str | None = None
    decoder: str | None = None
    lang: str = "eng_Latn"
    encoder_config: dict | None = None
    decoder_config: dict | None = None

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        values = {k: v for k, v in asdict(self).items() if v is not None or not k.endswith("_config")}
        tmp.write_text(json.dumps(values, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SonarSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SONAR description not found: {path} (written by data preparation and training)")
        try:
            values = json.loads(path.read_text())
            spec = cls(**values)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid SONAR description: {exc}") from exc

        def resolve(field: str):
            p = getattr(spec, field)
            if p is None or "://" in p:
                return p
            local = path.parent / p
            if local.exists():
                return str(local.resolve())
            if os.path.isabs(p) or "/" in p or os.sep in p or Path(p).suffix:  # a file, not an asset name
                raise FileNotFoundError(f"SONAR {field} file not found: {local} (named in {path})")
            return p

        return replace(spec, tokenizer=resolve("tokenizer"), encoder=resolve("encoder"), decoder=resolve("decoder"))


class SonarPipeline:
    """Tokenizer + encoder (+ decoder) of one SONAR space. Either model may be None."""

    def __init__(self, tokenizer: SonarTokenizer, encoder: SonarEncoder | None = None, decoder: SonarDecoder | None = None):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.decoder = decoder
        for name, model in (("encoder", encoder), ("decoder", decoder)):
            if model is not None and model.config.vocab_size != tokenizer.vocab_size:
                raise ValueError(
                    f"the {name}'s vocabulary ({model.config.vocab_size}) does not match the tokenizer's "
                    f"({tokenizer.vocab_size}): they come from different SONAR models"
                )

    @classmethod
    def from_files(cls, tokenizer: str | os.PathLike, encoder=None, decoder=None, *, device=None, dtype=None,
                   kernel_impl: str = "auto", encoder_config=None, decoder_config=None) -> SonarPipeline:  # fmt: skip
        """Load from files, asset names (e.g. ``text_sonar_basic_encoder``, ``sonar_tokenizer``) or
        URLs; the configs (see ``load_sonar_decoder``'s ``config``) go to the loaders."""
        if not os.path.exists(os.fspath(tokenizer)):
            from sonarllm.sonar.download import fetch

            tokenizer = fetch(os.fspath(tokenizer))
        tok = SonarTokenizer(tokenizer)
        enc = None if encoder is None else load_sonar_encoder(encoder, config=encoder_config, device=device, dtype=dtype,
                                                              kernel_impl=kernel_impl)  # fmt: skip
        dec = None if decoder is None else load_sonar_decoder(decoder, config=decoder_config, device=device, dtype=dtype,
                                                              kernel_impl=kernel_impl)  # fmt: skip
        return cls(tok, enc, dec)

    @classmethod
    def from_spec(cls, spec: SonarSpec, *, encoder: bool = True, decoder: bool = True, device=None, dtype=None,
                  kernel_impl: str = "auto") -> SonarPipeline:  # fmt: skip
        """Load what ``spec`` names (skipping the encoder or decoder when not asked for)."""
        return cls.from_files(spec.tokenizer, spec.encoder if encoder else None, spec.decoder if decoder else None,
                              device=device, dtype=dtype, kernel_impl=kernel_impl, encoder_config=spec.encoder_config,
                              decoder_config=spec.decoder_config)  # fmt: skip

    def tokenize_sources(self, texts: Sequence[str], lang: str | None = None, on_long: str = "truncate") -> list[list[int]]:
        """Source-mode token ids, cut to the encoder's length as ``on_long`` says."""
        if on_long not in ("truncate", "error"):
            raise ValueError(f"on_long must be 'truncate' or 'error', got {on_long!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of sentences, not a single str")
        seqs = self.tokenizer.encode(list(texts), lang=lang, mode="source")
        limit = self.encoder.max_len if self.encoder is not None else None
        if limit is not None:
            long = [i for i, s in enumerate(seqs) if len(s) > limit]
            if long and on_long == "error":
                raise ValueError(
                    f"{len(long)} sentence(s) exceed the encoder's {limit} tokens (first: #{long[0]}, "
                    f"{len(seqs[long[0]])} tokens); split them or pass on_long='truncate'"
                )
            if long:
                warnings.warn(f"{len(long)} sentence(s) longer than {limit} tokens were truncated (as SONAR does)", stacklevel=3)
                seqs = [s[:limit] for s in seqs]
        return seqs

    def encode(self, texts: Sequence[str], lang: str | None = None, *, max_tokens: int = 16_384,
               progress: bool | None = None, on_long: str = "truncate") -> torch.Tensor:  # fmt: skip
        """Sentence embeddings [N, D] (float32) of N sentences."""
        if self.encoder is None:
            raise ValueError("this pipeline has no encoder")
        if len(texts) == 0:
            raise ValueError("encode needs at least one sentence, got an empty list")
        return self.encoder.encode_tokens(self.tokenize_sources(texts, lang, on_long), max_tokens=max_tokens, progress=progress)

    def decode_hypotheses(self, emb_ND: torch.Tensor, lang: str | None = None,
                          options: BeamSearchOptions | None = None) -> list[list[Hypothesis]]:  # fmt: skip
        """Beam-search hypotheses (best first) for each embedding."""
        if self.decoder is None:
            raise ValueError("this pipeline has no decoder")
        prompt = [self.tokenizer.eos_idx, self.tokenizer.lang_id(lang or self.tokenizer.default_lang)]
        weight = self.decoder.output_weight
        return beam_search(self.decoder, emb_ND.to(device=weight.device, dtype=weight.dtype), prompt,
                           eos_idx=self.tokenizer.eos_idx, unk_idx=self.tokenizer.unk_idx,
                           pad_idx=self.tokenizer.pad_idx, options=options or BeamSearchOptions())  # fmt: skip

    def decode(self, emb_ND: torch.Tensor, lang: str | None = None, options: BeamSearchOptions | None = None) -> list[str]:
        """The best beam-search sentence for each embedding [N, D]."""
        if emb_ND.dim() != 2:
            raise ValueError(f"embeddings must have shape [N, D], got {tuple(emb_ND.shape)}")
        return [self.tokenizer.decode(hyps[0].seq) for hyps in self.decode_hypotheses(emb_ND, lang, options)]
