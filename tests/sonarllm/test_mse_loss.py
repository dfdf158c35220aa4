"""The MSE-LCM objective (sonarllm.mse_loss) against hand computations.

Shape legend: B documents, S sentences, E SONAR dim, T packed positions.
"""

from __future__ import annotations

import pytest
import torch

from sonarllm.config import SonarLLMConfig
from sonarllm.model import SonarLLM
from sonarllm.mse_loss import NextSentenceMSELoss, next_sentence_mse
from sonarllm.normalizer import SonarNormalizer


def test_hand_computed_values():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 1.5]])
    # per vector: 1 + 4 = 5; 4 + 9 = 13; 0 + 1 = 1 (sum over channels, not mean)
    assert next_sentence_mse(pred, target, reduction="none").tolist() == [5.0, 13.0, 1.0]
    assert next_sentence_mse(pred, target).item() == pytest.approx(19 / 3)
    assert next_sentence_mse(pred, target, reduction="sum").item() == 19.0
    mask = torch.tensor([True, False, True])
    assert next_sentence_mse(pred, target, mask=mask).item() == 3.0
    assert next_sentence_mse(pred, target, mask=mask, reduction="none").tolist() == [5.0, 0.0, 1.0]
    assert next_sentence_mse(pred, target, mask=mask, num_items=4).item() == 1.5
    assert next_sentence_mse(pred, target, num_items=torch.tensor(19)).item() == 1.0
    # scale: the error is measured in normalized space, (d / s)^2
    scale = torch.tensor([0.5, 2.0])
    # (1/.5)^2 + (2/2)^2 = 5; (2/.5)^2 + (3/2)^2 = 18.25; 0 + (1/2)^2 = .25
    assert next_sentence_mse(pred, target, scale=scale, reduction="none").tolist() == [
        5.0,
        18.25,
        0.25,
    ]
    assert next_sentence_mse(pred, target, mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_scale_equals_distance_of_normalized_vectors():
    norm = SonarNormalizer(16).fit(torch.randn(200, 16) * 0.01 + 0.004)
    pred, target = torch.randn(5, 3, 16) * 0.01, torch.randn(5, 3, 16) * 0.01
    loss = NextSentenceMSELoss("none", scale=norm.scale)(pred, target)
    want = (norm.normalize(pred) - norm.normalize(target)).square().sum(-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_accumulation_with_num_items_equals_one_batch():
    pred = torch.randn(10, 8, requires_grad=True)
    target = torch.randn(10, 8)
    mask = torch.rand(10) > 0.3
    full = next_sentence_mse(pred, target, mask=mask)
    (g_full,) = torch.autograd.grad(full, pred)
    n = int(mask.sum())
    parts = [
        next_sentence_mse(pred[s], target[s], mask=mask[s], num_items=n)
        for s in (slice(0, 4), slice(4, 10))
    ]
    (g_acc,) = torch.autograd.grad(sum(parts), pred)
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(g_acc, g_full)


def test_low_precision_inputs_accumulate_in_float32():
    pred, target = torch.randn(4, 64), torch.randn(4, 64)
    loss = next_sentence_mse(pred.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, next_sentence_mse(pred.bfloat16().float(), target.bfloat16().float())
    )
    assert next_sentence_mse(pred.double(), target.double()).dtype == torch.float64


def test_shift_recipes_of_the_docstring_agree_on_padded_and_packed_batches():
    model = SonarLLM(SonarLLMConfig.from_name("toy", objective="mse"))
    lengths = [5, 2, 4]
    docs = [torch.randn(n, 64) for n in lengths]
    x_BSE = torch.zeros(3, 5, 64)
    valid_BS = torch.zeros(3, 5, dtype=torch.bool)
    for b, d in enumerate(docs):
        x_BSE[b, : len(d)], valid_BS[b, : len(d)] = d, True
    mse = NextSentenceMSELoss.for_model(model)
    padded = mse(model(x_BSE)[:, :-1], x_BSE[:, 1:], mask=valid_BS[:, 1:])

    x_TE = torch.cat(docs)
    cu = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    mask_T = torch.ones(x_TE.shape[0] - 1, dtype=torch.bool)
    mask_T[cu[1:-1].long() - 1] = False
    packed = mse(model(x_TE, cu_seqlens=cu)[:-1], x_TE[1:], mask=mask_T)
    # by hand: every (t -> t + 1) pair inside a document
    pairs = [(model(d[None])[0][:-1], d[1:]) for d in docs]
    want = sum((p - t).square().sum() for p, t in pairs) / sum(n - 1 for n in lengths)
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)


def test_for_model_uses_the_model_normalizer():
    plain = SonarLLM(SonarLLMConfig.from_name("toy"))
    assert NextSentenceMSELoss.for_model(plain).scale is None
    model = SonarLLM(SonarLLMConfig.from_name("toy", use_normalizer=True, objective="mse"))
    norm = SonarNormalizer(64).fit(torch.randn(100, 64) * 0.01)
    model.set_normalizer(norm)
    loss = NextSentenceMSELoss.for_model(model, reduction="sum")
    assert torch.equal(loss.scale, norm.scale) and loss.reduction == "sum"
    assert "scale" not in loss.state_dict()


def test_errors_name_the_argument():
    p = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"target must have pred's shape \(3, 4\)"):
        next_sentence_mse(p, torch.randn(3, 5))
    with pytest.raises(TypeError, match="pred must be a float tensor"):
        next_sentence_mse(torch.ones(3, 4, dtype=torch.int64), p)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        next_sentence_mse(p, p, mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask must have pred's leading shape \(3,\)"):
        next_sentence_mse(p, p, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scale must have shape \[E\] = \(4,\)"):
        next_sentence_mse(p, p, scale=torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        next_sentence_mse(p, p, reduction="avg")
    with pytest.raises(ValueError, match="num_items only applies to reduction='mean'"):
        next_sentence_mse(p, p, reduction="sum", num_items=3)
    with pytest.raises(ValueError, match="num_items must be >= 1"):
        next_sentence_mse(p, p, num_items=0)
    with pytest.raises(TypeError, match="num_items must be an int"):
        next_sentence_mse(p, p, num_items=2.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        NextSentenceMSELoss("mean_sq")
    with pytest.raises(ValueError, match="pred must have shape"):
        next_sentence_mse(torch.tensor(1.0), torch.tensor(1.0))
