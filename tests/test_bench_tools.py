"""The benchmark tooling that runs outside pytest-benchmark: the report table and the CUDA suite script."""

import json
import subprocess
from pathlib import Path

from bench.report import format_table, main

REPO = Path(__file__).resolve().parents[1]


def _bench(name, group, median, mem):
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": {"peak_mem_mb": mem}}


def test_report_ranks_providers_within_each_group(tmp_path, capsys):
    data = {"benchmarks": [_bench("slow", "g", 0.004, 10.0), _bench("fast", "g", 0.002, 5.0), _bench("other", "h", 0.001, 1.0)]}
    table = format_table(data)
    rows = [line for line in table.splitlines() if line.startswith("| g ")]
    assert rows[0].startswith("| g | fast | 2.00 | 1.00 | 5.0 |") and rows[1].startswith("| g | slow | 4.00 | 2.00 | 10.0 |")
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(data))
    bad.write_text("{not json")
    assert main([str(good), str(bad)]) == 0
    out = capsys.readouterr().out
    assert "bad.json: skipped" in out and "| h | other |" in out


def test_gpu_suite_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_suite.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_zero_probe_commands_are_valid_training_configurations(tmp_path):
    from bench.zero_probe import SIZES, train_command
    from sonarllm.config import SonarLLMConfig
    from training.config import load_config, parse_cli

    for size in SIZES:
        cmd = train_command(tmp_path / "data", tmp_path / "run", size, 3, 64)
        path, overrides = parse_cli(cmd[cmd.index("training/train.py") + 1 :])
        cfg = load_config(path, overrides)
        assert (cfg.system.zero_stage, cfg.system.precision, cfg.loop.micro_batch_documents) == (3, "bf16", 64)
        SonarLLMConfig.from_name(cfg.model.preset, **cfg.model.overrides)  # a valid model


