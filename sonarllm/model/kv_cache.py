"""The KV cache of incremental generation: per layer a fixed-capacity key and value buffer
[B, C, H, K] and a length per document, so documents of different lengths share one batch;
``SonarLLM.prefill`` / ``step`` attend through varlen attention reading the buffers in place.

Shape legend: B documents, C cache capacity (sentences per document), H heads, K head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
