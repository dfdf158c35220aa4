"""bench/flops.py (the FLOPs behind the training-step MFU) against an independent count: PyTorch's
FlopCounterMode on a small model's forward and backward, with the reference kernels (which
materialise every attention score: ``dense_attention=True``)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import concept_flops, decoder_flops, training_step_flops
from sonarllm.config import SonarLLMConfig
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.model import SonarLLM
from sonarllm.sonar import SonarDecoder, SonarTextConfig


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("head_dim", [None, 12], ids=["heads_x_dim_eq_width", "wider_attention"])
def test_step_flops_match_pytorchs_flop_counter(head_dim):
    cfg = SonarLLMConfig.from_name("toy", kernel_impl="reference", num_layers=2,
                                   **({"head_dim": head_dim} if head_dim else {}))  # fmt: skip
    dcfg = SonarTextConfig(model_dim=cfg.sonar_dim, num_layers=3, num_heads=4, ffn_dim=96, vocab_size=301)
    model = SonarLLM(cfg)
    decoder = SonarDecoder(dcfg, kernel_impl="reference")
    loss_fn = SonarTokenLoss(decoder, kernel_impl="reference")

    doc_lengths = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    embeds = torch.randn(15, cfg.sonar_dim)
    pred_index = torch.tensor([0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 13])
    g = torch.Generator().manual_seed(0)
    seqs = [[3, 5] + torch.randint(4, 301, (n,), generator=g).tolist() + [3] for n in (4, 9, 1, 6, 2, 3, 8, 5, 1, 7, 2, 4)]
    targets = SonarTargets.from_target_sequences(seqs, 3)
    target_lengths = [len(s) for s in seqs]  # decoder inputs keep the final </s> (duplicate_eos)

    losses = []
    fwd = _counted(lambda: losses.append(loss_fn(model(embeds, cu_seqlens=cu, max_seqlen=7)[pred_index], targets)))
    bwd = _counted(lambda: losses[0].backward())

    want = concept_flops(cfg, doc_lengths, dense_attention=True) + decoder_flops(dcfg, target_lengths, dense_attention=True)
    assert want.forward == fwd
    assert want.backward == bwd
    causal = training_step_flops(cfg, doc_lengths, dcfg, target_lengths)
    assert causal.total < want.total, "causal attention counts only the visible pairs"
