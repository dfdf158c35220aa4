"""Model FLOPs of one SONAR-LLM training step, counted from the architecture (for MFU).

Convention (PaLM's and Megatron's model FLOPs): matrix products only, 2 FLOPs per multiply-add,
nothing recomputed is counted, and causal attention counts the visible (query, key) pairs only
(``dense_attention=True`` counts every pair, as a materialising implementation computes them).

Concept transformer (trainable), one document of S sentence positions, model width D, attention
width A = heads x head_dim, SwiGLU width F, SONAR width E, L layers::

    forward  = S * [2*E*D  +  L * (2*D*3A + 2*A*D + 3 * 2*D*F)  +  2*D*E]  +  L * 2 * 2*A * P(S)
               (input projection, q/k/v and o projections, SwiGLU, output projection; scores and
               weighted values over P(S) = S(S+1)/2 visible pairs)
    backward = 2 x forward (d input and d weight of every product; attention: dq, dk, dv from
               dp and ds, 4 products against 2), except the input projection, whose input is
               data: d weight only, 1 x its forward.

Frozen SONAR decoder (teacher forcing), N target sentences of l_i decoder positions, T = sum l_i,
width d, FFN width f, vocabulary V, L_d layers::

    forward  = T * [L_d * (4 * 2*d*d + 2 * 2*d*f) + 2*d*V]          self-attention projections,
               + N * L_d * 2 * 2*d*d                                  FFN, logits; closed-form
               + L_d * 2 * 2*d * sum_i P(l_i)                         cross-attention W_o W_v e
                                                                      once per sentence; scores
    backward = the gradient of the embeddings only (frozen weights: no d weight): 1 x the forward
               of every product on the path from the embeddings to the loss (d input), 2 x for
               attention. Layer 0's self-attention comes before the first cross-attention, so
               nothing it computes depends on the embeddings: it has no backward at all.

MFU = (forward + backward FLOPs) / step time / the GPU's measured dense bf16 matmul rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)


def _pairs(length: int, dense: bool) -> int:
    return length * length if dense else length * (length + 1) // 2


def concept_flops(cfg, doc_lengths: Sequence[int], *, dense_attention: bool = False) -> Flops:
    """FLOPs of the concept transformer (``SonarLLMConfig`` cfg) over documents of these lengths."""
    d, e, f, layers = cfg.model_dim, cfg.sonar_dim, cfg.ffn_dim, cfg.num_layers
    a = cfg.num_heads * cfg.head_dim
    tokens = sum(doc_lengths)
    pairs = sum(_pairs(n, dense_attention) for n in doc_lengths)
    input_proj = 2 * tokens * e * d
    body = tokens * (layers * (2 * d * 3 * a + 2 * a * d + 3 * 2 * d * f) + 2 * d * e)
    attention = layers * 2 * 2 * a * pairs
    forward = input_proj + body + attention
    return Flops(forward, input_proj + 2 * body + 2 * attention)


def decoder_flops(dcfg, target_lengths: Sequence[int], *, dense_attention: bool = False) -> Flops:
    """FLOPs of the frozen SONAR decoder (``SonarTextConfig`` dcfg) and the output logits over
    target sentences of these decoder-input lengths, gradient to the embeddings only."""
    d, f, v, layers = dcfg.model_dim, dcfg.ffn_dim, dcfg.vocab_size, dcfg.num_layers
    n, tokens = len(target_lengths), sum(target_lengths)
    pairs = sum(_pairs(length, dense_attention) for length in target_lengths)
    self_proj = tokens * 4 * 2 * d * d  # per layer
    self_attn = 2 * 2 * d * pairs  # per layer
    cross = n * 2 * 2 * d * d  # per layer
    ffn = tokens * 2 * 2 * d * f  # per layer
    logits = tokens * 2 * d * v
    forward = layers * (self_proj + self_attn + cross + ffn) + logits
    backward = layers * (cross + ffn) + (layers - 1) * (self_proj + 2 * self_attn) + logits
    return Flops(forward, backward)


def training_step_flops(cfg, doc_lengths: Sequence[int], dcfg, target_lengths: Sequence[int]) -> Flops:
    """Concept transformer (trainable) + frozen decoder and logits: one step's model FLOPs."""
    return concept_flops(cfg, doc_lengths) + decoder_flops(dcfg, target_lengths)
