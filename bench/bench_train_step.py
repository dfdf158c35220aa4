"""One SONAR-LLM training step (forward, backward through the frozen decoder, AdamW step) with the
fused kernel paths ("fused": impl auto) versus the reference paths (impl="reference" for the
fused cross-entropy, attention and embedding projection). Reports sentences/s and target
tokens/s. CPU: the toy concept transformer and toy-sized SONAR decoder; CUDA: the 300M preset
with the basic (1024-d, 24-layer) SONAR decoder, bf16.

    pytest bench/bench_train_step.py --benchmark [--bench-size full]
"""

from __future__ import annotations

import pytest
import torch

from bench._harness import machine_info, peak_memory_mb, sync
from bench.bench_sonar_loss import story_lengths
from sonarllm.config import SonarLLMConfig
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.model import SonarLLM
from sonarllm.sonar import SonarDecoder, SonarTextConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (model preset, SONAR decoder config, documents, sentences per document, dtype)
SIZES = {
    ("cpu", "ci"): ("toy", SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=1206), 16, 10, torch.float32),
    ("cpu", "full"): ("39M", SonarTextConfig(model_dim=1024, num_layers=2, num_heads=16, ffn_dim=2048, vocab_size=32_000), 16, 10, torch.float32),
    ("cuda", "ci"): ("300M", SonarTextConfig(), 16, 10, torch.bfloat16),
    ("cuda", "full"): ("300M", SonarTextConfig(), 64, 10, torch.bfloat16),
}


@pytest.mark.parametrize("provider", ["fused", "reference"])
def test_train_step(benchmark, bench_size, provider):
    preset, dcfg, docs, sents, dtype = SIZES[(DEVICE, bench_size)]
    impl = "auto" if provider == "fused" else "reference"
    torch.manual_seed(0)
    model = SonarLLM(SonarLLMConfig.from_name(preset, sonar_dim=dcfg.model_dim, kernel_impl=impl)).to(DEVICE, dtype)
    decoder = SonarDecoder(dcfg, kernel_impl=impl).to(DEVICE, dtype)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.02)
    loss_fn = SonarTokenLoss(decoder, kernel_impl=impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(1)
    embeds_TE = (torch.randn(docs * sents, dcfg.model_dim, generator=g) * 0.05).to(DEVICE, dtype)
    cu = torch.arange(0, docs * sents + 1, sents, dtype=torch.int32, device=DEVICE)
    pred_index = torch.tensor([d * sents + k for d in range(docs) for k in range(sents - 1)], device=DEVICE)
    lengths = story_lengths(docs * (sents - 1), seed=2)
    seqs = [[3, 5] + torch.randint(10, dcfg.vocab_size, (n - 3,), generator=g).tolist() + [3] for n in lengths]
    targets = SonarTargets.from_target_sequences(seqs, 3, device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        pred_NE = model(embeds_TE, cu_seqlens=cu, max_seqlen=sents)[pred_index]
        loss_fn(pred_NE, targets).backward()
        opt.step()
        sync(DEVICE)

    step()
    benchmark.group = f"train-step-{DEVICE}-{bench_size}-{preset}-decoder{dcfg.model_dim}x{dcfg.num_layers}-V{dcfg.vocab_size}"
    benchmark.extra_info.update(machine_info(DEVICE))
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(step, DEVICE), 1)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=0)
    if benchmark.stats:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["sentences_per_s"] = round(len(seqs) / median, 1)
        benchmark.extra_info["target_tokens_per_s"] = round(targets.num_tokens / median)
