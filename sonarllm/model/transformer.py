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

Checkpoints (``save_pretrained`` / ``from_pretrained`` / ``from_official``): sonarllm/model/io.py.
The package splits the model into rope.py (positions), blocks.py (layers), kv_cache.py
(incremental generation), io.py (checkpoints) and this file (the model).

Shape legend: B documents, S sentences per document, E SONAR dim, D model dim, H heads,
K head dim, F FFN dim, T packed positions, C cache capacity (sentences per document).

Size: about 460 lines, the one ``SonarLLM`` class (its input checks, forward, incremental
generation and the checkpoint methods' entry points); its parts that stand alone are the other modules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sonarllm.config import SonarLLMConfig
from sonarllm.model import io
from sonarllm.model.blocks import Block, RMSNorm
from sonarllm.model.kv_cache import KVCache, _cache_layout
from sonarllm.model.rope import rope_inv_freq, rope_tables
from sonarllm.normalizer import SonarNormalizer
from sonarllm_kernels.embedding_projection import FusedEmbeddingProjection


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

    # -- checkpoints (sonarllm/model/io.py) ------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically;
        returns the directory (see ``sonarllm.model.io.save_pretrained``)."""
        return io.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, **config_overrides: Any) -> SonarLLM:  # fmt: skip
        """Load a ``save_pretrained`` directory, in eval mode; ``config_overrides`` replace fields
        of its config (e.g. ``kernel_impl="torch"``). Errors and details:
        ``sonarllm.model.io.load_pretrained``."""
        return io.load_pretrained(cls, directory, device, dtype, **config_overrides)

    @classmethod
    def from_official(cls, path: str | os.PathLike, config: Any = None, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, trust: bool = False, **config_overrides: Any) -> SonarLLM:  # fmt: skip
        """Load one of the SONAR-LLM paper's released checkpoints (the GitHub-release file with its
        official JSON config, or a Hugging Face directory), in eval mode, with predictions equal to
        the official formulation. Arguments and errors: ``sonarllm.model.io.load_official``."""
        return io.load_official(cls, path, config, device=device, dtype=dtype, trust=trust, **config_overrides)
