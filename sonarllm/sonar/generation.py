"""Decoding sentence embeddings to text: beam search (and greedy, beam 1) with a KV cache,
reproducing fairseq2 0.8.1's ``BeamSearchSeq2SeqGenerator`` as SONAR's
``EmbeddingToTextModelPipeline`` runs it (tests/fixtures/README.md §5 is the specification):

* scores are cumulative ``log_softmax(logits / temperature)``, the prompt's own tokens included
  (SONAR's prompt is ``[</s>, __lang__]``, so log p(lang | </s>) is part of every score);
* per step: ``unk_penalty`` is subtracted from <unk>, <pad> is never chosen, </s> is blocked
  before ``min_gen_len``, and at the last allowed position only </s> may follow;
* the best ``2 * beam`` continuations are ranked; </s> among the first ``beam`` of them finishes
  a hypothesis (score divided by ``(length - 1) ** len_penalty`` when ``normalize_scores``), and a
  sentence stops as soon as ``beam`` hypotheses have finished; the first ``beam`` others go on;
* the length limit is ``min(max_seq_len or the decoder's, prompt + int(a * D + b))`` for
  ``max_gen_len = (a, b)``, where D is the embedding width (fairseq2 takes the width of the
  one-vector "source" as its length: 1024 + 128 for SONAR, so the decoder's 512 positions bind).

Shape legend: N = sentences, D = embedding width, B = live hypotheses, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonarllm.sonar.decoder import SonarDecoder


@dataclass(frozen=True)
class BeamSearchOptions:
    """fairseq2's generator options, with its defaults (those of SONAR's pipeline)."""

    beam_size: int = 5
    min_gen_len: int = 1
    max_gen_len: tuple[float, int] = (1.0, 128)
    max_seq_len: int | None = None
    echo_prompt: bool = False
    normalize_scores: bool = True
    temperature: float = 1.0
    unk_penalty: float = 0.0
    len_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"beam_size must be an int >= 1, got {self.beam_size!r}")
        if self.min_gen_len < 1:
            raise ValueError(f"min_gen_len must be >= 1, got {self.min_gen_len}")
        if len(self.max_gen_len) != 2:
            raise ValueError(f"max_gen_len must be a pair (a, b), got {self.max_gen_len!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be None or >= 2, got {self.max_seq_len}")


@dataclass
class Hypothesis:
    """A finished output: token ids (prompt excluded unless echo_prompt, </s> included), its
    score, and the per-token scores (the first entry cumulative, as fairseq2 reports them)."""

    seq: list[int]
    score: float
    step_scores: list[float]


@torch.inference_mode()
def beam_search(
    decoder: SonarDecoder,
    emb_ND: torch.Tensor,
    prompt: list[int],
    *,
    eos_idx: int = 3,
    unk_idx: int = 1,
    pad_idx: int = 0,
    options: BeamSearchOptions | None = None,
) -> list[list[Hypothesis]]:
    """Beam search from each sentence embedding; returns ``beam_size`` hypotheses per sentence,
    best first. ``prompt`` is the forced prefix (SONAR: ``[</s>, lang]``).

    All sentences advance together as one batch laid out ``[A, W]`` (A sentences still searching,
    W = 1 hypothesis after the prompt, then ``beam_size``); ranking, finishing and reordering are
    batched tensor operations, and Python only sees the hypotheses that finish. Per step the
    ranking reads the log-probabilities once: each hypothesis' best ``2 * beam`` tokens
    (``topk`` per row), then the sentence's best ``2 * beam`` of those ``W * 2 * beam`` — the
    same candidates, in the same order, as a ``topk`` over all ``W * V`` scores, without
    materialising the ``[B, V]`` scores ``log_probs + cumulative``."""
    opts = options or BeamSearchOptions()
    n, width = emb_ND.shape
    prompt_len = len(prompt)
    eff = min(opts.max_seq_len or decoder.config.max_seq_len, decoder.config.max_seq_len)
    if prompt_len >= eff:
        raise ValueError(f"the prompt ({prompt_len} tokens) must be shorter than the max sequence length {eff}")
    beam = opts.beam_size
    vocab = decoder.config.vocab_size
    if beam >= vocab:
        raise ValueError(f"beam_size must be smaller than the vocabulary ({vocab} tokens), got {beam}")
    a, b = opts.max_gen_len
    max_len = min(eff, prompt_len + int(a * width + b))
    min_len = min(eff, prompt_len + opts.min_gen_len)
    device = emb_ND.device

    # --- prefill: every sentence starts with one hypothesis, the prompt
    state = decoder.start(emb_ND, max_len, max_rows=n * beam)
    prompt_t = torch.tensor(prompt, device=device)
    cum_BS = torch.zeros(n, prompt_len, dtype=torch.float32, device=device)  # cumulative scores
    lp_BV = None
    for t in range(prompt_len):
        if t > 0:
            cum_BS[:, t] = cum_BS[:, t - 1] + lp_BV[:, prompt[t]]
        lp_BV = _log_probs(decoder.step(prompt_t[t].expand(n), state), opts.temperature)
    tokens_BS = prompt_t.expand(n, prompt_len).clone()  # token history of the live hypotheses
    active = list(range(n))  # sentence of each row of the [A, W] layout
    live = 1  # W: hypotheses per active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    k = min(2 * beam, vocab)  # candidates per hypothesis

    for s in range(prompt_len, max_len):
        if s == max_len - 1:  # only </s> may follow: every live hypothesis ends here
            _finish_all(lp_BV[:, eos_idx] + cum_BS[:, -1], tokens_BS, cum_BS, active, live, finished, eos_idx, s, prompt_len, opts)
            break
        if opts.unk_penalty:
            lp_BV[:, unk_idx] -= opts.unk_penalty
        lp_BV[:, pad_idx] = float("-inf")
        if s < min_len - 1:
            lp_BV[:, eos_idx] = float("-inf")
        top_BK, tok_BK = lp_BV.topk(k, dim=1)
        cand_AC = (top_BK + cum_BS[:, -1:]).view(len(active), live * k)
        score_AR, pick_AR = cand_AC.topk(min(2 * beam, live * k), dim=1)  # R ranks, best first
        row_AR = torch.arange(len(active), device=device)[:, None] * live + pick_AR // k
        tok_AR = tok_BK.view(len(active), live * k).gather(1, pick_AR)
        eos_AR = tok_AR == eos_idx

        # </s> among the first `beam` ranks finishes a hypothesis (in rank order, until the
        # sentence has `beam`); a sentence with `beam` finished stops searching.
        done = _finish_ranked(eos_AR[:, :beam], score_AR, row_AR, tokens_BS, cum_BS, active, finished, eos_idx, s, prompt_len, opts)
        # The first `beam` other candidates go on (there are at least `beam` of them: each
        # hypothesis contributes at most one </s> among its sentence's candidates).
        cont_AR = ~eos_AR & (torch.cumsum(~eos_AR, dim=1) <= beam)
        keep_A = [i for i in range(len(active)) if not done[i]]
        if not keep_A:
            break
        cont_AR, row_AR, tok_AR, score_AR = (x[keep_A] if len(keep_A) < len(active) else x for x in (cont_AR, row_AR, tok_AR, score_AR))
        active = [active[i] for i in keep_A]
        index_B, new_tok_B, new_score_B = row_AR[cont_AR], tok_AR[cont_AR], score_AR[cont_AR]
        if index_B.numel() != len(active) * beam:
            raise RuntimeError(f"beam search kept {index_B.numel()} hypotheses for {len(active)} sentences x {beam}")
        live = beam
        tokens_BS = torch.cat([tokens_BS.index_select(0, index_B), new_tok_B[:, None]], dim=1)
        cum_BS = torch.cat([cum_BS.index_select(0, index_B), new_score_B[:, None]], dim=1)
        state.reorder(index_B)
        lp_BV = _log_probs(decoder.step(new_tok_B, state), opts.temperature)

    return [sorted(f, key=lambda h: -h.score) for f in finished]


def _log_probs(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)``; the division is skipped at temperature 1 (exact:
    x / 1 == x) and otherwise done in place on the step's own logits."""
    if temperature != 1.0:
        logits_BV.div_(temperature)
    return torch.log_softmax(logits_BV, dim=-1)


