"""SONAR text encoder throughput for data preparation: sentences/s of ``encode_tokens`` (packed
batches of at most ``max_tokens`` tokens, longest sentences first), the path
training/prepare_data.py takes. CUDA: the ``basic`` encoder (1024-d, 24 layers; random weights at
the real shape), bf16; CPU: a toy-sized encoder. Sentence lengths follow short stories (mean
~15 tokens, at most 60). Modes: the encoder's own attention path ("fused": impl auto) and the
reference attention ("reference").

    pytest bench/bench_sonar_encoder.py --benchmark [--bench-size full]
"""

from __future__ import annotations

import pytest
import torch

from bench._harness import measure, sync
from bench.bench_sonar_loss import story_lengths
from sonarllm.sonar import SonarEncoder, SonarTextConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (encoder config, sentences, tokens per packed batch, dtype)
SIZES = {
    ("cpu", "ci"): (SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=1000), 256, 2048, torch.float32),
    ("cpu", "full"): (SonarTextConfig(model_dim=256, num_layers=4, num_heads=4, ffn_dim=1024, vocab_size=32_000), 1024, 4096, torch.float32),
    ("cuda", "ci"): (SonarTextConfig(), 4096, 16_384, torch.bfloat16),
    ("cuda", "full"): (SonarTextConfig(), 32_768, 65_536, torch.bfloat16),
}


@pytest.mark.parametrize("provider", ["fused", "reference"])
def test_sonar_encoder(benchmark, bench_size, provider):
    cfg, n, max_tokens, dtype = SIZES[(DEVICE, bench_size)]
    if provider == "reference" and DEVICE == "cuda" and bench_size == "full":
        n //= 8  # the reference attention loops over sentences in Python
    torch.manual_seed(0)
    enc = SonarEncoder(cfg, kernel_impl="auto" if provider == "fused" else "reference").to(DEVICE, dtype)
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(3)
    seqs = [[5] + torch.randint(4, cfg.vocab_size, (length - 2,), generator=g).tolist() + [3]
            for length in story_lengths(n, seed=3)]  # fmt: skip

    def step():
        enc.encode_tokens(seqs, max_tokens=max_tokens, progress=False)
        sync(DEVICE)

    median = measure(benchmark, step, device=DEVICE, group=f"sonar-encoder-{DEVICE}-{bench_size}-d{cfg.model_dim}-L{cfg.num_layers}",
                     rounds=3, sentences=n, tokens=sum(map(len, seqs)), max_tokens=max_tokens, dtype=str(dtype))  # fmt: skip
    if median is not None:
        benchmark.extra_info["sentences_per_s"] = round(n / median)
