"""One training step's forward and loss under torch.compile: the concept transformer (packed and
padded documents) followed by the SONAR token loss (or the MSE loss) traces as one graph,
gives eager mode's loss and gradients, and batches of other shapes reuse the compiled graph.

The "aot_eager" backend runs Dynamo and AOTAutograd (the graph capture, the custom ops' shape
functions and backward) in seconds; inductor's code generation is checked once, marked slow."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from sonarllm.config import SonarLLMConfig
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.model import SonarLLM
from sonarllm.mse_loss import NextSentenceMSELoss
from sonarllm.normalizer import SonarNormalizer
from sonarllm.sonar.decoder import SonarDecoder
from tests._cases import needs_triton
from tests._numerics import assert_parity
from training.compile import compiled


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _parts(impl="torch", normalizer=False, checkpointing=False):
    torch.manual_seed(0)
    model = SonarLLM(SonarLLMConfig.from_name("toy", kernel_impl=impl, use_normalizer=normalizer))
    if normalizer:
        model.set_normalizer(SonarNormalizer(64).fit(torch.randn(200, 64) * 0.3 + 0.1))
    model.gradient_checkpointing = checkpointing
    decoder = SonarDecoder("toy", kernel_impl=impl)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.train(), SonarTokenLoss(decoder, kernel_impl=impl)


def _packed_batch(doc_lengths, seed):
    """Packed documents (embeddings [T, 64], cu_seqlens, longest), the positions that predict a
    next sentence, and those sentences' targets (3 to 9 tokens)."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(doc_lengths), 0)
    embeds = torch.randn(int(cu[-1]), 64, generator=g) * 0.3
    pred = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1]) - 1) for i in range(len(doc_lengths))])
    seqs = [[3, 5] + torch.randint(10, 200, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() + [3]
            for _ in range(pred.numel())]  # fmt: skip
    return embeds, cu, max(doc_lengths), pred, SonarTargets.from_target_sequences(seqs, 3)


def _sonar_step(model, loss_fn):
    def step(embeds, cu, max_len, pred, targets, num_items):
        pred_NE = model(embeds, cu_seqlens=cu, max_seqlen=max_len)[pred]
        return loss_fn(pred_NE, targets, num_items=num_items)

    return step


def _mse_step(model):
    mse = NextSentenceMSELoss.for_model(model)

    def step(embeds_BSE, mask_BS, num_items):
        pred = model(embeds_BSE)
        return mse(pred[:, :-1], embeds_BSE[:, 1:], mask=mask_BS[:, 1:], num_items=num_items)

    return step


def _padded_batch(n_docs, n_sents, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n_sents)[None, :] < torch.randint(2, n_sents + 1, (n_docs,), generator=g)[:, None]
    return torch.randn(n_docs, n_sents, 64, generator=g) * 0.3, mask, int(mask[:, 1:].sum())


def _loss_and_grads(step, model, args):
    model.zero_grad(set_to_none=True)
    loss = step(*args)
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


def _assert_same(compiled_out, eager_out, what):
    for i, (c, e) in enumerate(zip(compiled_out, eager_out, strict=True)):
        assert_parity(c, e, e, torch.float32, f"{what}: {'loss' if i == 0 else f'gradient {i}'}", grad=i > 0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_step_traces_as_one_graph(checkpointing):
    """Packed documents -> SONAR token loss, and padded documents -> MSE loss (normalizer on)."""
    model, loss_fn = _parts(normalizer=True, checkpointing=checkpointing)
    explained = torch._dynamo.explain(_sonar_step(model, loss_fn))(*_packed_batch([4, 6, 3], seed=0), 40)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    explained = torch._dynamo.explain(_mse_step(model))(*_padded_batch(3, 5, seed=0))
    assert explained.graph_break_count == 0, explained.break_reasons


@needs_triton
def test_training_step_traces_as_one_graph_on_the_triton_paths():
    model, loss_fn = _parts(impl="triton", normalizer=True)
    explained = torch._dynamo.explain(_sonar_step(model, loss_fn))(*_packed_batch([3, 2], seed=0), 5)
    assert explained.graph_break_count == 0, explained.break_reasons


def _three_steps_match_eager(backend):
    """Three steps of different shapes (documents, sentences, token counts, num_items): the
    compiled step equals the eager one and compiles only for the first."""
    model, loss_fn = _parts(normalizer=True)
    counter = CompileCounterWithBackend(backend)
    step = _sonar_step(model, loss_fn)
    fast = compiled(step, backend=counter, fallback=False)
    compilations = []
    for i, docs in enumerate(([4, 6, 3], [5, 2, 7, 3], [2, 8])):
        batch = (*_packed_batch(docs, seed=i), 37 + 11 * i)
        got = _loss_and_grads(fast, model, batch)
        compilations.append(counter.frame_count)
        _assert_same(got, _loss_and_grads(step, model, batch), f"step {i} ({backend})")
    assert compilations == [1, 1, 1], f"compilations after each step: {compilations}"


def test_compiled_step_matches_eager_without_recompiling():
    _three_steps_match_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager_without_recompiling():
    _three_steps_match_eager("inductor")


def test_compiled_padded_step_matches_eager_without_recompiling():
    model, _ = _parts(normalizer=True)
    counter = CompileCounterWithBackend("aot_eager")
    step = _mse_step(model)
    fast = compiled(step, backend=counter, fallback=False)
    for i, (docs, sents) in enumerate(((3, 5), (4, 7), (2, 9))):
        batch = _padded_batch(docs, sents, seed=i)
        _assert_same(_loss_and_grads(fast, model, batch), _loss_and_grads(step, model, batch), f"padded step {i}")
    assert counter.frame_count == 1
