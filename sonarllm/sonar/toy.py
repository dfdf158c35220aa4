"""The seeded toy SONAR: a tiny SentencePiece model trained on the given sentences plus a small
encoder and decoder in SONAR's architecture, initialised from a seed.

It lets the embedded example, the tests and the benchmarks run the whole pipeline offline and in
minutes on a CPU. Freshly initialised, its embedding space carries no meaning (the concept
transformer still learns, through the random frozen decoder, to produce the next sentence's
tokens). ``train_toy_sonar`` then fits encoder and decoder as an autoencoder on the corpus
sentences — SONAR's own recipe in miniature — so that decoding an embedding gives a sentence and
generation from the example model prints text. Everything is deterministic for a seed and input.
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


def train_toy_sonar(tokenizer: SonarTokenizer, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                    sentences: list[str], *, steps: int = 600, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                    lang: str | None = None, progress: bool = False) -> list[float]:  # fmt: skip
    """Train the toy encoder and decoder (in place, files rewritten atomically) to reconstruct
    ``sentences`` through their sentence embeddings; returns the loss of every step."""
    from tqdm.auto import tqdm

    from sonarllm_kernels import fused_linear_cross_entropy
    from sonarllm.loss import SonarTargets
    from sonarllm.sonar.checkpoint import load_sonar_decoder, load_sonar_encoder
    from sonarllm.sonar.packing import PackedBatch

    sentences = sorted(set(sentences))
    if not sentences:
        raise ValueError("training the toy SONAR needs at least one sentence")
    encoder = load_sonar_encoder(encoder_path, kernel_impl="torch").requires_grad_(True).train()
    decoder = load_sonar_decoder(decoder_path, kernel_impl="torch").requires_grad_(True).train()
    sources = tokenizer.encode(sentences, lang=lang, mode="source")
    targets = tokenizer.encode(sentences, lang=lang, mode="target")
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    losses = []
    # Some CPU backward kernels accumulate in a thread-dependent order (even with deterministic
    # algorithms: the reductions are split by thread); the prepared data's identity hashes these
    # weights, so a rebuild, and a preparation by several processes (torchrun gives each one
    # thread), must reproduce them bit for bit: one thread, whatever the machine.
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        for _ in tqdm(range(steps), disable=not progress, desc="toy SONAR", unit="step"):
            idx = torch.randint(len(sentences), (batch_size,), generator=g).tolist()
            emb_ND, _ = encoder(PackedBatch.from_sequences([sources[i] for i in idx]))
            tgt = SonarTargets.from_target_sequences([targets[i] for i in idx], tokenizer.eos_idx)
            h_TD = decoder.hidden_states(emb_ND, tgt.inputs)
            loss = fused_linear_cross_entropy(h_TD, decoder.output_weight, tgt.labels, impl="torch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    for model, path in ((encoder, encoder_path), (decoder, decoder_path)):
        model.requires_grad_(False).eval()
        tmp = Path(str(path) + ".tmp")
        torch.save({"model": model.state_dict(), "sonar_config": model.config.to_dict()}, tmp)
        os.replace(tmp, path)
    return losses
