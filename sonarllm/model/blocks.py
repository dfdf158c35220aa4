"""The concept transformer's layers, HF ``LlamaModel``'s exactly: pre-RMSNorm, multi-head
attention with RoPE (``sonarllm_kernels.attention``, no GQA, no biases), SwiGLU without biases.

Shape legend: T packed positions (or B x S), D model dim, H heads, K head dim, F FFN dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sonarllm.config import SonarLLMConfig
from sonarllm.model.rope import apply_rope
from sonarllm_kernels.attention import attention


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
