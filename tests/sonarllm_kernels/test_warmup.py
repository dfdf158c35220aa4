"""sonarllm_kernels.warmup: recording the kernel variants a workload launches (for sm_90, on a CPU: Triton
compiles for a GPU without one), compiling them in worker processes into Triton's cache, and the
compile log. Each check runs in a subprocess without TRITON_INTERPRET (the interpreter compiles
nothing), so they need Triton's NVIDIA backend but no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sonarllm_kernels._dispatch import triton_available

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")


def _nvidia_backend() -> bool:
    import triton.backends

    return "nvidia" in triton.backends.backends


def _run(script: str, tmp_path, *args, **env_extra) -> subprocess.CompletedProcess:
    if not _nvidia_backend():
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SONARLLM_KERNEL_IMPL")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), **env_extra)
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


_SIZES_SCRIPT = """
import json, torch
from sonarllm_kernels.warmup import record_variants
from sonarllm_kernels.attention import attention, cu_seqlens_from_lengths
from sonarllm_kernels.embedding_projection import fused_embedding_projection

def packed(lengths):  # the SONAR decoder's packed sentences, forward and backward
    q, k, v = (torch.randn(sum(lengths), 4, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = cu_seqlens_from_lengths(lengths)
    attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths)).sum().backward()

def decode(cached):  # one query against a KV cache of `cached` positions
    q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
    kv = torch.randn(2, 80, 4, 64, dtype=torch.bfloat16)
    attention(q, kv[:, :cached], kv[:, :cached])

def project(tokens, mode):
    x = torch.randn(tokens, 96, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    fused_embedding_projection(x, w, b, mode=mode).sum().backward()

groups = {
    "packed": lambda: [packed(n) for n in ([5, 17, 60, 3], [33, 2], [7] * 31, [64, 1, 9])],
    "decode": lambda: [decode(n) for n in (1, 2, 17, 48, 64)],
    "decode_long": lambda: [decode(n) for n in (65, 70, 80)],
    "project": lambda: [project(n, "in") for n in (16, 33, 100, 257, 2000)],  # 2000: a split-K d weight
}
out = {}
for name, fn in groups.items():
    out[name] = sorted(v.attr for v in record_variants(fn, target="sm_90"))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_batches_of_any_size_share_one_variant_per_kernel(tmp_path):
    """Token counts, sequence lengths and cache lengths are runtime ints: batches that differ in
    them (odd sizes, different longest sentence) launch one compiled variant per kernel, not
    one per "divisible by 16" class or per power-of-two block. (Recorded for sm_90 on CPU
    tensors; nothing compiles.)"""
    out = _run(_SIZES_SCRIPT, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    attn = ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel", "_attn_fwd_kernel"]
    assert got["packed"] == attn
    assert got["decode"] == ["_attn_fwd_kernel"], "cache lengths 1..64 share one variant"
    assert got["decode_long"] == ["_attn_fwd_kernel"]
    # forward, d x and the split-K d weight (+ d bias) product: three variants for any token count
    assert got["project"] == ["_fep_gemm_kernel", "_fep_gemm_kernel", "_fep_gemm_split_k_kernel"]


_COMPILE_SCRIPT = """
import json, os, sys, torch
from sonarllm_kernels.warmup import compile_variants, record_variants, log_compilations, _offline, parse_target
from sonarllm_kernels.attention import attention, cu_seqlens_from_lengths

def workload():
    o = torch.randn(20, 2, 32, dtype=torch.bfloat16)
    from sonarllm_kernels.attention.triton_kernels import _attn_bwd_preprocess_kernel as k  # the cheapest kernel to compile
    delta = torch.empty(2, 20)
    k[(2, 1)](o, o, delta, delta, 0, *o.stride(), 0, *o.stride(), delta.stride(0), 2, 20,
              IS_VARLEN=False, HEAD_DIM=32, BLOCK_D=32, BLOCK_M=64)

variants = record_variants(workload, target="sm_90")
cache = os.environ["TRITON_CACHE_DIR"]
records = compile_variants(variants, target="sm_90", jobs=1, usage=True)
entries = sorted(os.listdir(cache))
# The launch itself, as the run would make it: Triton compiles (or finds) the variant, then the
# launch fails for want of a GPU. The compile log shows whether it was found in the cache.
log_compilations(sys.argv[1])
with _offline(parse_target("sm_90")):
    try:
        workload()
    except Exception:
        pass
print(json.dumps({"variants": len(variants), "records": records, "before": entries, "after": sorted(os.listdir(cache))}))
"""


@pytest.mark.slow
def test_compiled_variants_are_cache_hits_for_the_launch(tmp_path):
    """compile_variants puts the recorded variant into Triton's cache in a worker process; the
    real launch of the same workload then compiles nothing new (no new cache entry) and the
    compile log records it."""
    log = tmp_path / "compiles.jsonl"
    out = _run(_COMPILE_SCRIPT, tmp_path, str(log))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["variants"] == 1
    (record,) = got["records"]
    assert "error" not in record and record["seconds"] > 0 and record["kernel"] == "_attn_bwd_preprocess_kernel"
    assert record["registers"] > 0 and record["spill_stores"] == 0
    assert got["before"], "the worker wrote the compiled kernel into the cache"
    assert got["after"] == got["before"], "the launch found it there"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["kernel"] for entry in lines] == ["_attn_bwd_preprocess_kernel"]


def test_cli_without_a_gpu_or_under_the_interpreter_explains(tmp_path):
    out = _run("", tmp_path, "-m", "training.warmup", "--preset", "toy", "--decoder", "toy")
    if out.returncode != 2:  # a CUDA machine: nothing to check here
        pytest.skip("a CUDA device is present")
    assert "no CUDA device" in out.stderr and "--target sm_90" in out.stderr
    out = _run("", tmp_path, "-m", "training.warmup", "--target", "sm_90", TRITON_INTERPRET="1")
    assert out.returncode == 1 and "unset TRITON_INTERPRET" in out.stderr
    out = _run("", tmp_path, "-m", "training.warmup", "--target", "gfx90", "--preset", "toy", "--decoder", "toy")
    assert out.returncode == 2 and "sm_90" in out.stderr


@pytest.mark.slow
def test_cli_records_and_compiles_the_example_run_for_sm90(tmp_path):
    """The embedded example (toy model, toy SONAR) in bf16: every kernel family of a training run
    (attention fwd/bwd, the projection's three products, the fused cross-entropy) is recorded,
    and each variant compiles for sm_90 without spilling."""
    report = tmp_path / "r.json"
    out = _run("", tmp_path, "-m", "training.warmup", "--config", "training/configs/example.toml",
               "--system.precision", "bf16", "--data.prepared_dir", str(tmp_path / "none"),
               "--target", "sm_90", "--jobs", "2", "--usage", "--report", str(report))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(report.read_text())
    kernels = {r["kernel"] for r in data["variants"]}
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_fep_gemm_kernel",
            "_fep_gemm_split_k_kernel", "_flce_row_stats_kernel"} <= kernels  # fmt: skip
    for r in data["variants"]:
        assert "error" not in r, r
        assert r.get("spill_stores", 0) == 0, r
    assert f"{len(data['variants'])} variants" in out.stdout
