"""SonarTokenLoss: packed + closed-form + fused == padded + full cross-attention + materialised
logits, for both label conventions; gradients reach the predicted embeddings only."""

import pytest
import torch
import torch.nn.functional as F

from sonarllm.loss import SonarTargets, SonarTokenLoss
from tests.sonarllm.sonar_fixtures import decoder, tokenizer

TEXTS = ["The cat sat on the mat.", "Il fait beau aujourd'hui.", "Hello!"]


def _materialised_loss(dec, pred, seqs, duplicate_eos):
    """The reference code's way: right-padded inputs, full attention, logits, CE(ignore pad)."""
    inputs = [s if duplicate_eos else s[:-1] for s in seqs]
    labels = [s[1:] + [3] if duplicate_eos else s[1:] for s in seqs]
    width = max(map(len, inputs))
    tok = torch.tensor([x + [0] * (width - len(x)) for x in inputs])
    lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    logits = dec.logits(dec.hidden_states_padded(pred, tok))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("duplicate_eos", [True, False], ids=["paper-labels", "clean-labels"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_fused_loss_equals_materialised_loss(duplicate_eos, impl):
    dec, tok = decoder(), tokenizer()
    seqs = tok.encode(TEXTS, lang="eng_Latn", mode="target")
    pred1 = (torch.randn(3, 64) * 0.5).requires_grad_(True)
    pred2 = pred1.detach().clone().requires_grad_(True)
    loss_fn = SonarTokenLoss(dec, tok, duplicate_eos=duplicate_eos, kernel_impl=impl)
    got = loss_fn(pred1, TEXTS, lang="eng_Latn")
    want = _materialised_loss(dec, pred2, seqs, duplicate_eos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(pred1.grad, pred2.grad, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in dec.parameters()), "the frozen decoder must get no gradient"


def test_the_loss_freezes_a_decoder_handed_over_trainable():
    dec, tok = decoder(), tokenizer()
    dec.requires_grad_(True)
    pred = torch.randn(3, 64, requires_grad=True)
    SonarTokenLoss(dec, tok, kernel_impl="torch")(pred, TEXTS).backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) > 0
    assert all(p.grad is None and not p.requires_grad for p in dec.parameters())


def test_token_sequences_texts_and_prepared_targets_agree():
    dec, tok = decoder(), tokenizer()
    loss_fn = SonarTokenLoss(dec, tok, kernel_impl="torch")
    pred = torch.randn(3, 64)
    seqs = tok.encode(TEXTS, lang="fra_Latn", mode="target")
    prepared = SonarTargets.from_target_sequences(seqs, tok.eos_idx)
    a = loss_fn(pred, TEXTS, lang="fra_Latn")
    b = loss_fn(pred, seqs)
    c = loss_fn(pred, prepared)
    assert a.item() == b.item() == c.item()
    assert prepared.num_tokens == sum(len(s) for s in seqs)  # one label per input token, paper convention


def test_num_items_divides_the_sum():
    dec, tok = decoder(), tokenizer()
    loss_fn = SonarTokenLoss(dec, tok, kernel_impl="torch")
    pred = torch.randn(3, 64)
    targets = SonarTargets.from_texts(TEXTS, tok)
    mean = loss_fn(pred, targets)
    scaled = loss_fn(pred, targets, num_items=10 * targets.num_tokens)
    torch.testing.assert_close(scaled * 10, mean)


def test_long_text_target_is_cut_to_the_decoder_length():
    dec, tok = decoder(), tokenizer()
    targets = SonarTokenLoss(dec, tok, kernel_impl="torch").targets(["word " * 200])
    assert targets.inputs.max_seqlen == dec.config.max_seq_len
    assert targets.labels[-1].item() == tok.eos_idx


def test_bad_inputs_raise():
    dec, tok = decoder(), tokenizer()
    loss_fn = SonarTokenLoss(dec, tok, kernel_impl="torch")
    with pytest.raises(ValueError, match=r"sentence embeddings must have shape \[N, 64\]"):
        loss_fn(torch.randn(3, 32), TEXTS)
    with pytest.raises(ValueError, match="must not be empty"):
        loss_fn(torch.randn(0, 64), [])
    with pytest.raises(ValueError, match="must be a target-mode sequence"):
        loss_fn(torch.randn(1, 64), [[301, 5, 6, 3]])
    with pytest.raises(ValueError, match="unknown language code"):
        loss_fn(torch.randn(3, 64), TEXTS, lang="xx_Latn")
    with pytest.raises(ValueError, match="need a tokenizer"):
        SonarTokenLoss(dec)(torch.randn(3, 64), TEXTS)
    with pytest.raises(TypeError, match="must be a sonarllm SonarDecoder"):
        SonarTokenLoss(torch.nn.Linear(2, 2))
