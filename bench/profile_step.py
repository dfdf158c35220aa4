"""Where the time of one fused training step goes: a torch.profiler table of the top kernels and a
summary by kind (matmuls, our attention / cross-entropy / projection kernels, elementwise,
optimizer), for the step of bench/bench_train_step.py (300M preset + ``basic`` decoder, bf16, on
CUDA; the toy step on CPU, where the table lists CPU operators instead of kernels).

    python -m bench.profile_step [--size full] [--docs 64] [--steps 3] [--out profile.md]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

KINDS = (  # (kind, pattern on the kernel name), first match wins
    ("attention (ours)", r"_attn_"),
    ("cross-entropy (ours)", r"_flce_"),
    ("projection (ours)", r"_fep_"),
    ("SDPA / flash", r"flash|fmha|attention|sdpa|cudnn"),
    ("matmul (cuBLAS on CUDA)", r"gemm|cutlass|xmma|nvjet|matmul|\bmm\b|addmm|linear"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("elementwise / reduction", r"elementwise|vectorized|reduce|unrolled|copy|fill|cat|index|scatter|gather|softmax|norm"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_table(events: list[tuple[str, int, float]], steps: int, top: int, unit: str) -> str:
    """Markdown: the ``top`` entries by time and a summary by kind. ``events``: (name, calls,
    total microseconds) over ``steps`` steps; ``unit`` names what is timed."""
    total = sum(t for _, _, t in events) or 1.0
    lines = [f"| {unit} | calls/step | ms/step | % |", "|---|---|---|---|"]
    for name, calls, t in sorted(events, key=lambda e: -e[2])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {calls / steps:g} | {t / steps / 1e3:.3f} | {100 * t / total:.1f} |")
    kinds = defaultdict(float)
    for name, _, t in events:
        kinds[kind_of(name)] += t
    lines += ["", "| kind | ms/step | % |", "|---|---|---|"]
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {t / steps / 1e3:.3f} | {100 * t / total:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from bench.bench_train_step import DEVICE, build_step

    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="full", choices=("ci", "full"))
    p.add_argument("--docs", type=int, default=64, help="documents per step")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="also write the tables (markdown) here")
    args = p.parse_args(argv)

    step, info = build_step(args.size, "fused", args.docs)
    for _ in range(2):
        step()
    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tic = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - tic) / args.steps
    if cuda:  # device kernels
        events = [(e.name, e.count, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0]
        unit = "CUDA kernel"
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
        unit = "CPU operator (self time)"
    busy = sum(t for _, _, t in events) / args.steps / 1e6
    head = (f"Training step profile ({info['preset']} + decoder {info['decoder']}, V {info['vocab']}, {info['documents']} "
            f"documents, {info['target_tokens']} target tokens, {info['dtype']}; {args.steps} steps on {DEVICE}): "
            f"{wall * 1e3:.1f} ms per step (profiler on), {busy * 1e3:.1f} ms of it in the entries below")  # fmt: skip
    text = head + "\n\n" + profile_table(events, args.steps, args.top, unit) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
