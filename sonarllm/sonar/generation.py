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
    best first. ``prompt`` is the forced prefix (SONAR: ``[</s>, lang]``)."""
    opts = options or BeamSearchOptions()
    n, width = emb_ND.shape
    prompt_len = len(prompt)
    eff = min(opts.max_seq_len or decoder.config.max_seq_len, decoder.config.max_seq_len)
    if prompt_len >= eff:
        raise ValueError(f"the prompt ({prompt_len} tokens) must be shorter than the max sequence length {eff}")
    a, b = opts.max_gen_len
    max_len = min(eff, prompt_len + int(a * width + b))
    min_len = min(eff, prompt_len + opts.min_gen_len)
    device = emb_ND.device
    beam = opts.beam_size

    # --- prefill: every sentence starts with one hypothesis, the prompt
    state = decoder.start(emb_ND, max_len)
    prompt_t = torch.tensor(prompt, device=device)
    cum = torch.zeros(n, prompt_len, dtype=torch.float32, device=device)  # cumulative scores
    lp = None
    for t in range(prompt_len):
        if t > 0:
            cum[:, t] = cum[:, t - 1] + lp[:, prompt[t]]
        lp = torch.log_softmax(decoder.step(prompt_t[t].expand(n), state) / opts.temperature, dim=-1)
    tokens = prompt_t.expand(n, prompt_len).clone()  # [B, t] token history of live hypotheses
    row_of = list(range(n))  # sentence of each live hypothesis
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for s in range(prompt_len, max_len):
        vocab = lp.shape[1]
        if s == max_len - 1:
            forced = torch.full_like(lp, float("-inf"))
            forced[:, eos_idx] = lp[:, eos_idx]
            lp = forced
        else:
            lp[:, unk_idx] -= opts.unk_penalty
            lp[:, pad_idx] = float("-inf")
            if s < min_len - 1:
                lp[:, eos_idx] = float("-inf")
        cand = lp + cum[:, -1:]

        keep_rows: list[int] = []  # indices into the live hypotheses
        keep_tokens: list[int] = []
        keep_scores: list[float] = []
        for row in range(n):
            hyps = [i for i, r in enumerate(row_of) if r == row]
            if not hyps or len(finished[row]) >= beam:
                continue
            flat = cand[hyps].reshape(-1)
            top_scores, top_idx = torch.topk(flat, min(2 * beam, flat.numel()))
            continuing = 0
            for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist(), strict=True)):
                hyp, token = hyps[idx // vocab], idx % vocab
                if token == eos_idx:
                    if rank < beam:
                        finished[row].append(_finish(tokens[hyp], cum[hyp], token, score, s, prompt_len, opts))
                        if len(finished[row]) >= beam:
                            break
                elif continuing < beam:
                    keep_rows.append(hyp)
                    keep_tokens.append(token)
                    keep_scores.append(score)
                    continuing += 1
            if len(finished[row]) >= beam:
                drop = {i for i, r in enumerate(keep_rows) if row_of[r] == row}
                keep_rows = [r for i, r in enumerate(keep_rows) if i not in drop]
                keep_tokens = [t for i, t in enumerate(keep_tokens) if i not in drop]
                keep_scores = [c for i, c in enumerate(keep_scores) if i not in drop]
        if not keep_rows:
            break
        index = torch.tensor(keep_rows, device=device)
        new_tok = torch.tensor(keep_tokens, device=device)
        row_of = [row_of[r] for r in keep_rows]
        tokens = torch.cat([tokens[index], new_tok[:, None]], dim=1)
        cum = torch.cat([cum[index], torch.tensor(keep_scores, device=device)[:, None]], dim=1)
        state.reorder(index)
        lp = torch.log_softmax(decoder.step(new_tok, state) / opts.temperature, dim=-1)

    return [sorted(f, key=lambda h: -h.score) for f in finished]


def _finish(history, cum_hist, eos: int, score: float, s: int, prompt_len: int, opts: BeamSearchOptions) -> Hypothesis:
    """A finished hypothesis whose </s> sits at position s with cumulative score ``score``."""
    seq = history.tolist() + [eos]
    cums = cum_hist.tolist() + [score]
    start = 0 if opts.echo_prompt else prompt_len
    span = cums[start:]
    steps = [span[0]] + [span[i] - span[i - 1] for i in range(1, len(span))]
    final = score / (s**opts.len_penalty) if opts.normalize_scores else score
    return Hypothesis(seq[start:], final, steps)
