"""Building blocks of the SONAR text encoder and decoder, on packed token layouts.

Module and parameter names follow fairseq2's (``self_attn.q_proj``, ``encoder_decoder_attn``,
``ffn.inner_proj``, ``self_attn_layer_norm``, ...), so a fairseq2 state dict is this package's
native format. All sequence-level work runs on *packed* tokens: the sentences of a batch are
concatenated into one [T, D] tensor with ``cu_seqlens`` (int32 [N + 1]) marking their starts,
so no FLOP is spent on padding and self-attention is confined to each sentence.

Shape legend: T = packed tokens, N = sentences, D = model dim, H = heads, K = head dim,
B = hypotheses in incremental decoding, S = cached steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sonarllm.sonar.config import SonarTextConfig
from sonarllm.sonar.step_linear import step_linear
from sonarllm_kernels.attention import attention


def sinusoidal_table(num_steps: int, dim: int, first_step: int, device=None) -> torch.Tensor:
    """fairseq2's ``SinusoidalPositionEncoder`` table (float32 [num_steps, dim]).

    Row s encodes step ``first_step + s``: ``sin(step * f_i)`` in the first half of the
    features and ``cos(step * f_i)`` in the second, with ``f_i = exp(-i * ln(10000) / (dim/2 - 1))``
    (tensor2tensor's layout), computed in float32 exactly as fairseq2 does.
    """
    half = dim // 2
    steps = torch.arange(first_step, first_step + num_steps, dtype=torch.float32, device=device)
    idx = torch.arange(half, dtype=torch.float32, device=device)
    freqs = torch.exp(idx * -math.log(10000.0) / (half - 1))
    angles = torch.outer(steps, freqs)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MultiheadAttention(nn.Module):
    """q/k/v/output projections with biases (fairseq2 ``StandardMultiheadAttention`` names)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def heads(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.unflatten(-1, (self.num_heads, -1))


class FeedForward(nn.Module):
    """ReLU FFN with biases (fairseq2 ``StandardFeedForwardNetwork`` names)."""

    def __init__(self, dim: int, inner_dim: int, dropout_p: float):
        super().__init__()
        self.inner_proj = nn.Linear(dim, inner_dim)
        self.output_proj = nn.Linear(inner_dim, dim)
        self.dropout_p = dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inner_proj(x))
        if self.dropout_p and self.training:
            h = F.dropout(h, self.dropout_p)
        return self.output_proj(h)


class _Layer(nn.Module):
    """Shared pieces of encoder and decoder layers (pre-LayerNorm)."""

    def __init__(self, cfg: SonarTextConfig, train_dropout: bool):
        super().__init__()
        self.dropout_p = cfg.dropout_p if train_dropout else 0.0
        self.self_attn_layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)
        self.self_attn = MultiheadAttention(cfg.model_dim, cfg.num_heads)
        self.ffn_layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.model_dim, cfg.ffn_dim, self.dropout_p)

    def _residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout_p) if self.dropout_p and self.training else x

    def _self_attention(self, x, causal, impl, cu_seqlens=None, max_seqlen=None):
        """x is packed [T, D] (with cu_seqlens) or right-padded [N, L, D] (without)."""
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = attn.heads(attn.q_proj(h)), attn.heads(attn.k_proj(h)), attn.heads(attn.v_proj(h))
        o = attention(
            q, k, v, causal=causal, cu_seqlens_q=cu_seqlens, max_seqlen_q=max_seqlen,
            dropout_p=self.dropout_p if self.training else 0.0, impl=impl,
        )  # fmt: skip
        return x + self._residual_dropout(attn.output_proj(o.flatten(-2)))

    def _ffn(self, x_TD):
        return x_TD + self._residual_dropout(self.ffn(self.ffn_layer_norm(x_TD)))


class EncoderLayer(_Layer):
    """Bidirectional self-attention + FFN, pre-LN."""

    def forward(self, x, cu_seqlens=None, max_seqlen=None, impl="auto"):
        x = self._self_attention(x, False, impl, cu_seqlens, max_seqlen)
        return self._ffn(x)