def test_zero_probe_stops_a_run_at_its_first_step_and_names_an_out_of_memory(tmp_path):
    import sys

    from bench.zero_probe import run_one

    writes = ("import json, pathlib, sys, time; p = pathlib.Path(sys.argv[1]) / 'metrics.jsonl'; "
              "p.write_text(json.dumps({'step': 1, 'first_step_s': 3.5, 'peak_memory_gib': 12.25}) + '\\n'); time.sleep(60)")  # fmt: skip
    run = tmp_path / "ok"
    result = run_one([sys.executable, "-c", writes, str(run)], run, tmp_path / "ok.log", limit=30)
    assert result["ok"] and result["peak_memory_gib"] == 12.25 and result["seconds"] < 30
    oom = "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB'); sys.exit(1)"
    result = run_one([sys.executable, "-c", oom], tmp_path / "oom", tmp_path / "oom.log", limit=30)
    assert not result["ok"] and result["reason"] == "out of memory"
    result = run_one([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow", tmp_path / "slow.log", limit=2)
    assert not result["ok"] and result["reason"] == "time limit"


# --- bench/gpu_suite.py: the CUDA suite's plan, runner and report (the CPU-checkable parts) ----


def test_gpu_suite_plan_fits_the_six_minutes_and_selects_stages(tmp_path):
    import sys

    from bench.gpu_suite import DEADLINE_S, STAGE_NAMES, plan

    default = plan(None, False, tmp_path)
    names = [s.name for s in default]
    assert set(names) == set(STAGE_NAMES) - {"zero", "sweep", "compile"}, "the opt-in stages run only when named"
    assert sum(s.limit for s in default) + 15 <= DEADLINE_S, "stage limits (and setup's 15 s) within 6 minutes"
    tests = next(s for s in default if s.name == "tests")
    assert "--smoke" in tests.commands[0] and tests.commands[0].count("tests/sonarllm_kernels/test_attention.py") == 1

    one = plan({"attention"}, False, tmp_path)
    assert [s.name for s in one] == ["tests", "attention"]
    cmd = one[0].commands[0]
    assert [a for a in cmd if a.startswith("tests/")] == ["tests/sonarllm_kernels/test_attention.py"]
    assert [s.name for s in plan({"train", "zero"}, False, tmp_path)] == ["train", "zero"]
    assert [s.name for s in plan({"compile"}, False, tmp_path)] == ["compile"]
    (sweep,) = plan({"sweep"}, False, tmp_path)
    from bench.sweep_flce import parse

    args = parse(sweep.commands[0][2:])  # the suite's command line is one the sweep accepts
    assert args.time_limit + 10 <= sweep.limit and args.table_out == str(tmp_path / "sweep_tiles.json")
    full = next(s for s in plan({"tests"}, True, tmp_path) if s.name == "tests")
    assert "--smoke" not in full.commands[0] and full.limit >= 600
    out = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--only", "attention,bogus", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "unknown stage(s) ['bogus']" in out.stderr


def test_gpu_suite_without_cuda_says_so_and_exits_2():
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    import os

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # python3 = ours
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--only", "attention"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "no CUDA device here" in out.stderr and "--dry-run" in out.stderr
    out = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "deadline 360 s" in out.stdout


def test_gpu_suite_stages_run_under_limits_and_a_deadline(tmp_path):
    import sys
    import time

    from bench.gpu_suite import Stage, execute

    py = sys.executable
    stages = [
        Stage("quick", 20, "writes a compile log", [[py, "-c", "import json, os; open(os.environ['SONARLLM_COMPILE_LOG'], 'a')"
                                                      ".write(json.dumps({'kernel': 'k', 'seconds': 1.5}) + '\\n')"]]),
        Stage("slow", 4, "outlives its limit", [[py, "-c", "import time; time.sleep(60)"]]),
        Stage("late", 5, "no time left", [[py, "-c", "pass"]]),
    ]  # fmt: skip
    records = []
    out = tmp_path / "out"
    out.mkdir()
    tic = time.monotonic()
    status = execute(stages, records, tmp_path, dict(__import__("os").environ), out, time.monotonic() + 13, {})
    assert time.monotonic() - tic < 20 and status == 1
    assert [(r["name"], r["status"]) for r in records] == [("quick", "ok"), ("slow", "time limit"), ("late", "skipped (deadline)")]
    assert records[0]["compile_s"] == 1.5 and records[0]["compiles"] == 1
    assert (out / "report.md").is_file() and (out / "suite.tar.gz").is_file()
    assert "| slow | time limit |" in (out / "report.md").read_text()


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gpu_suite_report_has_every_section(tmp_path):
    import tarfile

    from bench.gpu_suite import publish, render

    w = tmp_path / "work"
    _write_jsonl(w / "tests.jsonl", [
        {"nodeid": "tests/sonarllm_kernels/test_attention.py::test_parity_varlen[x-cuda-triton-bf16]", "outcome": "passed"},
        {"nodeid": "tests/sonarllm_kernels/test_attention.py::test_parity_varlen[y-cuda-triton-bf16]", "outcome": "failed", "message": "AssertionError: boom"},
        {"nodeid": "tests/sonarllm_kernels/test_fused_embedding_projection.py::test_parity[cuda-torch-fp16]", "outcome": "passed"},
    ])  # fmt: skip
    _write_jsonl(w / "train-run" / "metrics.jsonl", [
        {"step": 1, "first_step_s": 21.5, "peak_memory_gib": 1.25},
        {"step": 10, "loss": 2.75, "tokens_per_s": 1000.0}, {"step": 20, "loss": 2.0, "tokens_per_s": 3000.0},
        {"step": 30, "loss": 1.5, "tokens_per_s": 5000.0}, {"step": 30, "eval_loss": 1.6},
    ])  # fmt: skip

    _write_jsonl(w / "train-run-compiled" / "metrics.jsonl", [
        {"step": 1, "first_step_s": 64.0}, {"step": 10, "loss": 2.5, "tokens_per_s": 7000.0},
    ])  # fmt: skip
    (w / "compile.log").write_text("system.compile: compiling the concept transformer and the SONAR token loss at the first step\n")

    def bench(provider, group, median, **extra):
        return {"name": f"t[{provider}]", "group": group, "params": {"provider": provider}, "stats": {"median": median}, "extra_info": extra}

    _write_jsonl(w / "bench-attention.jsonl", [
        bench("triton", "attention-concept-fwd_bwd-cuda-full", 0.002), bench("torch", "attention-concept-fwd_bwd-cuda-full", 0.001),
        bench("sdpa_cudnn", "attention-concept-fwd_bwd-cuda-full", 0.0009),
        bench("triton", "attention-packed-fwd-cuda-full", 0.001), bench("torch", "attention-packed-fwd-cuda-full", 0.004),
        {"name": "t[flash]", "skipped": "flash is not available here"},
    ])  # fmt: skip
    _write_jsonl(w / "bench-projection.jsonl", [
        bench(p, "fep-in-fwd-cuda-N2112-E1024-D1024-bfloat16", t, gb_per_s=100.0) for p, t in (("triton", 0.001), ("torch", 0.00105), ("reference", 0.0012))
    ])  # fmt: skip
    _write_jsonl(w / "bench-train_step.jsonl", [bench("fused", "train-step-cuda-full-300M", 0.5, target_tokens_per_s=60000, mfu=0.21)])
    (w / "warmup.json").write_text(json.dumps({"wall_seconds": 9.5, "variants": [{"seconds": 2.0}, {"seconds": 3.0}]}))
    (w / "profile.md").write_text("| CUDA kernel | calls/step |\n")
    (w / "example-data").mkdir()
    (w / "example-data" / "big.json").write_text("{}")
    stages = [{"name": "tests", "status": "ok", "limit": 70, "seconds": 50.0, "compile_s": 30.5, "compiles": 40, "what": "parity"}]
    text = render(w, stages, {"gpu": "NVIDIA H200", "peak_bf16_tflops": 790.0})
    assert "| tests | ok | 50.0 | 70 | 30.5 (40) | parity |" in text
    assert "1 failed, 2 passed" in text and "FAILED tests/sonarllm_kernels/test_attention.py" in text and "boom" in text
    assert "| attention | triton | bf16 | 1 | 1 |" in text and "| fused_embedding_projection | torch | fp16 | 1 | 0 |" in text
    assert "training loss 2.750 (first window) -> 1.500 (last)" in text and "1.600 (step 30)" in text
    assert "target tokens/s: 5,000" in text and "21.5 s after train.py started" in text and "1.25 GiB" in text
    eager, compiled = text.split("--system.compile false`")[1].split("--system.compile true`")
    assert "21.5 s after train.py started" in eager and "64.0 s after train.py started" in compiled
    assert "target tokens/s: 7,000" in compiled and "`system.compile: compiling the concept transformer" in compiled
    assert "attention dense: triton -> torch (CHANGE" in text and "attention varlen: triton -> triton (keep" in text
    assert "fastest SDPA backend sdpa_cudnn" in text
    assert "projection in: triton -> torch (CHANGE" in text and "1.05x" in text
    assert "60,000 tok/s" in text and "21.0% MFU" in text and "- t[flash]: flash is not available here" in text
    assert "2 variants in 9.5 s wall (5.0 s of compiling" in text and "| CUDA kernel |" in text
    out = tmp_path / "out"
    out.mkdir()
    publish(w, out, text)
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = tar.getnames()
    assert "tests.jsonl" in names and "train-run/metrics.jsonl" in names and not any(n.startswith("example-data") for n in names)
