"""The seeded toy SONAR: a tiny SentencePiece model trained on the given sentences plus a small
randomly initialised (seeded) encoder and decoder in SONAR's architecture.

It lets the embedded example, the tests and the benchmarks run the whole pipeline offline and in
minutes on a CPU. Its embedding space carries no meaning — the concept transformer still learns
to predict embeddings from which the (frozen, random) decoder produces the next sentence's
tokens, so the training loss falls as with the real SONAR. Everything is deterministic for a
given seed and input.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from sonarllm.sonar.config import SonarTextConfig, sonar_config
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.encoder import SonarEncoder
from sonarllm.sonar.tokenizer import SonarTokenizer


def train_toy_tokenizer(sentences: Iterable[str], path: str | os.PathLike, *, vocab_size: int = 1000) -> Path:
    """Train a unigram SentencePiece model (NLLB's id layout: unk 0, bos 1, eos 2, no pad) and
    write it atomically to ``path``."""
    import sentencepiece as spm

    path = Path(path)
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise ValueError("training a tokenizer needs at least one non-empty sentence")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


def _init_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """SONAR-like init: embeddings N(0, 1/D), linear weights Xavier-uniform, zero biases,
    LayerNorms at identity."""
    for name, p in sorted(model.named_parameters()):
        if "layer_norm" in name:
            torch.nn.init.constant_(p, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "embed" in name:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=generator)
        else:
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            p.uniform_(-bound, bound, generator=generator)


def build_toy_sonar(tokenizer: SonarTokenizer, out_dir: str | os.PathLike, *, config: str | SonarTextConfig = "toy",
                    seed: int = 0) -> tuple[Path, Path]:  # fmt: skip
    """Write seeded random toy encoder and decoder checkpoints (fairseq2 layout) sized for
    ``tokenizer``; returns their paths."""
    cfg = dataclasses.replace(sonar_config(config), vocab_size=tokenizer.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cls, offset in (("toy_encoder.pt", SonarEncoder, 0), ("toy_decoder.pt", SonarDecoder, 1)):
        model = cls(cfg)
        with torch.no_grad():
            _init_(model, torch.Generator().manual_seed(seed * 2 + offset))
        path = out_dir / name
        tmp = path.with_name(name + ".tmp")
        torch.save({"model": model.state_dict(), "sonar_config": cfg.to_dict()}, tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
