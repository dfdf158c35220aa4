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


def test_a_truncated_target_is_refused_by_default_naming_the_fix():
    """LCM's truncate_sequence cuts [</s>, lang, t1..tn, </s>] to max_subword_length tokens."""
    dec, tok = decoder(), tokenizer()
    seqs = [s[:5] for s in tok.encode(TEXTS[:2], lang="eng_Latn", mode="target")]
    assert all(s[-1] != tok.eos_idx for s in seqs)
    with pytest.raises(ValueError, match=r"target sentence 0 does not end with </s>\(3\).*allow_truncated=True"):
        SonarTokenLoss(dec, tok, kernel_impl="torch")(torch.randn(2, 64), seqs)


@pytest.mark.parametrize("duplicate_eos", [True, False])
def test_allow_truncated_labels_only_the_tokens_the_sentence_shows(duplicate_eos):
    dec, tok = decoder(), tokenizer()
    full = tok.encode(TEXTS, lang="eng_Latn", mode="target")
    seqs = [full[0][:5], full[1], full[2][:4]]  # two cut (LCM), one whole
    targets = SonarTargets.from_target_sequences(seqs, tok.eos_idx, duplicate_eos=duplicate_eos, allow_truncated=True)
    whole = full[1] + [3] if duplicate_eos else full[1]
    assert targets.labels.tolist() == full[0][1:5] + whole[1:] + full[2][1:4]  # no invented </s>
    pred1 = (torch.randn(3, 64) * 0.5).requires_grad_(True)
    pred2 = pred1.detach().clone().requires_grad_(True)
    got = SonarTokenLoss(dec, tok, duplicate_eos=duplicate_eos, allow_truncated=True, kernel_impl="torch")(pred1, seqs)
    # reference: padded inputs/labels written out by hand, materialised logits
    inputs = [full[0][:4], full[1] if duplicate_eos else full[1][:-1], full[2][:3]]
    labels = [full[0][1:5], whole[1:], full[2][1:4]]
    width = max(map(len, inputs))
    tok_BT = torch.tensor([x + [0] * (width - len(x)) for x in inputs])
    lab_BT = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    logits = dec.logits(dec.hidden_states_padded(pred2, tok_BT))
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab_BT.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(pred1.grad, pred2.grad, atol=1e-6, rtol=1e-4)


def test_sonar_plus_mse_is_the_weighted_sum_of_its_two_parts_with_their_gradients():
    from sonarllm.loss import SonarMSELoss
    from sonarllm.mse_loss import NextSentenceMSELoss

    dec, tok = decoder(), tokenizer()
    token_loss = SonarTokenLoss(dec, tok, kernel_impl="torch")
    scale = torch.rand(64) + 0.5
    mse_loss = NextSentenceMSELoss(scale=scale)
    combined = SonarMSELoss(token_loss, mse_loss, mse_weight=0.25)
    target_NE = torch.randn(3, 64)
    targets = SonarTargets.from_texts(TEXTS, tok)
    pred = (torch.randn(3, 64) * 0.5).requires_grad_(True)
    got = combined(pred, targets, target_NE, num_tokens=40, num_sentences=5)
    (g_got,) = torch.autograd.grad(got, pred)
    # the two parts, computed separately (the MSE written out: sum over channels / num_sentences)
    p1 = pred.detach().clone().requires_grad_(True)
    ce = token_loss(p1, targets, num_items=40)
    (g_ce,) = torch.autograd.grad(ce, p1)
    p2 = pred.detach().clone().requires_grad_(True)
    mse = (((p2 - target_NE) / scale) ** 2).sum() / 5
    (g_mse,) = torch.autograd.grad(mse, p2)
    torch.testing.assert_close(got, ce + 0.25 * mse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ce + 0.25 * g_mse, rtol=1e-5, atol=1e-7)
    ce_part, mse_part = combined.parts(pred, targets, target_NE, num_tokens=40, num_sentences=5)
    torch.testing.assert_close(mse_part, mse, rtol=1e-6, atol=1e-7)
    assert SonarMSELoss(token_loss, mse_loss, 0.0)(pred, targets, target_NE).item() == pytest.approx(token_loss(pred, targets).item())
    with pytest.raises(ValueError, match="mse_weight must be a finite number >= 0"):
        SonarMSELoss(token_loss, mse_loss, -1.0)
    with pytest.raises(TypeError, match="mse_loss must be a NextSentenceMSELoss with reduction 'mean'"):
        SonarMSELoss(token_loss, NextSentenceMSELoss("sum"), 1.0)
