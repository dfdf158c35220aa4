"""Packed token layout: the sentences of a batch concatenated into one sequence.

Packing removes padding from every FLOP; ``cu_seqlens`` (int32 [N + 1], cumulative lengths
starting at 0) is the varlen-attention convention of flash-attn and of ``sonarllm_kernels.attention``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    """N token sequences packed into T tokens.

    Attributes:
        tokens: [T] token ids.
        cu_seqlens: int32 [N + 1] segment boundaries.
        seq_ids: int64 [T], the sentence of each token.
        positions: int64 [T], each token's position inside its sentence.
        max_seqlen: length of the longest sentence.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @classmethod
    def from_lengths(cls, tokens: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> PackedBatch:
        """Pack already-concatenated ``tokens`` [T] whose sentences have ``lengths`` [N]."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=tokens.device)
        if lengths.dim() != 1 or (lengths.numel() and int(lengths.min()) < 1):
            raise ValueError(f"lengths must be a 1-d list of positive sentence lengths, got {lengths.tolist()}")
        total = int(lengths.sum())
        if tokens.dim() != 1 or tokens.shape[0] != total:
            raise ValueError(f"tokens must be 1-d with sum(lengths) = {total} entries, got shape {tuple(tokens.shape)}")
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=tokens.device)
        torch.cumsum(lengths, 0, out=cu[1:])
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=tokens.device), lengths)
        positions = torch.arange(total, device=tokens.device) - cu[:-1].long()[seq_ids]
        max_len = int(lengths.max()) if lengths.numel() else 0
        return cls(tokens, cu, seq_ids, positions, max_len)

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int] | torch.Tensor], device=None) -> PackedBatch:
        """Pack a list of token-id sequences (lists or 1-d tensors)."""
        if len(seqs) == 0:
            raise ValueError("cannot pack an empty list of sequences")
        parts = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in seqs]
        lengths = [p.numel() for p in parts]
        if min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token; lengths are {lengths}")
        return cls.from_lengths(torch.cat(parts).to(device), lengths)

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.tokens.to(device), self.cu_seqlens.to(device), self.seq_ids.to(device),
                           self.positions.to(device), self.max_seqlen)  # fmt: skip

    def pad(self, values_T: torch.Tensor, pad_value=0) -> torch.Tensor:
        """Scatter per-token values [T, ...] into a right-padded [N, max_seqlen, ...] tensor."""
        out = values_T.new_full((self.num_seqs, self.max_seqlen) + values_T.shape[1:], pad_value)
        out[self.seq_ids, self.positions] = values_T
        return out

    def unpad(self, padded_NL: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pad``: gather the real tokens back into [T, ...]."""
        return padded_NL[self.seq_ids, self.positions]
