"""The SONAR-LLM decoder loss step: forward + backward to the predicted embeddings.

"fused": packed sentences, closed-form cross-attention, fused linear cross-entropy (what
``SonarTokenLoss`` does). "padded": the reference code's way — right-padded batch, full
cross-attention over the one key, materialised [N, L, V] logits, ``F.cross_entropy``. The
decoder is frozen; only the embeddings get a gradient. Sentence lengths follow short stories
(mean ~15 tokens, max 60); each problem holds about the given number of target tokens (4,096 and
32,768 with the ``basic`` decoder, random weights, bf16 on CUDA). Reports target tokens/s and
peak memory; a padded problem whose logits cannot fit on the GPU is skipped, naming the memory
it needs.

    pytest bench/bench_sonar_loss.py --benchmark [--bench-size full]
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._harness import measure, sync
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.sonar import SonarDecoder, SonarTextConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (decoder config, target-token counts, dtype)
SIZES = {
    ("cpu", "ci"): (SonarTextConfig(model_dim=128, num_layers=2, num_heads=2, ffn_dim=512, vocab_size=32_000), (1_000,), torch.float32),
    ("cpu", "full"): (SonarTextConfig(model_dim=256, num_layers=4, num_heads=4, ffn_dim=1024, vocab_size=256_206), (500,), torch.float32),
    ("cuda", "ci"): (SonarTextConfig(), (4_096,), torch.bfloat16),
    ("cuda", "full"): (SonarTextConfig(), (4_096, 32_768), torch.bfloat16),
}


def story_lengths(n: int, seed: int = 0) -> list[int]:
    """Target-sequence lengths of short-story sentences: log-normal, mean ~15 tokens, in [4, 60]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.empty(n).log_normal_(mean=2.58, std=0.5, generator=g)  # exp(2.58 + 0.5**2 / 2) = 15
    return [int(x) for x in draws.round().clamp(4, 60)]


def lengths_for_tokens(tokens: int, seed: int = 0) -> list[int]:
    """Story-like sentence lengths whose sum is about ``tokens`` (the first sentences drawn)."""
    lengths = story_lengths(max(1, tokens // 8), seed)
    total = 0
    for i, n in enumerate(lengths):
        total += n
        if total >= tokens:
            return lengths[: i + 1]
    return lengths


def pytest_generate_tests(metafunc):
    if "tokens" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size", default="ci")
        metafunc.parametrize("tokens", SIZES[(DEVICE, size)][1], ids=lambda n: f"{n}tok")


def _padded_loss(dec: SonarDecoder, pred, seqs):
    width = max(map(len, seqs))
    tok = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=pred.device)
    lab = torch.tensor([s[1:] + [3] + [-100] * (width - len(s)) for s in seqs], device=pred.device)
    logits = dec.logits(dec.hidden_states_padded(pred, tok))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), ignore_index=-100)


def padded_logits_bytes(n: int, width: int, vocab: int, dtype: torch.dtype) -> int:
    """Memory of the padded path's logits: [N, L, V] in the model dtype, its float32 copy, and
    the gradients of both."""
    return n * width * vocab * 2 * (dtype.itemsize + 4)


@pytest.mark.parametrize("provider", ["fused", "padded"])
def test_sonar_loss_step(benchmark, bench_size, provider, tokens):
    cfg, _, dtype = SIZES[(DEVICE, bench_size)]
    lengths = lengths_for_tokens(tokens)
    n = len(lengths)
    need = padded_logits_bytes(n, max(lengths), cfg.vocab_size, dtype)
    if provider == "padded" and DEVICE == "cuda" and need > 0.8 * torch.cuda.mem_get_info()[0]:
        pytest.skip(f"padded materialises {need / 2**30:.0f} GiB of logits for {sum(lengths)} target tokens: does not fit")
    torch.manual_seed(0)
    dec = SonarDecoder(cfg).to(DEVICE, dtype)
    for p in dec.parameters():  # scaled like a trained model so the softmax is not degenerate
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    seqs = [[3, 5] + torch.randint(10, cfg.vocab_size, (length - 3,), generator=g).tolist() + [3] for length in lengths]
    pred = torch.randn(n, cfg.model_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    targets = SonarTargets.from_target_sequences(seqs, 3, device=DEVICE)
    loss_fn = SonarTokenLoss(dec)  # freezes the decoder

    def step():
        pred.grad = None
        loss = loss_fn(pred, targets) if provider == "fused" else _padded_loss(dec, pred, seqs)
        loss.backward()
        sync(DEVICE)

    median = measure(benchmark, step, device=DEVICE,
                     group=f"sonar-loss-{DEVICE}-{bench_size}-d{cfg.model_dim}-L{cfg.num_layers}-V{cfg.vocab_size}-{tokens}tok",
                     rounds=3 if provider == "padded" else 5, target_tokens=targets.num_tokens, sentences=n,
                     padded_tokens=n * max(lengths), padded_logits_mb=round(need / 2**20))  # fmt: skip
    if median is not None:
        benchmark.extra_info["target_tokens_per_s"] = round(targets.num_tokens / median)