class DecoderLayer(_Layer):
    """Causal self-attention + cross-attention to one memory vector + FFN, pre-LN.

    The memory of a SONAR decoder is one vector per sentence (its embedding e). Softmax over a
    single key is 1, so cross-attention is exactly the affine map ``W_o(W_v e + b_v) + b_o``,
    computed once per sentence (``cross_terms``) and added to each of its tokens; the query and
    key projections never matter. ``full_cross_attention`` computes the same thing the long way
    and exists as the reference.
    """

    def __init__(self, cfg: SonarTextConfig, train_dropout: bool):
        super().__init__(cfg, train_dropout)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)
        self.encoder_decoder_attn = MultiheadAttention(cfg.model_dim, cfg.num_heads)

    def cross_terms(self, emb_ND: torch.Tensor) -> torch.Tensor:
        """Per-sentence cross-attention output [N, D] (no dropout)."""
        attn = self.encoder_decoder_attn
        return attn.output_proj(attn.v_proj(emb_ND))

    @staticmethod
    def _per_token(c_N, seq_ids_T):
        """Broadcast per-sentence values to tokens: packed (by seq_ids) or padded ([N, 1, ...])."""
        return c_N[seq_ids_T] if seq_ids_T is not None else c_N.unsqueeze(1)

    def _cross_attention(self, x, emb_ND, seq_ids_T):
        attn = self.encoder_decoder_attn
        if self.dropout_p and self.training:
            # Train-mode reproduction: dropout on the (single, = 1) attention weight of each
            # token and head, then the residual dropout, as fairseq2 does in train mode.
            v = self._per_token(attn.heads(attn.v_proj(emb_ND)), seq_ids_T)
            keep = F.dropout(x.new_ones(x.shape[:-1] + (attn.num_heads, 1)), self.dropout_p)
            return x + self._residual_dropout(attn.output_proj((v * keep).flatten(-2)))
        return x + self._per_token(self.cross_terms(emb_ND), seq_ids_T)

    def full_cross_attention(self, x, emb_ND, seq_ids_T):
        """Reference: the layer's cross-attention computed as attention over one key per token."""
        attn = self.encoder_decoder_attn
        h = self.encoder_decoder_attn_layer_norm(x)
        q = attn.heads(attn.q_proj(h)).unsqueeze(-2)  # [..., H, 1, K]
        mem = self._per_token(emb_ND, seq_ids_T).expand_as(x)
        k = attn.heads(attn.k_proj(mem)).unsqueeze(-2)
        v = attn.heads(attn.v_proj(mem)).unsqueeze(-2)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + attn.output_proj(o.squeeze(-2).flatten(-2))

    def forward(self, x, emb_ND, seq_ids_T=None, cu_seqlens=None, max_seqlen=None, impl="auto", closed_form=True):
        """Packed x [T, D] (seq_ids_T, cu_seqlens given) or right-padded x [N, L, D] (neither)."""
        x = self._self_attention(x, True, impl, cu_seqlens, max_seqlen)
        if closed_form:
            x = self._cross_attention(x, emb_ND, seq_ids_T)
        else:
            x = self.full_cross_attention(x, emb_ND, seq_ids_T)
        return self._ffn(x)

    def step(self, x_BD, cross_BD, k_SBHK, v_SBHK, impl="auto"):
        """One incremental decoding step: x_BD is the newest token of each hypothesis; its key and
        value are written at the last step of the caches [S, B, H, K] (views; earlier steps hold
        the previous tokens'); returns the new states [B, D]. Every cached key is visible to the
        one query, so the attention needs no causal mask."""
        attn = self.self_attn
        h_BD = self.self_attn_layer_norm(x_BD)
        k_SBHK[-1] = attn.heads(attn.k_proj(h_BD))
        v_SBHK[-1] = attn.heads(attn.v_proj(h_BD))
        q_B1HK = attn.heads(attn.q_proj(h_BD)).unsqueeze(1)
        o_B1HK = attention(q_B1HK, k_SBHK.transpose(0, 1), v_SBHK.transpose(0, 1), causal=False, impl=impl)
        x_BD = x_BD + attn.output_proj(o_B1HK[:, 0].flatten(-2))
        x_BD = x_BD + cross_BD
        ffn = self.ffn
        inner = ffn.inner_proj
        if self.training or type(inner) is not nn.Linear or inner._forward_hooks or inner._forward_pre_hooks:
            return self._ffn(x_BD)  # dropout, or a replaced or hooked layer: through the modules
        h_BF = F.relu(step_linear(self.ffn_layer_norm(x_BD), inner.weight, inner.bias))
        return x_BD + ffn.output_proj(h_BF)


class Frontend(nn.Module):
    """Token embedding x sqrt(D) + sinusoidal positions (+ dropout in train-dropout mode)."""

    def __init__(self, cfg: SonarTextConfig, num_positions: int, train_dropout: bool):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim, padding_idx=cfg.legacy_pad_idx)
        self.scale = math.sqrt(cfg.model_dim)
        self.dropout_p = cfg.dropout_p if train_dropout else 0.0
        self._table_args = (num_positions, cfg.model_dim, cfg.legacy_pad_idx + 1)
        self.register_buffer("positions", sinusoidal_table(*self._table_args), persistent=False)

    def reset_positions(self, device=None) -> None:
        """Recompute the position table (not saved in checkpoints; e.g. after building on meta)."""
        self.positions = sinusoidal_table(*self._table_args, device=device)

    def check_length(self, max_len: int) -> None:
        if max_len > self.positions.shape[0]:
            raise ValueError(
                f"token sequences must be at most {self.positions.shape[0]} tokens long (the model's "
                f"max_seq_len), got one of {max_len}"
            )

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.scale
        x = (x.float() + self.positions[positions]).type_as(x)
        if self.dropout_p and self.training:
            x = nn.functional.dropout(x, self.dropout_p)
        return x
