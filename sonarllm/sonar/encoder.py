"""The SONAR text encoder: tokens -> mean-pooled sentence embedding, weight-compatible with
fairseq2's ``text_sonar_basic_encoder``.

Sentences run packed (no padding FLOPs, bidirectional attention confined to each sentence),
in batches of at most ``max_tokens`` tokens, longest first, with an optional progress bar.
The sentence embedding is the mean of the final (LayerNorm-ed) token states over all tokens of
the sentence, language tag and </s> included, computed as fairseq2 does:
``sum * (1 / (length + 1e-7))``.

Shape legend: T = packed tokens, N = sentences, D = model dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sonarllm.sonar.config import SonarTextConfig, sonar_config
from sonarllm.sonar.layers import EncoderLayer, Frontend
from sonarllm.sonar.packing import PackedBatch


class _Stack(nn.Module):
    def __init__(self, cfg: SonarTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, train_dropout=False) for _ in range(cfg.num_layers))


class SonarEncoder(nn.Module):
    """SONAR text encoder (frozen, eval mode).

    Accepts sequences of up to ``max_seq_len + legacy_pad_idx + 1`` tokens (fairseq2 widens the
    position table of fairseq-converted encoders by that much).
    """

    def __init__(self, config: str | SonarTextConfig = "basic", *, kernel_impl: str = "auto"):
        super().__init__()
        self.config = cfg = sonar_config(config)
        self.kernel_impl = kernel_impl
        self.max_len = cfg.max_seq_len + cfg.legacy_pad_idx + 1
        self.encoder_frontend = Frontend(cfg, self.max_len, train_dropout=False)
        self.encoder = _Stack(cfg)
        self.layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)
        self.requires_grad_(False)
        self.eval()

    def reset_buffers(self, device=None) -> None:
        """Recompute the buffers checkpoints do not hold (the position table)."""
        self.encoder_frontend.reset_positions(device)

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentence embeddings [N, D] and final token states [T, D] of packed source tokens."""
        self.encoder_frontend.check_length(batch.max_seqlen)
        x_TD = self.encoder_frontend(batch.tokens, batch.positions)
        for layer in self.encoder.layers:
            x_TD = layer(x_TD, batch.cu_seqlens, batch.max_seqlen, impl=self.kernel_impl)
        x_TD = self.layer_norm(x_TD)
        sums_ND = x_TD.new_zeros(batch.num_seqs, x_TD.shape[1]).index_add_(0, batch.seq_ids, x_TD)
        weights_N = 1.0 / (batch.lengths.to(x_TD.dtype) + 1e-7)
        return sums_ND * weights_N[:, None], x_TD

    @torch.no_grad()  # not inference_mode: the embeddings are often fed to a model that trains
    def encode_tokens(
        self,
        seqs: Sequence[Sequence[int] | torch.Tensor],
        *,
        max_tokens: int = 16_384,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings [N, D] (float32, on the model's device) of N token sequences.

        Args:
            seqs: source-mode token ids, e.g. from ``SonarTokenizer.encode(..., mode="source")``.
            max_tokens: tokens per forward pass (longest sentences first; a single longer
                sentence still runs alone).
            progress: show a progress bar; None shows one for more than 10,000 sentences.
        """
        if len(seqs) == 0:
            raise ValueError("encode_tokens needs at least one sentence, got an empty list")
        lengths = [len(s) for s in seqs]
        if min(lengths) < 1:
            raise ValueError("every sentence needs at least one token (a language tag and </s> at least)")
        if max(lengths) > self.max_len:
            raise ValueError(f"a sentence has {max(lengths)} tokens; the encoder takes at most {self.max_len}")
        device = self.encoder_frontend.embed.weight.device
        order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
        out = torch.empty(len(seqs), self.config.model_dim, dtype=torch.float32, device=device)
        batches, current, current_tokens = [], [], 0
        for i in order:
            if current and current_tokens + lengths[i] > max_tokens:
                batches.append(current)
                current, current_tokens = [], 0
            current.append(i)
            current_tokens += lengths[i]
        batches.append(current)
        show = progress if progress is not None else len(seqs) > 10_000
        from tqdm.auto import tqdm

        with tqdm(total=len(seqs), disable=not show, desc="SONAR encode", unit="sent") as bar:
            for idx in batches:
                emb_ND, _ = self(PackedBatch.from_sequences([seqs[i] for i in idx], device=device))
                out[torch.tensor(idx, device=device)] = emb_ND.float()
                bar.update(len(idx))
        return out
