"""docs/integrations.md's snippets for the paper's official training code, run as written.

The code blocks marked ``<!-- snippet: NAME -->`` are read from the document and executed in a
stand-in of the official ``SonarLossWrapper`` (``train_sonarllm_fast.py``), written here from
its description (docs/sonar-llm.md §2): an HF Llama fed through ``inputs_embeds``, the
fairseq2-0.4-style SONAR pipeline (``sonar_decoder.model.decode`` / ``.project(...).logits`` /
``.final_proj.weight``, ``sonar_decoder.tokenizer.create_encoder`` and ``vocab_info.pad_idx``),
target-mode ids with the extra ``</s>`` label, pad 0, ``CrossEntropyLoss(ignore_index=pad)``.
Its decoder is the fairseq2 layout stand-in (tests/sonarllm/fairseq2_mimic.py) holding the
fixture decoder's weights. Both snippets must give the materialised-logits loss and gradients.
"""

from __future__ import annotations

import random
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sonarllm import decoder_from_fairseq2
from tests.sonarllm import fairseq2_mimic as fs2
from tests.sonarllm.official_checkpoints import official_llama_config, random_wrapper
from tests.sonarllm.sonar_fixtures import load

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
LANG_ID, EOS, PAD = 300, 3, 0
pytestmark = pytest.mark.usefixtures("one_thread")


