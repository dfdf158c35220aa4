"""The beam search of sonarllm/sonar/generation.py before issue 28, kept verbatim (token
history, scores and the per-sentence Python loop) as the reference the optimised search must
reproduce token for token (tests/sonarllm/test_sonar_beam_parity.py). It drives the decoder
through the public ``start`` / ``step`` / ``DecoderState.reorder`` interface only."""

from __future__ import annotations

import torch

from sonarllm.sonar.decoder import SonarDecoder
from sonarllm.sonar.generation import BeamSearchOptions, Hypothesis

@torch.inference_mode()
def reference_beam_search(
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
