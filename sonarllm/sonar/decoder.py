"""The SONAR text decoder: sentence embedding -> token states, frozen, weight-compatible with
fairseq2's ``text_sonar_basic_decoder``.

Teacher forcing runs on packed sentences (see layers.py): every sentence of a batch is one
segment of a [T, D] token tensor, its memory is its own embedding, and the cross-attention is
computed in closed form once per sentence. The output projection is tied to the token
embedding and exposed as ``output_weight`` so a fused loss can use it without logits.
Incremental decoding (``start`` / ``step``) keeps a KV cache for greedy and beam search.

Shape legend: N = sentences, E = embedding width (= D), T = packed tokens, D = model dim,
V = vocabulary, L = layers, B = hypotheses, S = steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sonarllm.sonar.config import SonarTextConfig, sonar_config
from sonarllm.sonar.layers import DecoderLayer, Frontend
from sonarllm.sonar.packing import PackedBatch


class _Stack(nn.Module):
    def __init__(self, cfg: SonarTextConfig, train_dropout: bool):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, train_dropout) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)


@dataclass
class DecoderState:
    """KV cache and per-layer cross terms of B hypotheses being decoded."""

    cross_LBD: torch.Tensor
    k_cache: list[torch.Tensor]  # L x [B, S, H, K]
    v_cache: list[torch.Tensor]
    pos: int = 0

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep the hypotheses at ``index_B`` (beam search's survivors), in that order."""
        self.cross_LBD = self.cross_LBD.index_select(1, index_B)
        self.k_cache = [k.index_select(0, index_B) for k in self.k_cache]
        self.v_cache = [v.index_select(0, index_B) for v in self.v_cache]


class SonarDecoder(nn.Module):
    """SONAR text decoder (frozen: ``requires_grad_(False)`` and eval mode on construction).

    Args:
        config: "basic", "toy" or a SonarTextConfig.
        train_dropout: reproduce the reference SONAR-LLM code, whose decoder runs in train mode
            with dropout 0.1 everywhere (call ``.train()`` to enable it). Off by default.
        kernel_impl: ``impl`` passed to the attention kernels.
    """

    def __init__(self, config: str | SonarTextConfig = "basic", *, train_dropout: bool = False, kernel_impl: str = "auto"):
        super().__init__()
        self.config = cfg = sonar_config(config)
        self.kernel_impl = kernel_impl
        self.decoder_frontend = Frontend(cfg, cfg.max_seq_len, train_dropout)
        self.decoder = _Stack(cfg, train_dropout)
        self.requires_grad_(False)
        self.eval()

    def reset_buffers(self, device=None) -> None:
        """Recompute the buffers checkpoints do not hold (the position table)."""
        self.decoder_frontend.reset_positions(device)

    @property
    def output_weight(self) -> torch.Tensor:
        """The tied output projection [V, D] (= the token embedding table)."""
        return self.decoder_frontend.embed.weight

    def _check_embeddings(self, emb_ND: torch.Tensor, n: int) -> None:
        if emb_ND.dim() != 2 or emb_ND.shape[1] != self.config.model_dim:
            raise ValueError(
                f"sentence embeddings must have shape [N, {self.config.model_dim}], got {tuple(emb_ND.shape)}"
            )
        if emb_ND.shape[0] != n:
            raise ValueError(f"got {emb_ND.shape[0]} sentence embeddings for {n} target sentences")

    def hidden_states(self, emb_ND: torch.Tensor, batch: PackedBatch, *, closed_form: bool = True) -> torch.Tensor:
        """Teacher-forced final token states [T, D] of packed target sentences.

        Args:
            emb_ND: one sentence embedding per sentence (the decoder's whole memory).
            batch: the decoder *input* tokens, packed (see ``PackedBatch``).
            closed_form: False computes each cross-attention as attention over the single key
                (the reference; same result up to rounding).
        """
        self._check_embeddings(emb_ND, batch.num_seqs)
        self.decoder_frontend.check_length(batch.max_seqlen)
        emb_ND = emb_ND.to(self.output_weight.dtype)
        x_TD = self.decoder_frontend(batch.tokens, batch.positions)
        for layer in self.decoder.layers:
            x_TD = layer(x_TD, emb_ND, batch.seq_ids, batch.cu_seqlens, batch.max_seqlen,
                         impl=self.kernel_impl, closed_form=closed_form)  # fmt: skip
        return self.decoder.layer_norm(x_TD)

    def hidden_states_padded(self, emb_ND: torch.Tensor, tokens_NL: torch.Tensor) -> torch.Tensor:
        """Reference path: right-padded decoder inputs [N, L] -> states [N, L, D], with every
        cross-attention computed as full attention over the one key (the plain way, compute
        spent on padding). Positions past a sentence's end hold garbage; causal attention keeps
        them out of the real positions."""
        self._check_embeddings(emb_ND, tokens_NL.shape[0])
        self.decoder_frontend.check_length(tokens_NL.shape[1])
        emb_ND = emb_ND.to(self.output_weight.dtype)
        positions_NL = torch.arange(tokens_NL.shape[1], device=tokens_NL.device).expand_as(tokens_NL)
        x_NLD = self.decoder_frontend(tokens_NL, positions_NL)
        for layer in self.decoder.layers:
            x_NLD = layer(x_NLD, emb_ND, impl=self.kernel_impl, closed_form=False)
        return self.decoder.layer_norm(x_NLD)

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Materialised logits [T, V] (for generation and references; training uses the fused loss)."""
        return h_TD @ self.output_weight.t()

    # --- incremental decoding -----------------------------------------------------------------

    def start(self, emb_BD: torch.Tensor, max_len: int) -> DecoderState:
        """Empty KV caches for ``max_len`` steps of B hypotheses decoding from ``emb_BD``."""
        self._check_embeddings(emb_BD, emb_BD.shape[0])
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the decoder's max_seq_len {self.config.max_seq_len}")
        cfg = self.config
        emb_BD = emb_BD.to(self.output_weight.dtype)
        cross = torch.stack([layer.cross_terms(emb_BD) for layer in self.decoder.layers])
        shape = (emb_BD.shape[0], max_len, cfg.num_heads, cfg.head_dim)
        new = lambda: torch.empty(shape, dtype=emb_BD.dtype, device=emb_BD.device)
        return DecoderState(cross, [new() for _ in self.decoder.layers], [new() for _ in self.decoder.layers])

    def step(self, tokens_B: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Feed one token per hypothesis; returns the next-token logits [B, V] (float32)."""
        if state.pos >= state.k_cache[0].shape[1]:
            raise ValueError(f"the KV cache holds {state.k_cache[0].shape[1]} steps; cannot take another")
        positions = torch.full_like(tokens_B, state.pos)
        x_BD = self.decoder_frontend(tokens_B, positions)
        for i, layer in enumerate(self.decoder.layers):
            x_BD = layer.step(x_BD, state.cross_LBD[i], state.k_cache[i], state.v_cache[i], state.pos, impl=self.kernel_impl)
        state.pos += 1
        return self.logits(self.decoder.layer_norm(x_BD)).float()
