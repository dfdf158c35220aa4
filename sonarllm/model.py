"""The concept transformer: a Llama-style decoder over sentence embeddings.

A document is a sequence of SONAR sentence embeddings; the model reads them causally and
predicts, at every position t, the embedding of sentence t + 1::

    embeds [.., E] --input_proj (normalize, Linear E->D)--> [.., D]
        --num_layers x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]--> RMSNorm
        --output_proj (Linear D->E, denormalize)--> pred [.., E]

The blocks are HF ``LlamaModel``'s exactly (docs/sonar-llm.md §1.2): pre-RMSNorm, multi-head
attention without GQA or biases, RoPE over sentence positions with llama3 frequency scaling
(computed as transformers' ``_compute_llama3_parameters`` does, in float32), SwiGLU without
biases, a final RMSNorm, HF's initialisation (normal std ``init_std`` for linear weights,
RMSNorm weights 1). There is no token embedding. The two projections are
``sonarllm_kernels.FusedEmbeddingProjection`` (bias, PyTorch's nn.Linear initialisation) so that the
optional SONAR normalizer (LCM) is fused into them; attention is ``sonarllm_kernels.attention``. Every
kernel call gets ``config.kernel_impl``.

Layouts: ``forward`` takes a right-padded batch [B, S, E] (causal attention makes the padding
invisible to real positions: its outputs are garbage to be masked by the loss) or packed
documents [T, E] with int32 ``cu_seqlens`` [B + 1] (varlen attention, positions restart at 0
in every document).

Incremental generation keeps a ``KVCache``: per layer a fixed-capacity key and value buffer
[B, C, H, K] and a length per document, so documents of different lengths share one batch.
``prefill`` appends any number of sentences per document (the prompts, ragged), ``step``
appends one per document; both attend through varlen attention reading the buffers in place
(see ``KVCache``). They are inference-only (``torch.no_grad``).

Checkpoints (``save_pretrained`` / ``from_pretrained``): a directory with ``config.json`` and
``model.safetensors`` (whose metadata repeats the config), each written to a temporary file
and renamed into place.

Shape legend: B documents, S sentences per document, E SONAR dim, D model dim, H heads,
K head dim, F FFN dim, T packed positions, C cache capacity (sentences per document).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from sonarllm_kernels.attention import attention
from sonarllm_kernels.embedding_projection import FusedEmbeddingProjection, check_normalizer_values
from sonarllm.config import SonarLLMConfig
from sonarllm.files import atomic_write as _atomic_write
from sonarllm.normalizer import SonarNormalizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_METADATA_KEY = "sonarllm_config"

# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [K/2] (float32, CPU): plain RoPE, then llama3 scaling if given.

    llama3 keeps high frequencies (wavelength < original_max / high_freq_factor), divides low
    ones (wavelength > original_max / low_freq_factor) by ``factor`` and interpolates in
    between; the float32 operations follow transformers' ``_compute_llama3_parameters``.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    inv_freq: torch.Tensor, num_positions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [num_positions, K] (float32), halves repeated as in HF's Llama."""
    inv_freq = inv_freq.to(device)
    freqs_SK2 = (
        torch.arange(num_positions, device=device).to(torch.float32)[:, None] * inv_freq[None, :]
    )
    emb_SK = torch.cat((freqs_SK2, freqs_SK2), dim=-1)
    return emb_SK.cos(), emb_SK.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., H, K] by angles whose cos/sin [..., 1, K] broadcast over the heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalized in float32, cast back, times ``weight`` (init 1)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; q/k/v/o projections without bias."""

    def __init__(self, cfg: SonarLLMConfig, device=None, dtype=None):
        super().__init__()
        f = {"bias": False, "device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.impl = cfg.num_heads, cfg.head_dim, cfg.kernel_impl
        self.q_proj = nn.Linear(cfg.model_dim, cfg.attn_dim, **f)
        self.k_proj = nn.Linear(cfg.model_dim, cfg.attn_dim, **f)
        self.v_proj = nn.Linear(cfg.model_dim, cfg.attn_dim, **f)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.model_dim, **f)

    def forward(self, x, cos, sin, attn_args: dict, kv: tuple | None = None) -> torch.Tensor:
        """x [B, S, D] or [T, D]; cos/sin broadcastable to [..., 1, K]; ``kv`` = (k cache
        [B*C, H, K], v cache [B*C, H, K], slot [T]) writes this call's keys/values into the
        cache at ``slot`` and attends over the cache."""
        heads = (self.num_heads, self.head_dim)
        q, k, v = (proj(x).unflatten(-1, heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # q's dtype: x's, or autocast's
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            o = attention(q, k, v, causal=True, impl=self.impl, **attn_args)
        else:
            k_cache, v_cache, slot_T = kv
            k_cache.index_copy_(0, slot_T, k.to(k_cache.dtype))
            v_cache.index_copy_(0, slot_T, v.to(v_cache.dtype))
            o = attention(
                q.to(k_cache.dtype), k_cache, v_cache, causal=True, impl=self.impl, **attn_args
            )
        return self.o_proj(o.to(q.dtype).flatten(-2))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (HF LlamaMLP)."""

    def __init__(self, cfg: SonarLLMConfig, device=None, dtype=None):
        super().__init__()
        f = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(cfg.model_dim, cfg.ffn_dim, **f)
        self.up_proj = nn.Linear(cfg.model_dim, cfg.ffn_dim, **f)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.model_dim, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block (HF LlamaDecoderLayer; the parameter names match it)."""

    def __init__(self, cfg: SonarLLMConfig, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps, device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps, device, dtype)
        self.mlp = SwiGLU(cfg, device, dtype)

    def forward(self, x, cos, sin, attn_args: dict, kv: tuple | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_args, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# KV cache


@dataclass
class KVCache:
    """Keys and values of B documents of different lengths, for ``SonarLLM.prefill`` / ``step``.

    Document b's first ``lengths_B[b]`` sentences occupy slots ``[0, lengths_B[b])`` of row b
    of every buffer; new sentences are written from ``lengths_B[b]`` on. Attention reads the
    buffers in place: the flattened [B*C, H, K] buffer is described to varlen attention as 2B
    segments, document b's cached keys ``[b*C, b*C + lengths_B[b])`` (after the write) and the
    unused gap up to ``(b+1)*C``; the new queries belong to the document segments, the gap
    segments get none. Bottom-right causal alignment lets each new sentence see its document's
    whole cache and the new sentences before it. Nothing is gathered or repacked per step.

    Attributes:
        keys, values: num_layers x [B, C, H, K] buffers (C = capacity).
        lengths_B: int64 [B] cached sentences per document (on the buffers' device).
        host_lengths: the same as a list of ints (capacity checks without a device sync).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths_B: torch.Tensor
    host_lengths: list[int]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def select(self, index: torch.Tensor | Sequence[int]) -> KVCache:
        """A new cache holding the documents at ``index`` (a 1-d index, in that order), e.g. the
        unfinished documents of a batch. Copies the buffers."""
        index_B = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        if index_B.dim() != 1 or index_B.numel() == 0:
            raise ValueError(f"index must be 1-d and non-empty, got shape {tuple(index_B.shape)}")
        host = index_B.tolist()
        if any(not 0 <= i < self.batch_size for i in host):
            raise ValueError(f"index values must be in [0, {self.batch_size}), got {host}")
        return KVCache(
            [k.index_select(0, index_B) for k in self.keys],
            [v.index_select(0, index_B) for v in self.values],
            self.lengths_B.index_select(0, index_B),
            [self.host_lengths[i] for i in host],
        )


def _cache_layout(cache: KVCache, n_host: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Attention arguments, positions [T] and cache slots [T] for appending n_host[b] new
    sentences to document b (the new sentences are packed [T, ...] document by document)."""
    dev, n_doc, cap = cache.device, cache.batch_size, cache.capacity
    n_B = torch.tensor(n_host, dtype=torch.int64, device=dev)
    cu_new = F.pad(torch.cumsum(n_B, 0), (1, 0))  # [B + 1]
    t_T = torch.arange(sum(n_host), device=dev)
    doc_T = torch.searchsorted(cu_new[1:], t_T, right=True)
    pos_T = cache.lengths_B[doc_T] + (t_T - cu_new[doc_T])
    slot_T = doc_T * cap + pos_T
    start_B = torch.arange(n_doc, device=dev) * cap
    end = torch.full((1,), n_doc * cap, dtype=torch.int64, device=dev)
    cu_k = torch.cat([torch.stack([start_B, start_B + cache.lengths_B + n_B], 1).flatten(), end])
    cu_q = torch.cat([torch.stack([cu_new[:-1], cu_new[1:]], 1).flatten(), cu_new[-1:]])
    args = dict(
        cu_seqlens_q=cu_q.to(torch.int32),
        cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=max(n_host, default=0),
        max_seqlen_k=cap,  # a gap segment may span a whole row
    )
    return args, pos_T, slot_T


# ---------------------------------------------------------------------------------------------
# The model


class SonarLLM(nn.Module):
    """Concept transformer over SONAR sentence embeddings (see the module docstring).

    Args:
        config: a SonarLLMConfig (e.g. ``SonarLLMConfig.from_name("100M")``).
        device, dtype: where and in which dtype to create the parameters (``device="meta"``
            builds a shape-only model, e.g. to count parameters).

    Attributes:
        gradient_checkpointing: recompute each block in the backward pass (training only).
    """

    def __init__(
        self,
        config: SonarLLMConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(config, SonarLLMConfig):
            raise TypeError(f"config must be a SonarLLMConfig, got {type(config).__name__}")
        cfg = self.config = config
        f = {"device": device, "dtype": dtype}
        proj = {"bias": True, "impl": cfg.kernel_impl, **f}
        self.input_proj = FusedEmbeddingProjection(cfg.sonar_dim, cfg.model_dim, mode="in", **proj)
        self.layers = nn.ModuleList(Block(cfg, **f) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.model_dim, cfg.rms_norm_eps, **f)
        self.output_proj = FusedEmbeddingProjection(
            cfg.model_dim, cfg.sonar_dim, mode="out", **proj
        )
        if cfg.use_normalizer:  # identity until set_normalizer; buffers exist for the checkpoint
            for p in (self.input_proj, self.output_proj):
                p.center = torch.zeros(cfg.sonar_dim, dtype=torch.float32, device=p.weight.device)
                p.scale = torch.ones(cfg.sonar_dim, dtype=torch.float32, device=p.weight.device)
        self.gradient_checkpointing = False
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()
        self._fill_rope_cache()

    def reset_parameters(self) -> None:
        """HF Llama init: linear weights of the blocks ~ N(0, init_std), RMSNorm weights 1; the
        projections get nn.Linear's init."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.ones_(self.norm.weight)
        self.input_proj.reset_parameters()
        self.output_proj.reset_parameters()

    def num_trainable_parameters(self) -> int:
        """Parameters with ``requires_grad`` (the paper's "trainable": blocks + both projections)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- normalizer ----------------------------------------------------------------------------

    def set_normalizer(
        self, center: torch.Tensor | SonarNormalizer, scale: torch.Tensor | None = None
    ) -> None:
        """Install the SONAR normalizer (a fitted ``SonarNormalizer``, or ``center``, ``scale`` [E])
        in both projections. Needs ``config.use_normalizer``. A normalizer that clips (LCM's
        ``clip_min`` / ``clip_max``) is refused: the fused projections do not clip."""
        if not self.config.use_normalizer:
            raise ValueError("set_normalizer needs a model built with config.use_normalizer=True")
        if isinstance(center, SonarNormalizer):
            if scale is not None:
                raise ValueError("scale must be None when center is a SonarNormalizer")
            if center.clips:
                raise ValueError(
                    "center is a SonarNormalizer with clip_min/clip_max (LCM's clip_proba); the model's fused "
                    "projections apply center and scale only: remove the bounds (set_clip_(None, None)) to use it"
                )
            center, scale = center.center, center.scale
        if scale is None:
            raise ValueError("scale must be given with a center tensor")
        for p in (self.input_proj, self.output_proj):
            p.set_normalizer(center, scale)

    def get_normalizer(self) -> SonarNormalizer | None:
        """A copy of the model's normalizer as a ``SonarNormalizer`` (None without one)."""
        if self.input_proj.center is None:
            return None
        norm = SonarNormalizer(
            self.config.sonar_dim, min_scale=1e-30, device=self.input_proj.center.device
        )
        norm.center.copy_(self.input_proj.center)
        norm.scale.copy_(self.input_proj.scale)
        return norm

    def _apply(self, fn, recurse=True):
        # Keep the normalizer in float32 under .to(dtype) / .half() / .bfloat16(): a bf16 scale
        # would be off by up to 0.4%. Device moves still apply.
        saved = [
            (p, p.center, p.scale)
            for p in (self.input_proj, self.output_proj)
            if p.center is not None
        ]
        super()._apply(fn, recurse)
        for p, center, scale in saved:
            if p.center is not None and p.center.dtype != center.dtype:
                p.center, p.scale = center.to(p.center.device), scale.to(p.scale.device)
        self._fill_rope_cache()
        return self

    # -- helpers -------------------------------------------------------------------------------

    def _fill_rope_cache(self) -> None:
        """Build the RoPE tables for the parameters' device now, not in the first forward: a
        forward that fills the cache under torch.compile would compile again on the next call."""
        device = self.input_proj.weight.device
        if device.type != "meta":
            self._rope = {}
            self._rope_tables(device)

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._rope:
            cfg = self.config
            # Normal tensors even when first asked for under inference_mode (generation): the
            # cache is reused by training forwards, which cannot save inference tensors.
            with torch.inference_mode(False), torch.no_grad():
                inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                self._rope[key] = rope_tables(inv_freq, cfg.max_seq_len, device)
        return self._rope[key]

    def _check_embeds(
        self, embeds: Any, dims: tuple[int, ...], layout: str, hint: str = ""
    ) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"embeds must be a torch.Tensor, got {type(embeds).__name__}")
        if embeds.dim() not in dims or embeds.shape[-1] != self.config.sonar_dim:
            raise ValueError(
                f"embeds must have shape {layout} with E = sonar_dim = {self.config.sonar_dim}{hint}, got {tuple(embeds.shape)}"
            )
        if not embeds.is_floating_point():
            raise TypeError(f"embeds must be a float tensor, got {embeds.dtype}")
        weight = self.input_proj.weight
        if embeds.dtype != weight.dtype:
            if not torch.is_autocast_enabled(embeds.device.type):
                raise TypeError(
                    f"embeds dtype {embeds.dtype} must equal the model's dtype {weight.dtype} (or use autocast)"
                )
            embeds = embeds.to(weight.dtype)
        if embeds.device != weight.device:
            raise ValueError(f"embeds is on {embeds.device} but the model is on {weight.device}")
        return embeds

    def _check_cu_seqlens(
        self, cu_seqlens: Any, n_tokens: int, device: torch.device, values: bool = True
    ) -> list[int] | None:
        """Validate int32 cu_seqlens [B + 1] for packed embeds of n_tokens rows and return a host
        copy (``values=False``: type, shape and device only, no sync; returns None)."""
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(
                f"cu_seqlens must be an int32 torch.Tensor, got {type(cu_seqlens).__name__}"
            )
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be int32 of shape [B + 1] (B >= 1), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but embeds is on {device}")
        if not values:
            return None
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != n_tokens or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
            raise ValueError(
                f"cu_seqlens must rise from 0 to embeds.shape[0] = {n_tokens}, got {cu[:8]}{'...' if len(cu) > 8 else ''}"
            )
        return cu

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_seq_len:
            raise ValueError(
                f"{what} = {length} exceeds config.max_seq_len = {self.config.max_seq_len}"
            )

    def _to_proj(self, x: torch.Tensor, proj: FusedEmbeddingProjection) -> torch.Tensor:
        return x.to(proj.weight.dtype) if x.dtype != proj.weight.dtype else x

    def _trunk(self, x, cos, sin, attn_args, kvs=None) -> torch.Tensor:
        h = self.input_proj(x)
        for i, layer in enumerate(self.layers):
            kv = None if kvs is None else kvs[i]
            if (
                self.gradient_checkpointing
                and self.training
                and torch.is_grad_enabled()
                and kv is None
            ):
                h = checkpoint(layer, h, cos, sin, attn_args, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_args, kv)
        return self.output_proj(self._to_proj(self.norm(h), self.output_proj))

    # -- training / scoring --------------------------------------------------------------------

    def forward(
        self,
        embeds: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Predict the next sentence embedding at every position.

        Args:
            embeds: right-padded documents [B, S, E], or packed documents [T, E] with cu_seqlens.
            cu_seqlens: int32 [B + 1] document boundaries of packed ``embeds`` (rising from 0 to T).
            max_seqlen: longest packed document; computed from cu_seqlens when None.

        Returns:
            pred [B, S, E] or [T, E] (embeds' layout): pred at t predicts embedding t + 1 of the
            same document. Padded positions and each document's last position predict nothing
            the loss should count.
        """
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError("max_seqlen is only used with cu_seqlens (packed embeds [T, E])")
            x = self._check_embeds(embeds, (3,), "[B, S, E]", " (packed [T, E] needs cu_seqlens)")
            self._check_length(x.shape[1], "embeds.shape[1] (sentences per document)")
            cos, sin = self._rope_tables(x.device)
            n = x.shape[1]
            return self._trunk(x, cos[:n, None], sin[:n, None], {})
        x = self._check_embeds(embeds, (2,), "[T, E]", " (the packed layout of cu_seqlens)")
        cu = self._check_cu_seqlens(cu_seqlens, x.shape[0], x.device, values=max_seqlen is None)
        if cu is not None:
            max_seqlen = max(b - a for a, b in zip(cu, cu[1:], strict=False))
        elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
        self._check_length(max_seqlen, "max_seqlen (longest packed document)")
        cu_T = cu_seqlens.to(torch.int64)
        t_T = torch.arange(x.shape[0], device=x.device)
        pos_T = t_T - cu_T[torch.searchsorted(cu_T[1:], t_T, right=True)]
        cos, sin = self._rope_tables(x.device)
        attn_args = dict(cu_seqlens_q=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return self._trunk(x, cos[pos_T, None], sin[pos_T, None], attn_args)

    # -- incremental generation ----------------------------------------------------------------

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KVCache for ``batch_size`` documents of up to ``max_len`` sentences each
        (default and upper bound: config.max_seq_len), on the model's device and dtype unless
        given. Memory: 2 * num_layers * batch_size * max_len * num_heads * head_dim elements."""
        cfg = self.config
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if (
            isinstance(max_len, bool)
            or not isinstance(max_len, int)
            or not 1 <= max_len <= cfg.max_seq_len
        ):
            raise ValueError(
                f"max_len must be an int in [1, config.max_seq_len = {cfg.max_seq_len}], got {max_len!r}"
            )
        weight = self.input_proj.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a float dtype, got {dtype}")
        shape = (batch_size, max_len, cfg.num_heads, cfg.head_dim)
        return KVCache(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            torch.zeros(batch_size, dtype=torch.int64, device=device),
            [0] * batch_size,
        )

    def _check_cache(self, cache: Any, batch_size: int, device: torch.device) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"cache must be a KVCache (see SonarLLM.new_cache), got {type(cache).__name__}"
            )
        cfg = self.config
        heads = (cfg.num_heads, cfg.head_dim)
        if len(cache.keys) != cfg.num_layers or cache.keys[0].shape[2:] != heads:
            raise ValueError(
                "cache was not made for this model (layers, heads or head dim differ); use model.new_cache"
            )
        if cache.batch_size != batch_size:
            raise ValueError(
                f"cache holds {cache.batch_size} documents but embeds has {batch_size}"
            )
        if cache.device != device:
            raise ValueError(f"cache is on {cache.device} but embeds is on {device}")

    def _extend(self, x_TE: torch.Tensor, cache: KVCache, n_host: list[int]) -> torch.Tensor:
        """Append n_host[b] packed sentences to document b of the cache; predictions [T, E]."""
        full = [
            b
            for b, (old, n) in enumerate(zip(cache.host_lengths, n_host, strict=True))
            if old + n > cache.capacity
        ]
        if full:
            b = full[0]
            raise ValueError(
                f"cache capacity {cache.capacity} exceeded: document {b} holds {cache.host_lengths[b]} sentences "
                f"and {n_host[b]} more were given ({len(full)} documents overflow); make a larger cache"
            )
        args, pos_T, slot_T = _cache_layout(cache, n_host)
        cos, sin = self._rope_tables(x_TE.device)
        flat = lambda t: t.view(-1, *t.shape[2:])  # [B, C, H, K] -> [B*C, H, K], same storage
        kvs = [(flat(k), flat(v), slot_T) for k, v in zip(cache.keys, cache.values, strict=True)]
        pred_TE = self._trunk(x_TE, cos[pos_T, None], sin[pos_T, None], args, kvs)
        cache.lengths_B += torch.tensor(n_host, dtype=torch.int64, device=cache.device)
        cache.host_lengths = [old + n for old, n in zip(cache.host_lengths, n_host, strict=True)]
        return pred_TE

    @torch.no_grad()
    def prefill(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        *,
        lengths: torch.Tensor | Sequence[int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append prompts (any number of sentences per document, ragged) to ``cache``.

        Works on an empty cache (the usual prefill) and on a filled one (appending several
        sentences at once); predictions equal ``forward`` on the concatenated documents.

        Args:
            embeds: right-padded [B, S, E] (document b's first ``lengths[b]`` rows are real), or
                packed [T, E] with ``cu_seqlens``.
            cache: a KVCache for B documents (``new_cache``); advanced in place.
            lengths: [B] real sentences per row of padded embeds (default: S each; 0 allowed).
            cu_seqlens: int32 [B + 1] boundaries of packed embeds.

        Returns:
            pred in embeds' layout; padded slots hold zeros. The prediction for the sentence
            after document b's prompt is ``pred[b, lengths[b] - 1]`` (padded) or
            ``pred[cu_seqlens[b + 1] - 1]`` (packed).
        """
        if cu_seqlens is not None:
            if lengths is not None:
                raise ValueError(
                    "give lengths (padded embeds) or cu_seqlens (packed embeds), not both"
                )
            x = self._check_embeds(embeds, (2,), "[T, E]", " (the packed layout of cu_seqlens)")
            cu = self._check_cu_seqlens(cu_seqlens, x.shape[0], x.device)
            self._check_cache(cache, len(cu) - 1, x.device)
            return self._extend(x, cache, [b - a for a, b in zip(cu, cu[1:], strict=False)])
        x = self._check_embeds(embeds, (3,), "[B, S, E]", " (packed [T, E] needs cu_seqlens)")
        n_doc, n_sent = x.shape[:2]
        if lengths is None:
            n_host = [n_sent] * n_doc
        else:
            n_host = (
                torch.as_tensor(lengths).tolist()
                if isinstance(lengths, torch.Tensor)
                else list(lengths)
            )
            if len(n_host) != n_doc or any(
                isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_sent
                for n in n_host
            ):
                raise ValueError(
                    f"lengths must hold B = {n_doc} ints in [0, S = {n_sent}], got {n_host}"
                )
        self._check_cache(cache, n_doc, x.device)
        valid_BS = (
            torch.arange(n_sent, device=x.device)[None, :]
            < torch.tensor(n_host, device=x.device)[:, None]
        )
        pred_TE = self._extend(x[valid_BS], cache, n_host)
        return pred_TE.new_zeros(x.shape).masked_scatter(valid_BS[..., None], pred_TE)

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one sentence embedding per document [B, E] to ``cache`` (in place) and return
        the predicted next embeddings [B, E]."""
        x = self._check_embeds(embeds, (2,), "[B, E]")
        self._check_cache(cache, x.shape[0], x.device)
        return self._extend(x, cache, [1] * x.shape[0])

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written to a temporary file in the same directory, flushed to disk and
        renamed over the old one (``os.replace``), so an interrupted save never leaves a
        half-written file; the weights' metadata repeats the config, so ``from_pretrained``
        notices a config.json from another save. Returns the directory.
        """
        path = Path(directory)
        if self.input_proj.weight.device.type == "meta":
            raise ValueError("cannot save a model on the meta device (it has no weights)")
        path.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", _METADATA_KEY: config_json}
        _atomic_write(
            path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=metadata)
        )
        _atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(config_json + "\n"))
        return path

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ) -> SonarLLM:
        """Load a ``save_pretrained`` directory, in eval mode.

        Args:
            directory: holds ``config.json`` and ``model.safetensors``.
            device: where to put the model (default CPU).
            dtype: cast floating parameters to it (default: as stored); the normalizer stays float32.
            config_overrides: fields replaced in the loaded config, e.g. ``kernel_impl="torch"``.

        Raises:
            FileNotFoundError: the directory or one of its files is missing.
            ValueError: config.json is unreadable or invalid, the weights file is corrupted, or the
                config does not match the weights (missing / unexpected keys, shape mismatches are
                named).
        """
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {str(path)!r} does not exist (or is not a directory)"
            )
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"checkpoint file {str(p)!r} is missing (a save_pretrained directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
                )
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be a float torch.dtype or None, got {dtype!r}")
        try:
            values = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(values).__name__}")
        try:
            config = SonarLLMConfig.from_dict({**values, **config_overrides})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config_path} (with overrides {config_overrides}): {exc}") from exc

        def corrupted(exc: Exception) -> ValueError:
            return ValueError(
                f"{weights_path} is corrupted or not a safetensors file: {type(exc).__name__}: {exc}"
            )

        try:  # safetensors raises its own SafetensorError (neither OSError nor ValueError)
            handle = safe_open(str(weights_path), framework="pt", device="cpu")
        except Exception as exc:
            raise corrupted(exc) from exc
        with handle as f:
            try:
                metadata = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as exc:
                raise corrupted(exc) from exc
            with torch.device("meta"):
                model = cls(config)
            _check_state_shapes(model, shapes, config_path, weights_path)
            try:
                state = {k: f.get_tensor(k) for k in shapes}
            except Exception as exc:
                raise corrupted(exc) from exc
        saved = {k: v for k, v in config.to_dict().items() if k not in config_overrides}
        _warn_config_drift(metadata.get(_METADATA_KEY), saved, config_path, weights_path)
        model.load_state_dict(state, strict=True, assign=True)
        for p in (model.input_proj, model.output_proj):
            if p.center is not None:
                try:
                    check_normalizer_values(p.center, p.scale)
                except ValueError as exc:
                    raise ValueError(
                        f"{weights_path}: normalizer of {'input_proj' if p is model.input_proj else 'output_proj'}: {exc}"
                    ) from exc
        model.to(device=device or "cpu", dtype=dtype)
        return model.eval()

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        config: Any = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        **config_overrides: Any,
    ) -> SonarLLM:
        """Load one of the SONAR-LLM paper's released checkpoints, in eval mode (sonarllm/official.py).

        Its predictions equal the official ``reverse_proj(llama(inputs_embeds=forward_proj(e))
        .hidden_states[-1])``.

        Args:
            path: the GitHub-release ``torch.save`` file (``model_state_dict`` with
                ``llama_model.*``, ``forward_proj.linear.*``, ``reverse_proj.linear.*``,
                ``sonar_decoder.*``), or a Hugging Face directory (``config.json`` with
                ``llama_config``, ``embed_dim``, ``add_begin``; ``pytorch_model.bin``).
            config: the official configuration: a path to ``SonarLLM_{100M,...}.json``, a dict
                (``{"llama_config": {...}}`` or the bare llama config) or a ``LlamaConfig``.
                Required for a release file; for a directory it replaces its ``config.json``.
            device: where to put the model (default CPU).
            dtype: floating dtype of the parameters (default: as stored when all stored tensors
                share one, else float32).
            trust: unpickle any object of the file (only for files you trust); by default only
                tensors, plain containers and NumPy arrays (the release files' RNG states).
            config_overrides: fields of ``SonarLLMConfig`` to replace, e.g. ``kernel_impl="torch"``.

        Raises:
            CheckpointError: a missing or unreadable file, a config that is missing, does not
                fit the weights (layer count, shapes) or asks for something not implemented
                (grouped-query attention, biases, other activations or RoPE types), unknown
                keys in the state dict; each named.
        """
        from sonarllm.official import (
            check_official_shapes,
            locate_official,
            official_to_config,
            official_to_state,
            read_official_state,
        )
        from sonarllm.sonar.checkpoint import CheckpointError

        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a float torch.dtype or None, got {dtype!r}")
        weights_path, dir_config = locate_official(path)
        if config is None:
            if dir_config is None:
                raise CheckpointError(
                    f"{path} records no configuration: pass config= (the official SonarLLM_{{100M,300M,600M,900M}}.json "
                    "that matches it)"
                )
            config = dir_config
        cfg = official_to_config(config, **config_overrides)
        state = official_to_state(read_official_state(weights_path, trust=trust), cfg, str(weights_path))
        with torch.device("meta"):
            model = cls(cfg)
        check_official_shapes(model, state, str(weights_path))
        stored = {v.dtype for v in state.values()}
        target = dtype or (stored.pop() if len(stored) == 1 and next(iter(stored)).is_floating_point else torch.float32)
        model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
        model.to(device=device or "cpu")
        return model.eval()


def _check_state_shapes(
    model: SonarLLM, shapes: dict[str, tuple], config_path: Path, weights_path: Path
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k}: {shapes[k]} in the file, {expected[k]} for the config"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k] != expected[k]
    ]
    if missing or unexpected or wrong:
        show = lambda items: f"{len(items)}: {items[:6]}{' ...' if len(items) > 6 else ''}"
        parts = [f"missing keys ({show(missing)})"] if missing else []
        parts += [f"unexpected keys ({show(unexpected)})"] if unexpected else []
        parts += [f"shape mismatches ({show(wrong)})"] if wrong else []
        raise ValueError(
            f"{config_path} does not match the weights in {weights_path}: " + "; ".join(parts)
        )


def _warn_config_drift(
    saved_json: str | None, loaded: dict, config_path: Path, weights_path: Path
) -> None:
    """Warn when config.json differs from the config saved with the weights (edited, or a
    config.json from another save: save_pretrained renames the weights first). ``loaded`` is
    the resolved config minus the caller's overrides; kernel_impl is not compared."""
    if saved_json is None:
        return
    try:
        saved = SonarLLMConfig.from_dict(json.loads(saved_json)).to_dict()
    except (json.JSONDecodeError, TypeError, ValueError):
        return
    differ = sorted(k for k in loaded if k != "kernel_impl" and saved.get(k) != loaded[k])
    if differ:
        warnings.warn(
            f"{config_path} differs from the config saved with {weights_path} in {differ}; using {config_path}",
            RuntimeWarning,
            stacklevel=3,
        )
