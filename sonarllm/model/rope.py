"""Rotary position embeddings over sentence positions, with llama3 frequency scaling computed as
transformers' ``_compute_llama3_parameters`` does (float32), for the concept transformer."""

from __future__ import annotations

import math
from typing import Any

import torch


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
