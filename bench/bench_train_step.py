"""One SONAR-LLM training step (forward, backward through the frozen decoder, AdamW step) with the
fused kernel paths ("fused": impl auto) versus the reference paths (impl="reference" for the
fused cross-entropy, attention and embedding projection).

CPU: the toy concept transformer and a toy-sized SONAR decoder. CUDA: the 300M preset with the
``basic`` SONAR decoder (1024-d, 24 layers, V = 256,206; random weights at the real shape), bf16,
documents of 32 sentences + the end-of-text sentence (32 predictions each); "full" runs 16 and
64 documents (the reference's materialised logits do not fit at 64; it is skipped where they
would not). extra_info: target_tokens_per_s, sentences_per_s, peak_mem_mb and, on CUDA, the
model FLOPs of the step (bench/flops.py: concept transformer forward + backward, frozen decoder
forward + input-gradient backward, logits), tflop_per_s and mfu (of SONARLLM_PEAK_TFLOPS, the
GPU's measured dense bf16 matmul rate; bench/gpu_suite.sh measures it, else the H200's ~790).

    pytest bench/bench_train_step.py --benchmark [--bench-size full]
"""

from __future__ import annotations

import os

import pytest
import torch

from bench._harness import measure, sync
from bench.bench_sonar_loss import story_lengths
from bench.flops import training_step_flops
from sonarllm.config import SonarLLMConfig
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.model import SonarLLM
from sonarllm.sonar import SonarDecoder, SonarTextConfig
from training.compile import compile_for_training

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H200_BF16_TFLOPS = 790.0  # dense bf16 matmul on random data, measured on this workplace's H200s
# (model preset, SONAR decoder config, documents per step, sentence positions per document, dtype)
SIZES = {
    ("cpu", "ci"): ("toy", SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=1206), (16,), 10, torch.float32),
    ("cpu", "full"): ("39M", SonarTextConfig(model_dim=1024, num_layers=2, num_heads=16, ffn_dim=2048, vocab_size=32_000), (16,), 10, torch.float32),
    ("cuda", "ci"): ("300M", SonarTextConfig(), (16,), 33, torch.bfloat16),
    ("cuda", "full"): ("300M", SonarTextConfig(), (16, 64), 33, torch.bfloat16),
}


def peak_tflops() -> float:
    return float(os.environ.get("SONARLLM_PEAK_TFLOPS", H200_BF16_TFLOPS))


def build_step(size: str, provider: str, docs: int, device: str = DEVICE, compiled: bool = False):
    """(step function, description) of one training step; see the module docstring. ``compiled``:
    the forwards compiled as the trainer's ``system.compile`` does (bench/bench_compile.py)."""
    preset, dcfg, _, sents, dtype = SIZES[(device, size)]
    impl = "auto" if provider == "fused" else "reference"
    torch.manual_seed(0)
    cfg = SonarLLMConfig.from_name(preset, sonar_dim=dcfg.model_dim, kernel_impl=impl)
    model = SonarLLM(cfg).to(device, dtype)
    decoder = SonarDecoder(dcfg, kernel_impl=impl).to(device, dtype)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.02)
    loss_fn = SonarTokenLoss(decoder, kernel_impl=impl)
    if compiled:
        compile_for_training(model, loss_fn, zero_stage=0, fallback=False)  # time only what compiled
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(1)
    embeds_TE = (torch.randn(docs * sents, dcfg.model_dim, generator=g) * 0.05).to(device, dtype)
    cu = torch.arange(0, docs * sents + 1, sents, dtype=torch.int32, device=device)
    pred_index = torch.tensor([d * sents + k for d in range(docs) for k in range(sents - 1)], device=device)
    lengths = story_lengths(docs * (sents - 1), seed=2)
    seqs = [[3, 5] + torch.randint(10, dcfg.vocab_size, (n - 3,), generator=g).tolist() + [3] for n in lengths]
    targets = SonarTargets.from_target_sequences(seqs, 3, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        pred_NE = model(embeds_TE, cu_seqlens=cu, max_seqlen=sents)[pred_index]
        loss_fn(pred_NE, targets).backward()
        opt.step()
        sync(device)

    flops = training_step_flops(cfg, [sents] * docs, dcfg, lengths)  # decoder inputs keep the final </s>
    info = {"preset": preset, "decoder": f"{dcfg.model_dim}x{dcfg.num_layers}", "vocab": dcfg.vocab_size,
            "documents": docs, "sentences": len(seqs), "target_tokens": targets.num_tokens,
            "dtype": str(dtype), "model_tflop": round(flops.total / 1e12, 3)}  # fmt: skip
    return step, info


def pytest_generate_tests(metafunc):
    if "docs" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size", default="ci")
        metafunc.parametrize("docs", SIZES[(DEVICE, size)][2], ids=lambda n: f"{n}docs")


@pytest.mark.parametrize("provider", ["fused", "reference"])
def test_train_step(benchmark, bench_size, provider, docs):
    preset, dcfg, _, sents, dtype = SIZES[(DEVICE, bench_size)]
    if provider == "reference" and DEVICE == "cuda":
        tokens = docs * (sents - 1) * 16  # ~15 target tokens per sentence
        need = tokens * dcfg.vocab_size * 16  # logits, float32 copies and their gradients
        if need > 0.8 * torch.cuda.mem_get_info()[0]:
            pytest.skip(f"reference materialises ~{need / 2**30:.0f} GiB of logits at {docs} documents: does not fit")
    step, info = build_step(bench_size, provider, docs)
    median = measure(benchmark, step, device=DEVICE,
                     group=f"train-step-{DEVICE}-{bench_size}-{preset}-decoder{info['decoder']}-V{info['vocab']}-{docs}docs",
                     rounds=2 if provider == "reference" and DEVICE == "cuda" else 5, **info)  # fmt: skip
    if median is not None:
        benchmark.extra_info["sentences_per_s"] = round(info["sentences"] / median, 1)
        benchmark.extra_info["target_tokens_per_s"] = round(info["target_tokens"] / median)
        if DEVICE == "cuda":
            tflops = info["model_tflop"] / median
            benchmark.extra_info["tflop_per_s"] = round(tflops, 1)
            benchmark.extra_info["mfu"] = round(tflops / peak_tflops(), 4)
            benchmark.extra_info["peak_tflops"] = peak_tflops()