def _finish_ranked(eos_AR, score_AR, row_AR, tokens_BS, cum_BS, active, finished, eos, s, prompt_len, opts) -> list[bool]:
    """Record the hypotheses that end with </s> at position s (``eos_AR``: the ranks that are
    </s>, best first per sentence) until a sentence has ``beam_size`` finished; returns, per
    active sentence, whether it has."""
    beam = opts.beam_size
    done = [len(finished[sent]) >= beam for sent in active]
    if not bool(eos_AR.any()):
        return done
    hits = eos_AR.nonzero()[:, 0].tolist()  # sentence of each hit; row-major: rank order per sentence
    ranks = eos_AR.shape[1]
    rows = row_AR[:, :ranks][eos_AR]
    scores = score_AR[:, :ranks][eos_AR].tolist()
    histories, cums = tokens_BS[rows].tolist(), cum_BS[rows].tolist()
    for i, history, cum, score in zip(hits, histories, cums, scores, strict=True):
        sent = active[i]
        if len(finished[sent]) < beam:
            finished[sent].append(_make_hypothesis(history, cum, eos, score, s, prompt_len, opts))
            done[i] = len(finished[sent]) >= beam
    return done


def _finish_all(score_B, tokens_BS, cum_BS, active, live, finished, eos, s, prompt_len, opts) -> None:
    """The last allowed position: each sentence's live hypotheses end with </s>, best first,
    until it has ``beam_size`` finished."""
    score_AW = score_B.view(len(active), live)
    order_AW = score_AW.argsort(dim=1, descending=True, stable=True)
    rows = (torch.arange(len(active), device=score_B.device)[:, None] * live + order_AW).flatten()
    scores, histories, cums = score_B[rows].tolist(), tokens_BS[rows].tolist(), cum_BS[rows].tolist()
    for j, (history, cum, score) in enumerate(zip(histories, cums, scores, strict=True)):
        sent = active[j // live]
        if len(finished[sent]) < opts.beam_size:
            finished[sent].append(_make_hypothesis(history, cum, eos, score, s, prompt_len, opts))


def _make_hypothesis(history: list[int], cum_hist: list[float], eos: int, score: float, s: int, prompt_len: int,
                     opts: BeamSearchOptions) -> Hypothesis:  # fmt: skip
    """A finished hypothesis whose </s> sits at position s with cumulative score ``score``
    (``history`` / ``cum_hist``: its tokens and cumulative scores before the </s>)."""
    seq = history + [eos]
    cums = cum_hist + [score]
    start = 0 if opts.echo_prompt else prompt_len
    span = cums[start:]
    steps = [span[0]] + [span[i] - span[i - 1] for i in range(1, len(span))]
    final = score / (s**opts.len_penalty) if opts.normalize_scores else score
    return Hypothesis(seq[start:], final, steps)
