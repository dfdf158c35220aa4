"""End-to-end training runs in subprocesses (DeepSpeed on CPU, gloo): the launchers, process
counts, ZeRO stages and precisions agree; a resumed run repeats the uninterrupted one; bad
configuration fails at start-up; the exported model loads for generation."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import read_losses

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "training" / "train.py")
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir, prepared, *args, launcher="python", nproc=1, check=True):
    common = ["--data.prepared_dir", str(prepared), "--run.output_dir", str(run_dir), "--system.progress", "false",
              "--model.kernel_impl", "torch", "--loop.log_every", "1", "--loop.micro_batch_documents", "4",
              "--loop.eval_every", "1000", "--loop.eval_max_documents", "8", "--optim.warmup_steps", "0",
              "--optim.lr", "3e-3"]  # fmt: skip
    if launcher == "python":
        cmd = [sys.executable, SCRIPT]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()), SCRIPT]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port()), SCRIPT]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    out = subprocess.run(cmd + common + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_example_run_learns_checkpoints_and_exports(tmp_path, prepared):
    run = tmp_path / "run"
    train(run, prepared, "--loop.max_steps", "8", "--loop.checkpoint_every", "4", "--loop.eval_every", "4")
    losses = read_losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008"]
    from sonarllm.bundle import load_bundle

    bundle = load_bundle(run / "final", kernel_impl="torch")
    emb = bundle.pipeline.encode(["Lily went to the park."])
    assert bundle.model(emb[None]).shape == (1, 1, 64)


def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, prepared):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, prepared, "--loop.max_steps", "6", "--loop.checkpoint_every", "3")
    first = train(resumed, prepared, "--loop.max_steps", "6", "--run.stop_after", "3")
    assert "stopped at step 3" in first.stdout
    second = train(resumed, prepared, "--loop.max_steps", "6")
    assert "resumed from" in second.stdout and "(step 3)" in second.stdout
    # Equal up to the last bit of float32 rounding: CPU BLAS results depend on buffer alignment,
    # which differs between two identical uninterrupted runs by the same amount.
    torch.testing.assert_close(torch.tensor(read_losses(resumed)), torch.tensor(read_losses(straight)), rtol=2e-7, atol=0)
    from safetensors.torch import load_file

    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_processes_agree_with_one(tmp_path, prepared, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, prepared, "--loop.max_steps", "3", "--loop.grad_accum_steps", "2")
    train(two, prepared, "--loop.max_steps", "3", "--loop.grad_accum_steps", "1", launcher=launcher, nproc=2)
    torch.testing.assert_close(torch.tensor(read_losses(two)), torch.tensor(read_losses(one)), rtol=1e-5, atol=1e-6)


def test_zero_stages_agree(tmp_path, prepared):
    losses = {}
    for stage in (0, 1, 2, 3):
        train(tmp_path / f"z{stage}", prepared, "--loop.max_steps", "3", "--system.zero_stage", str(stage))
        losses[stage] = torch.tensor(read_losses(tmp_path / f"z{stage}"))
    for stage in (0, 1, 3):
        torch.testing.assert_close(losses[stage], losses[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision,objective", [("bf16", "sonar"), ("fp16", "sonar"), ("fp32", "mse")])
def test_precisions_and_objectives(tmp_path, prepared, precision, objective):
    run = tmp_path / "run"
    train(run, prepared, "--loop.max_steps", "4", "--loop.eval_every", "4", "--system.precision", precision,
          "--model.objective", objective)  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 4 and len(evals) == 1
    assert all(math.isfinite(x) for x in losses + evals)
    if objective == "sonar":
        assert 3.0 < losses[0] < 8.0  # about ln(vocabulary) at the start


def test_bad_configuration_fails_at_start_up(tmp_path, prepared):
    out = train(tmp_path / "bad", prepared, "--optim.lr", "-1", check=False)
    assert out.returncode == 2 and "optim.lr must be > 0" in out.stderr
    out = train(tmp_path / "bad", prepared, "--model.preset", "100M", check=False)  # 1024-d model, 64-d toy SONAR
    assert out.returncode == 2 and "model.preset '100M' works in 1024-d SONAR space" in out.stderr
    train(tmp_path / "bad", prepared, "--loop.max_steps", "1", "--run.resume", "never")
    out = train(tmp_path / "bad", prepared, "--loop.max_steps", "1", "--run.resume", "never", check=False)
    assert out.returncode == 2 and "already holds checkpoints" in out.stderr
    out = train(tmp_path / "other", prepared, "--data.source", str(tmp_path / "other.jsonl"), check=False)
    assert out.returncode == 2 and "not data.source" in out.stderr