def snippets() -> dict[str, str]:
    """The document's marked python code blocks, by name."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- snippet: (\w+) -->\s*```python\n(.*?)```", text, flags=re.DOTALL)
    return dict(found)


class _Tokenizer:
    """fairseq2 0.4's text tokenizer, as the official code uses it: target mode gives
    ``[</s>, lang, pieces..., </s>]``; pieces here are words hashed into the toy vocabulary."""

    vocab_info = types.SimpleNamespace(pad_idx=PAD, eos_idx=EOS)

    def create_encoder(self, task, lang, mode, device=None):
        assert (task, lang, mode) == ("translation", "eng_Latn", "target")

        def encode(text: str) -> torch.Tensor:
            pieces = [4 + sum(map(ord, w)) * 7919 % 290 for w in text.split()]
            return torch.tensor([EOS, LANG_ID, *pieces, EOS], device=device)

        return encode


def _fairseq2_pipeline(dtype: torch.dtype) -> nn.Module:
    """A sonar ``EmbeddingToTextModelPipeline`` stand-in: ``.model`` is a fairseq2-layout decoder
    (the fixture's weights) with 0.4's ``decode`` and ``project``; ``.tokenizer`` as above."""
    fx = load("decoder")
    model = fs2.build("decoder", fx["config"], fx["state_dict"]).to(dtype)
    ours = decoder_from_fairseq2(model)  # shares the weights: computes fairseq2's decoder

    def decode(seqs, padding_mask, encoder_output, encoder_padding_mask):
        assert padding_mask is None and encoder_padding_mask is None and encoder_output.shape[1] == 1
        return ours.hidden_states_padded(encoder_output[:, 0], seqs), None

    def project(decoder_output, decoder_padding_mask):
        return types.SimpleNamespace(logits=F.linear(decoder_output, model.final_proj.weight))

    model.decode, model.project = decode, project
    pipeline = nn.Module()
    pipeline.model = model
    pipeline.tokenizer = _Tokenizer()
    return pipeline


class SonarLossWrapper(nn.Module):
    """The official wrapper's loss, materialised logits (the stand-in the snippets patch)."""

    def __init__(self, llama_model, forward_proj, reverse_proj, sonar_decoder):
        super().__init__()
        self.llama_model, self.forward_proj, self.reverse_proj = llama_model, forward_proj, reverse_proj
        self.sonar_decoder = sonar_decoder
        for p in self.sonar_decoder.parameters():
            p.requires_grad = False

    def forward(self, embeddings_1024, texts, seq_lens):
        device = embeddings_1024.device
        last_hidden = self.llama_model(inputs_embeds=self.forward_proj(embeddings_1024),
                                       output_hidden_states=True).hidden_states[-1]  # fmt: skip
        preds = [last_hidden[b, k - 1] for b in range(len(seq_lens)) for k in range(1, seq_lens[b])]
        refs = [texts[b][k] for b in range(len(seq_lens)) for k in range(1, seq_lens[b])]
        pred_emb = self.reverse_proj(torch.stack(preds))
        encode = self.sonar_decoder.tokenizer.create_encoder(task="translation", lang="eng_Latn", mode="target", device=device)
        encoded = [encode(t) for t in refs]
        max_len = min(max(len(e) for e in encoded), 256)
        pad_idx = self.sonar_decoder.tokenizer.vocab_info.pad_idx
        dec_ids = torch.full((len(encoded), max_len), pad_idx, dtype=torch.long, device=device)
        labels = torch.full((len(encoded), max_len), pad_idx, dtype=torch.long, device=device)
        for i, e in enumerate(encoded):
            dec_ids[i, : min(len(e), max_len)] = e[:max_len]
            shifted = torch.cat([e[1:], torch.tensor([EOS], device=device)])
            labels[i, : min(len(shifted), max_len)] = shifted[:max_len]
        dec_out, dec_pad_mask = self.sonar_decoder.model.decode(
            seqs=dec_ids, padding_mask=None, encoder_output=pred_emb.unsqueeze(1), encoder_padding_mask=None
        )
        return self.loss_from_decoder_output(dec_out, dec_pad_mask, labels, pad_idx)

    def loss_from_decoder_output(self, dec_out, dec_pad_mask, labels, pad_idx):
        logits = self.sonar_decoder.model.project(dec_out, dec_pad_mask).logits
        return nn.CrossEntropyLoss(ignore_index=pad_idx, reduction="mean")(logits.view(-1, logits.size(-1)), labels.view(-1))


class SwappedSonarLossWrapper(SonarLossWrapper):
    """The official wrapper with the document's one-line swap executed in place of the loss."""

    def loss_from_decoder_output(self, dec_out, dec_pad_mask, labels, pad_idx):
        scope = {"self": self, "dec_out": dec_out, "dec_pad_mask": dec_pad_mask, "labels": labels, "pad_idx": pad_idx}
        exec(snippets()["swap"], scope)
        return scope["total_ce"]


def _batch(dtype: torch.dtype, seed: int = 0):
    """3 documents of SONAR embeddings (width = the fixture decoder's 64) with their sentences."""
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran in park tom had red ball sun was warm".split()
    seq_lens = [5, 3, 4]
    texts = [[" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(n)] for n in seq_lens]
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(len(seq_lens), max(seq_lens), 64, generator=g) * 0.3).to(dtype)
    return emb, texts, seq_lens


def _models(cls_a, cls_b, dtype):
    llama = official_llama_config(random.Random(3))
    source = random_wrapper(llama, 64, seed=3).to(dtype)
    pipeline = _fairseq2_pipeline(dtype)
    parts = lambda: (source.llama_model, source.forward_proj, source.reverse_proj, pipeline)
    return cls_a(*parts()), cls_b(*parts())


def _loss_and_grads(wrapper, batch):
    for p in wrapper.parameters():
        p.grad = None
    loss = wrapper(*batch)
    loss.backward()
    # (the Llama's token table and lm_head get none: inputs_embeds bypasses them)
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("SONARLLM_KERNEL_IMPL", "torch")  # float64; the Triton interpreter is tested elsewhere


def test_the_document_has_both_snippets():
    assert set(snippets()) >= {"swap", "subclass"}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_one_line_swap_gives_the_materialised_loss_and_gradients(dtype, tol):
    official, swapped = _models(SonarLossWrapper, SwappedSonarLossWrapper, dtype)
    batch = _batch(dtype)
    want_loss, want_grads = _loss_and_grads(official, batch)
    got_loss, got_grads = _loss_and_grads(swapped, batch)
    assert want_loss > 1.0  # a real loss, not a degenerate one
    torch.testing.assert_close(got_loss, want_loss, atol=tol, rtol=tol)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 4
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=tol, rtol=100 * tol, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
def test_sonar_token_loss_subclass_gives_the_materialised_loss_and_gradients(dtype, tol):
    scope = {"SonarLossWrapper": SonarLossWrapper}
    exec(snippets()["subclass"], scope)
    official, fused = _models(SonarLossWrapper, scope["FusedSonarLossWrapper"], dtype)
    batch = _batch(dtype, seed=1)
    want_loss, want_grads = _loss_and_grads(official, batch)
    got_loss, got_grads = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_loss, want_loss, atol=tol, rtol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=tol, rtol=100 * tol, msg=name)
    # the checkpoint layout stays the official one (what SonarLLM.from_official reads)
    assert fused.state_dict().keys() == official.state_dict().keys()
