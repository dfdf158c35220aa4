"""The batched beam search (issue 28) against the previous implementation, kept verbatim in
beam_search_reference.py, on random tiny decoders: same hypotheses token for token, same scores
and per-step scores, for every option fairseq2's generator has; and the KV cache's reorder."""

import pytest
import torch

from sonarllm.sonar import SonarDecoder, SonarTextConfig
from sonarllm.sonar.generation import BeamSearchOptions, beam_search
from tests.sonarllm.beam_search_reference import reference_beam_search


def _random_decoder(vocab: int, seed: int, scale: float = 0.5, *, ffn_dim: int = 64, max_seq_len: int = 40) -> SonarDecoder:
    """A tiny decoder with weights large enough that </s> wins at varied steps."""
    torch.manual_seed(seed)
    cfg = SonarTextConfig(model_dim=32, num_layers=2, num_heads=4, ffn_dim=ffn_dim, vocab_size=vocab, max_seq_len=max_seq_len)
    dec = SonarDecoder(cfg, kernel_impl="torch")
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, scale if p.dim() >= 2 else 0.1)
    return dec


CASES = {
    "beam1": dict(beam_size=1, max_gen_len=(0, 20)),
    "beam2": dict(beam_size=2, max_gen_len=(0, 20)),
    "beam5": dict(beam_size=5, max_gen_len=(0, 20)),
    "beam4_unk_len_penalty": dict(beam_size=4, max_gen_len=(0, 16), unk_penalty=0.7, len_penalty=0.6),
    "beam3_nonorm_mingen_temp": dict(beam_size=3, max_gen_len=(0, 16), normalize_scores=False, min_gen_len=5, temperature=0.7),
    "beam3_echo_maxseqlen": dict(beam_size=3, max_gen_len=(0.5, 4), echo_prompt=True, max_seq_len=12),
    "beam5_decoder_limit": dict(beam_size=5),  # (1, 128): the decoder's 40 positions bind
}


def _assert_same(got, want):
    assert len(got) == len(want)
    for row, (g_hyps, w_hyps) in enumerate(zip(got, want, strict=True)):
        assert [h.seq for h in g_hyps] == [h.seq for h in w_hyps], row
        assert [h.score for h in g_hyps] == [h.score for h in w_hyps], row
        assert [h.step_scores for h in g_hyps] == [h.step_scores for h in w_hyps], row


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("vocab", [13, 97])
def test_batched_beam_search_reproduces_the_previous_implementation(case, vocab):
    dec = _random_decoder(vocab, seed=vocab)
    emb = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    opts = BeamSearchOptions(**CASES[case])
    want = reference_beam_search(dec, emb, [3, 9], options=opts)
    got = beam_search(dec, emb, [3, 9], options=opts)
    _assert_same(got, want)
    lengths = {len(h.seq) for row in got for h in row}
    assert len(lengths) > 1 or opts.beam_size == 1, "the case should finish hypotheses at different steps"


@pytest.mark.parametrize("n", [1, 2, 33])
def test_batched_beam_search_at_several_batch_sizes(n):
    dec = _random_decoder(211, seed=5, scale=0.3)
    emb = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
    opts = BeamSearchOptions(beam_size=5, max_gen_len=(0, 12))
    _assert_same(beam_search(dec, emb, [3, 9], options=opts), reference_beam_search(dec, emb, [3, 9], options=opts))


def test_beam_size_must_be_below_the_vocabulary():
    dec = _random_decoder(13, seed=0)
    with pytest.raises(ValueError, match="beam_size must be smaller than the vocabulary"):
        beam_search(dec, torch.zeros(1, 32), [3, 9], options=BeamSearchOptions(beam_size=13))


def test_kv_cache_reorder_reuses_two_buffers_and_keeps_the_surviving_rows():
    dec = _random_decoder(97, seed=2)
    emb = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    state = dec.start(emb, 10, max_rows=6)
    tokens = torch.tensor([3, 4, 5])
    for _ in range(3):
        dec.step(tokens, state)
    before = [tuple(t.clone() for t in state.layer_cache(i)) for i in range(2)]
    pointers = set()
    index = torch.tensor([2, 0, 0, 1, 2, 1])  # grow to 6 hypotheses, as beam search does
    for _ in range(3):
        state.reorder(index)
        pointers.add(state.layer_cache(0)[0].data_ptr())
        index = torch.tensor([5, 4, 3, 2, 1, 0])
    assert len(pointers) == 2  # ping-pong between the two preallocated buffers, no new memory
    order = torch.tensor([2, 0, 0, 1, 2, 1])  # the three reorders composed
    for i in range(2):
        k_SBHK, v_SBHK = state.layer_cache(i)
        assert k_SBHK.shape[:2] == (4, 6)
        torch.testing.assert_close(k_SBHK[:3], before[i][0][:3, order], rtol=0, atol=0)
        torch.testing.assert_close(v_SBHK[:3], before[i][1][:3, order], rtol=0, atol=0)
    # decoding on after the reorder equals decoding the reordered hypotheses from scratch
    fresh = dec.start(emb[order], 10)
    for _ in range(3):
        dec.step(tokens[order], fresh)
    torch.testing.assert_close(dec.step(tokens[order], state), dec.step(tokens[order], fresh), rtol=1e-5, atol=1e-5)
