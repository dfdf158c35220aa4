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

import torch
from torch import nn

from sonarllm.sonar.config import SonarTextConfig, sonar_config
from sonarllm.sonar.layers import DecoderLayer, Frontend
from sonarllm.sonar.packing import PackedBatch
from sonarllm.sonar.step_linear import step_linear


class _Stack(nn.Module):
    def __init__(self, cfg: SonarTextConfig, train_dropout: bool):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, train_dropout) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)


class DecoderState:
    """KV caches and per-layer cross terms of B hypotheses being decoded.

    The caches of all layers live in one flat buffer, time-major: ``[S, 2, L, B, H, K]`` (step,
    key/value, layer, hypothesis, head, head dim). A step appends one contiguous ``[2, L, B, H, K]``
    slab, and ``reorder`` (beam search's survivors, every step) is a single ``index_select`` of
    the ``pos`` filled steps into a second, preallocated buffer — it never touches unfilled
    capacity and allocates nothing, where a per-layer ``[B, max_len, H, K]`` cache copies all
    ``max_len`` steps of every layer per reorder.
    """

    def __init__(self, cross_LBD: torch.Tensor, max_len: int, num_heads: int, max_rows: int | None = None):
        self.cross_LBD = cross_LBD
        self.max_len = max_len
        self.pos = 0
        num_layers, rows, dim = cross_LBD.shape
        self._slab = (2, num_layers, num_heads, dim // num_heads)  # per step and hypothesis: [2, L, H, K]
        self._row_numel = 2 * num_layers * dim
        self._capacity = max(rows, max_rows or 0)
        self._buf = self._new_buffer()
        self._spare: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Hypotheses B decoded now."""
        return self.cross_LBD.shape[1]

    def _new_buffer(self) -> torch.Tensor:
        ref = self.cross_LBD
        return torch.empty(self.max_len * self._capacity * self._row_numel, dtype=ref.dtype, device=ref.device)

    def _steps(self, buf: torch.Tensor, steps: int, rows: int) -> torch.Tensor:
        """The first ``steps`` steps of ``buf`` for ``rows`` hypotheses: [S, 2, L, B, H, K]."""
        two, layers, heads, head_dim = self._slab
        return buf[: steps * rows * self._row_numel].view(steps, two, layers, rows, heads, head_dim)

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer`` for steps ``0..pos`` (``pos`` not yet written):
        two strided views [pos + 1, B, H, K] of the buffer."""
        kv = self._steps(self._buf, self.pos + 1, self.rows)
        return kv[:, 0, layer], kv[:, 1, layer]

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep the hypotheses at ``index_B`` (beam search's survivors), in that order."""
        rows, new_rows = self.rows, index_B.numel()
        if new_rows > self._capacity:  # more hypotheses than the buffers were sized for
            self._capacity = new_rows
            self._spare = None
            old, self._buf = self._buf, self._new_buffer()
            self._buf[: old.numel()] = old  # same layout: the filled steps keep their offsets
        if self._spare is None:
            self._spare = self._new_buffer()
        two, layers, heads, head_dim = self._slab
        planes = self.pos * two * layers  # [S, 2, L] planes of [B, H * K] each
        src = self._buf[: self.pos * rows * self._row_numel].view(planes, rows, heads * head_dim)
        dst = self._spare[: self.pos * new_rows * self._row_numel].view(planes, new_rows, heads * head_dim)
        torch.index_select(src, 1, index_B, out=dst)
        self._buf, self._spare = self._spare, self._buf
        self.cross_LBD = self.cross_LBD.index_select(1, index_B)


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
        """Materialised logits [T, V] (for generation and references; training uses the fused loss),
        through ``step_linear``: sliced at a decoding step's row counts on CPU, plain otherwise."""
        return step_linear(h_TD, self.output_weight)

    # --- incremental decoding -----------------------------------------------------------------

    def start(self, emb_BD: torch.Tensor, max_len: int, *, max_rows: int | None = None) -> DecoderState:
        """Empty KV caches for ``max_len`` steps of B hypotheses decoding from ``emb_BD``;
        ``max_rows`` sizes them for the most hypotheses a later ``reorder`` keeps (beam search:
        B x beam), so that no reorder reallocates."""
        self._check_embeddings(emb_BD, emb_BD.shape[0])
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the decoder's max_seq_len {self.config.max_seq_len}")
        emb_BD = emb_BD.to(self.output_weight.dtype)
        cross = torch.stack([layer.cross_terms(emb_BD) for layer in self.decoder.layers])
        return DecoderState(cross, max_len, self.config.num_heads, max_rows)

    def step(self, tokens_B: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Feed one token per hypothesis; returns the next-token logits [B, V] (float32). The wide
        projections of the step go through ``step_linear`` (sliced on CPU, where that is faster)."""
        if state.pos >= state.max_len:
            raise ValueError(f"the KV cache holds {state.max_len} steps; cannot take another")
        positions = torch.full_like(tokens_B, state.pos)
        x_BD = self.decoder_frontend(tokens_B, positions)
        for i, layer in enumerate(self.decoder.layers):
            k_SBHK, v_SBHK = state.layer_cache(i)
            x_BD = layer.step(x_BD, state.cross_LBD[i], k_SBHK, v_SBHK, impl=self.kernel_impl)
        state.pos += 1
        return self.logits(self.decoder.layer_norm(x_BD)).float()
