"""The SONAR-LLM objective: token cross-entropy of the next sentence, decoded by the frozen
SONAR decoder from the predicted sentence embedding.

    predicted embeddings [N, E] --frozen decoder, teacher-forced, packed--> token states [T, D]
        --sonarllm_kernels.fused_linear_cross_entropy with the tied output weight (frozen)--> loss

The decoder's weights get no gradient; the gradient reaches the predicted embeddings only
(through the decoder's activations). The loss is the mean over all label tokens of the batch
(the reference code's ``CrossEntropyLoss(ignore_index=pad)`` on padded batches: packed
batches have no padding), or the sum divided by ``num_items`` when that is given, so that
gradient-accumulation micro-batches and data-parallel ranks can divide by the global count.

Label convention (sonar-llm.md §2): the decoder input is SONAR's target-mode sequence
``[</s>, lang, t1..tn, </s>]`` and the labels are that sequence shifted left plus one more
``</s>``: ``[lang, t1..tn, </s>, </s>]`` (``duplicate_eos=True``, the paper's code). The clean
variant (``duplicate_eos=False``) drops the last input token: inputs ``[</s>, lang, t1..tn]``,
labels ``[lang, t1..tn, </s>]``.

Truncated targets (LCM's ``truncate_sequence`` cuts a target-mode sequence to
``max_subword_length`` tokens, dropping the final ``</s>``): refused by default, naming the
sentence. With ``allow_truncated=True`` a sequence ``[</s>, lang, t1..tk]`` (no final ``</s>``) is
taught only what it shows: inputs ``[</s>, lang, t1..t(k-1)]``, labels ``[lang, t1..tk]``. No
``</s>`` label is invented where the sentence went on (LCM's ``move_eos_to_the_end`` puts one
there, and its docstring calls that an error), and no label is guessed past ``tk``.

``SonarMSELoss`` adds the MSE-LCM's next-embedding regression to it, weighted: LCM's "decoder
backprop" idea (``model.objective = "sonar+mse"`` in the trainer).

Shape legend: N = sentences, E = SONAR embedding width, T = packed tokens, D = decoder width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sonarllm_kernels import fused_linear_cross_entropy
from sonarllm.mse_loss import NextSentenceMSELoss
from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.packing import PackedBatch
from sonarllm.sonar.tokenizer import SonarTokenizer


@dataclass(frozen=True)
class SonarTargets:
    """Teacher-forcing inputs (packed) and labels [T] of N target sentences."""

    inputs: PackedBatch
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def from_target_sequences(
        cls, seqs: Sequence[Sequence[int] | torch.Tensor], eos_idx: int, *, duplicate_eos: bool = True,
        allow_truncated: bool = False, device=None,
    ) -> SonarTargets:  # fmt: skip
        """Build from SONAR target-mode token sequences ``[</s>, lang, t1..tn, </s>]``; with
        ``allow_truncated``, also from sequences cut before their final ``</s>`` (module docstring)."""
        if len(seqs) == 0:
            raise ValueError("target sentences must not be empty (got an empty list)")
        inputs, labels = [], []
        for i, seq in enumerate(seqs):
            seq = [int(t) for t in seq]
            shown = f"{seq[:8]}{'...' if len(seq) > 8 else ''}"
            if len(seq) < 3 or seq[0] != eos_idx:
                raise ValueError(
                    f"target sentence {i} must be a target-mode sequence [</s>({eos_idx}), lang, ..., "
                    f"</s>({eos_idx})], got {shown}"
                )
            if seq[-1] != eos_idx:
                if not allow_truncated:
                    raise ValueError(
                        f"target sentence {i} does not end with </s>({eos_idx}) (length {len(seq)}, last token "
                        f"{seq[-1]}): a truncated target (e.g. LCM's max_subword_length cut)? Pass "
                        f"allow_truncated=True to train on it without a final </s> label, or truncate keeping </s>"
                    )
                inputs.append(seq[:-1])
                labels.extend(seq[1:])
                continue
            if duplicate_eos:
                inputs.append(seq)
                labels.extend(seq[1:] + [eos_idx])
            else:
                inputs.append(seq[:-1])
                labels.extend(seq[1:])
        batch = PackedBatch.from_sequences(inputs, device=device)
        return cls(batch, torch.tensor(labels, dtype=torch.int64, device=batch.tokens.device))

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], tokenizer: SonarTokenizer, lang: str | None = None, *,
        duplicate_eos: bool = True, max_len: int | None = None, device=None,
    ) -> SonarTargets:  # fmt: skip
        """Tokenize target sentences (target mode) and build the teacher-forcing pair.

        ``max_len`` (the decoder's max_seq_len) truncates a long sentence's pieces so that the
        decoder input fits, keeping the final </s>: decoding never sees more positions than
        the model has.
        """
        if len(texts) == 0:
            raise ValueError("target sentences must not be empty (got an empty list)")
        seqs = tokenizer.encode(list(texts), lang=lang, mode="target")
        if max_len is not None:
            limit = max_len if duplicate_eos else max_len + 1
            seqs = [s if len(s) <= limit else s[: limit - 1] + [tokenizer.eos_idx] for s in seqs]
        return cls.from_target_sequences(seqs, tokenizer.eos_idx, duplicate_eos=duplicate_eos, device=device)

    def to(self, device) -> SonarTargets:
        return SonarTargets(self.inputs.to(device), self.labels.to(device))


class SonarTokenLoss(nn.Module):
    """Token cross-entropy through the frozen SONAR decoder.

    Args:
        decoder: our ``SonarDecoder`` (``decoder_from_fairseq2(model)`` wraps a fairseq2 one).
        tokenizer: needed only to pass target sentences as text.
        duplicate_eos: label convention for text targets (see module docstring).
        allow_truncated: accept token sequences cut before their final ``</s>`` (LCM's
            ``max_subword_length``), labelled without it (module docstring); refused by default.
        kernel_impl: ``impl`` of the fused cross-entropy ("auto", "triton", "torch", "reference").

    ``forward(pred_NE, targets, lang=None, num_items=None)``: ``targets`` is a ``SonarTargets``,
    a list of target-mode token sequences, or a list of texts (with ``lang``). Returns the mean
    token loss (float32).
    """

    def __init__(self, decoder: SonarDecoder, tokenizer: SonarTokenizer | None = None, *,
                 duplicate_eos: bool = True, allow_truncated: bool = False, kernel_impl: str = "auto"):  # fmt: skip
        super().__init__()
        if not isinstance(decoder, SonarDecoder):
            raise TypeError(
                f"decoder must be a sonarllm SonarDecoder (use sonarllm.decoder_from_fairseq2 for a fairseq2 "
                f"model), got {type(decoder).__name__}"
            )
        self.decoder = decoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.duplicate_eos = duplicate_eos
        self.allow_truncated = allow_truncated
        self.kernel_impl = kernel_impl

    def targets(self, targets, lang: str | None = None, device=None) -> SonarTargets:
        """Normalise any accepted target form to SonarTargets on ``device``."""
        if isinstance(targets, SonarTargets):
            return targets.to(device)
        if isinstance(targets, str) or not isinstance(targets, Sequence | torch.Tensor):
            raise TypeError("targets must be SonarTargets, a list of token sequences or a list of texts")
        if len(targets) and isinstance(targets[0], str):
            if self.tokenizer is None:
                raise ValueError("text targets need a tokenizer: SonarTokenLoss(decoder, tokenizer)")
            return SonarTargets.from_texts(targets, self.tokenizer, lang, duplicate_eos=self.duplicate_eos,
                                           max_len=self.decoder.config.max_seq_len, device=device)  # fmt: skip
        eos = self.tokenizer.eos_idx if self.tokenizer is not None else 3
        return SonarTargets.from_target_sequences(targets, eos, duplicate_eos=self.duplicate_eos,
                                                  allow_truncated=self.allow_truncated, device=device)  # fmt: skip

    def forward(self, pred_NE: torch.Tensor, targets, lang: str | None = None,
                num_items: int | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        tgt = self.targets(targets, lang, device=pred_NE.device)
        h_TD = self.decoder.hidden_states(pred_NE, tgt.inputs)
        return fused_linear_cross_entropy(
            h_TD, self.decoder.output_weight, tgt.labels, num_items=num_items, impl=self.kernel_impl
        )


class SonarMSELoss(nn.Module):
    """The combined objective: token cross-entropy through the frozen decoder plus ``mse_weight``
    times the next-embedding MSE of the same predictions (LCM's decoder-backprop idea)::

        loss = token_loss(pred_NE, targets, num_items=num_tokens)
               + mse_weight * mse_loss(pred_NE, target_NE, num_items=num_sentences)

    Each term keeps its own normalisation: the cross-entropy is a mean over label tokens, the MSE
    a mean over predicted sentences of the squared error summed over the E channels (in the
    model's normalized space when it has a normalizer: ``NextSentenceMSELoss.for_model``). So
    ``mse_weight`` trades a per-token CE against a per-sentence squared distance; with the
    normalizer that distance is about E times a unit variance, without it about E x 0.006^2.

    Args:
        token_loss: the SONAR objective (``SonarTokenLoss``).
        mse_loss: the MSE objective (``NextSentenceMSELoss``, reduction "mean").
        mse_weight: finite weight >= 0 of the MSE term.
    """

    def __init__(self, token_loss: SonarTokenLoss, mse_loss: NextSentenceMSELoss, mse_weight: float):
        super().__init__()
        if not isinstance(token_loss, SonarTokenLoss):
            raise TypeError(f"token_loss must be a SonarTokenLoss, got {type(token_loss).__name__}")
        if not isinstance(mse_loss, NextSentenceMSELoss) or mse_loss.reduction != "mean":
            raise TypeError(f"mse_loss must be a NextSentenceMSELoss with reduction 'mean', got {mse_loss!r}")
        if isinstance(mse_weight, bool) or not isinstance(mse_weight, (int, float)) or not 0 <= mse_weight < float("inf"):
            raise ValueError(f"mse_weight must be a finite number >= 0, got {mse_weight!r}")
        self.token_loss, self.mse_loss, self.mse_weight = token_loss, mse_loss, float(mse_weight)

    def parts(self, pred_NE: torch.Tensor, targets, target_NE: torch.Tensor, *, lang: str | None = None,
              num_tokens: int | torch.Tensor | None = None,
              num_sentences: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The two terms, unweighted: (token cross-entropy, MSE)."""
        ce = self.token_loss(pred_NE, targets, lang, num_items=num_tokens)
        return ce, self.mse_loss(pred_NE, target_NE, num_items=num_sentences)

    def forward(self, pred_NE: torch.Tensor, targets, target_NE: torch.Tensor, *, lang: str | None = None,
                num_tokens: int | torch.Tensor | None = None,
                num_sentences: int | torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``pred_NE`` [N, E] predictions, ``targets`` their target sentences (as for
        ``SonarTokenLoss``), ``target_NE`` [N, E] the true next embeddings; ``num_tokens`` /
        ``num_sentences`` the global denominators of the two means (default: this batch's)."""
        ce, mse = self.parts(pred_NE, targets, target_NE, lang=lang, num_tokens=num_tokens, num_sentences=num_sentences)
        return ce + self.mse_weight * mse

    def extra_repr(self) -> str:
        return f"mse_weight={self.mse_weight:g}"
