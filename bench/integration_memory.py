"""Peak memory of the official SonarLossWrapper's loss, as written and with the one-line swap
(docs/integrations.md): one forward + backward of the decoder-output -> loss part at SONAR's
vocabulary.

    python -m bench.integration_memory [--tokens 512] [--vocab 256206] [--dim 1024]

Each variant runs in a fresh process (so that one's freed memory cannot hide the other's
peak) and reports two figures:

* ``profiler``: the peak of the tensor allocations during the call, above what was allocated
  before (torch's CPU profiler, replayed in time order; bench/_harness.peak_memory_mb);
* ``rss``: the growth of the process' peak resident set (``ru_maxrss``) over the call, which
  also sees allocator overhead and temporaries outside torch's allocator.

"materialised": ``logits = F.linear(dec_out, W)`` ([N, L, V], fairseq2's tied projection), then
``nn.CrossEntropyLoss(ignore_index=pad)`` on the flattened logits, as the official code does.
"fused": ``fused_linear_cross_entropy(dec_out, W, labels, ignore_index=pad)``. The decoder
output requires a gradient; the tied weight W [V, D] is frozen, as in SONAR-LLM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

VARIANTS = ("materialised", "fused")


def _inputs(tokens: int, vocab: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // 32)
    # in place: a temporary copy of W would set the process' peak RSS before the measured call
    dec_out = torch.randn(rows, tokens // rows, dim, generator=g).mul_(0.5).requires_grad_(True)
    weight = torch.randn(vocab, dim, generator=g).mul_(dim**-0.5)
    labels = torch.randint(4, vocab, (rows, tokens // rows), generator=g)
    return dec_out, weight, labels


def _step(variant: str, dec_out, weight, labels, pad: int = 0):
    import torch
    from torch import nn

    if variant == "materialised":
        logits = torch.nn.functional.linear(dec_out, weight)
        loss = nn.CrossEntropyLoss(ignore_index=pad, reduction="mean")(logits.view(-1, logits.size(-1)), labels.view(-1))
    else:
        from sonarllm_kernels import fused_linear_cross_entropy

        loss = fused_linear_cross_entropy(dec_out, weight, labels, ignore_index=pad)
    loss.backward()
    return loss


def measure_one(variant: str, tokens: int, vocab: int, dim: int) -> dict:
    """Both peaks of one forward + backward (run in the current process)."""
    from bench._harness import peak_memory_mb

    dec_out, weight, labels = _inputs(tokens, vocab, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    profiler = peak_memory_mb(lambda: out.setdefault("loss", float(_step(variant, dec_out, weight, labels))), "cpu")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"variant": variant, "loss": out["loss"], "profiler_mib": round(profiler, 1),
            "rss_growth_mib": round((after - before) / 1024, 1)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=256_206)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.tokens, args.vocab, args.dim)))
        return 0
    env = {**os.environ, "SONARLLM_KERNEL_IMPL": "torch"}
    env.pop("TRITON_INTERPRET", None)
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "bench.integration_memory", "--one", variant, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--dim", str(args.dim)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"N = {args.tokens} target tokens, V = {args.vocab:,}, D = {args.dim}, float32, CPU")
    print("| variant | loss | peak tensor memory (profiler) MiB | peak RSS growth MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['loss']:.6f} | {r['profiler_mib']:,.0f} | {r['rss_growth_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
