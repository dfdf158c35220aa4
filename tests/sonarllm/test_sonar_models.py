"""Our SONAR decoder and encoder against fairseq2 (fixtures decoder.pt / encoder.pt), and the
equivalences the fast paths rely on: packed == padded, closed-form cross-attention == full
attention over the one key, incremental (KV cache) == teacher forcing."""

import dataclasses

import pytest
import torch

from sonarllm.sonar import PackedBatch
from tests.sonarllm.sonar_fixtures import (
    decoder,
    encoder,
    live_only,
    load,
    packed,
    reference,
    unpadded,
)


def _decoder_case():
    fx = load("decoder")
    return fx, packed(fx["tokens"], fx["seq_lens"])


def test_decoder_hidden_states_and_logits_match_fairseq2():
    fx, batch = _decoder_case()
    dec = decoder()
    h = dec.hidden_states(fx["embeddings"], batch)
    torch.testing.assert_close(h, torch.cat(unpadded(fx["hidden"], fx["seq_lens"])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.logits(h), torch.cat(unpadded(fx["logits"], fx["seq_lens"])), atol=1e-4, rtol=1e-5)


def test_decoder_packed_equals_padded_and_closed_form_equals_full_attention():
    fx, batch = _decoder_case()
    dec = decoder()
    closed = dec.hidden_states(fx["embeddings"], batch)
    full = dec.hidden_states(fx["embeddings"], batch, closed_form=False)
    padded = batch.unpad(dec.hidden_states_padded(fx["embeddings"], fx["tokens"]))
    torch.testing.assert_close(closed, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(closed, padded, atol=1e-5, rtol=1e-5)


def test_decoder_kv_cache_steps_equal_teacher_forcing():
    fx, batch = _decoder_case()
    dec = decoder()
    want = dec.logits(dec.hidden_states(fx["embeddings"], batch))
    n = len(fx["seq_lens"])
    state = dec.start(fx["embeddings"], max_len=12)
    steps = [dec.step(fx["tokens"][:, t], state) for t in range(12)]
    got = torch.stack(steps, dim=1)  # [N, 12, V]
    torch.testing.assert_close(torch.cat(unpadded(got, fx["seq_lens"])), want, atol=1e-4, rtol=1e-5)
    assert n == 5


def test_decoder_train_dropout_is_off_by_default_and_reproducible_when_on():
    fx, batch = _decoder_case()
    dec = decoder()
    dec.train()  # without train_dropout, train mode changes nothing
    torch.testing.assert_close(dec.hidden_states(fx["embeddings"], batch), decoder().hidden_states(fx["embeddings"], batch))
    from sonarllm.sonar import load_sonar_decoder
    from sonarllm.sonar.config import from_fairseq2_config

    cfg = dataclasses.replace(from_fairseq2_config(fx["config"], "decoder"), dropout_p=0.1)
    noisy = load_sonar_decoder(fx["state_dict"], config=cfg, train_dropout=True, kernel_impl="torch").train()
    torch.manual_seed(1)
    a = noisy.hidden_states(fx["embeddings"], batch)
    torch.manual_seed(1)
    b = noisy.hidden_states(fx["embeddings"], batch)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, dec.eval().hidden_states(fx["embeddings"], batch), atol=1e-3)
    noisy.eval()
    torch.testing.assert_close(noisy.hidden_states(fx["embeddings"], batch), dec.hidden_states(fx["embeddings"], batch))


def test_decoder_rejects_bad_inputs():
    fx, batch = _decoder_case()
    dec = decoder()
    with pytest.raises(ValueError, match=r"sentence embeddings must have shape \[N, 64\]"):
        dec.hidden_states(fx["embeddings"][:, :32], batch)
    with pytest.raises(ValueError, match="got 4 sentence embeddings for 5 target sentences"):
        dec.hidden_states(fx["embeddings"][:4], batch)
    too_long = PackedBatch.from_sequences([[3] * 65])
    with pytest.raises(ValueError, match="at most 64 tokens"):
        dec.hidden_states(fx["embeddings"][:1], too_long)


def test_encoder_matches_fairseq2():
    fx = load("encoder")
    enc = encoder()
    emb, states = enc(packed(fx["tokens"], fx["seq_lens"]))
    torch.testing.assert_close(emb, fx["sentence_embeddings"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states, torch.cat(unpadded(fx["encoded_seqs"], fx["seq_lens"])), atol=1e-5, rtol=1e-5)


def test_encoder_batching_does_not_change_embeddings():
    fx = load("encoder")
    enc = encoder()
    seqs = unpadded(fx["tokens"], fx["seq_lens"])
    one_batch = enc.encode_tokens(seqs)
    tiny_batches = enc.encode_tokens(seqs, max_tokens=30, progress=True)
    torch.testing.assert_close(one_batch, fx["sentence_embeddings"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_batches, one_batch, atol=1e-6, rtol=1e-6)


def test_encoder_rejects_bad_inputs():
    enc = encoder()
    with pytest.raises(ValueError, match="at least one sentence"):
        enc.encode_tokens([])
    with pytest.raises(ValueError, match="the encoder takes at most 66"):
        enc.encode_tokens([[5] * 67])


@live_only
def test_live_decoder_and_encoder_match_fairseq2_on_new_inputs():
    fx = load("decoder")
    ref = reference.build_decoder(fx["config"], fx["state_dict"])
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(3, 64, generator=g)
    tokens = torch.randint(4, 300, (3, 9), generator=g)
    tokens[:, 0] = 3
    lens = [9, 4, 6]
    _, logits = reference.decoder_forward(ref, emb, tokens, lens)
    dec = decoder()
    got = dec.logits(dec.hidden_states(emb, packed(tokens, lens)))
    torch.testing.assert_close(got, torch.cat(unpadded(logits, lens)), atol=1e-4, rtol=1e-5)
    fe = load("encoder")
    ref_enc = reference.build_encoder(fe["config"], fe["state_dict"])
    want, _ = reference.encoder_forward(ref_enc, tokens, lens)
    torch.testing.assert_close(encoder()(packed(tokens, lens))[0], want, atol=1e-5, rtol=1e-5)
