"""Cluster runs on one machine (DeepSpeed on CPU, gloo): two "nodes" over loopback give one
process's losses, and a checkpoint resumes on another number of processes or ZeRO stage through
DeepSpeed's universal checkpointing, continuing the uninterrupted run's losses."""

import json
import subprocess

import pytest
import torch

from tests.training.conftest import read_losses
from tests.training.test_train import BIN, SCRIPT, _command, _env, _port, train
from training.checkpoint import Checkpointer

STEP3 = "step-00000003"
# The losses of runs that split the same global batch differently agree to float32 summation
# order (as test_train.py's test_two_processes_agree_with_one).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _two_nodes(launcher, run_dir, prepared, cwds, *args):
    """One training run as two "nodes" of one process each, started by ``launcher`` (torchrun, or
    DeepSpeed's with a hostfile and --no_ssh) with the rendezvous on 127.0.0.1; node k runs in
    directory cwds[k]. Returns each node's output."""
    port = _port()
    common = _command(run_dir, prepared, *args)[2:]  # the configuration, without "python train.py"
    hostfile = cwds[0].parent / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    procs = []
    for node, cwd in enumerate(cwds):
        if launcher == "torchrun":
            cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"]
        else:
            cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, *common]
        # one thread each: both "nodes" share this machine's cores
        env = _env() | {"OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prepared):
    """3 steps of 8 documents on 1 process (2 accumulation steps): the losses."""
    run = tmp_path_factory.mktemp("one") / "run"
    train(run, prepared, "--loop.max_steps", "3", "--loop.grad_accum_steps", "2")
    return read_losses(run)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_over_loopback_agree_with_one_process(tmp_path, prepared, one_process, launcher):
    """2 nodes x 1 process (global batch 2 x 4 documents) give the losses of 1 process with 2
    accumulation steps. Every process has LOCAL_RANK 0, so anything that took the local rank for
    "rank 0 writes" would write twice: the metrics hold each step once, only global rank 0 prints
    the summary, the checkpoint holds both ranks' ZeRO-2 optimizer partitions, and nothing lands in
    the nodes' working directories."""
    two = tmp_path / "two"
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    outs = _two_nodes(launcher, two, prepared, cwds, "--loop.max_steps", "3", "--loop.grad_accum_steps", "1")
    torch.testing.assert_close(torch.tensor(read_losses(two)), torch.tensor(one_process), **TOL)
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "done: 3 steps" in outs[0] and "done: 3 steps" not in outs[1]
    step = two / "checkpoints" / STEP3
    assert sorted(p.name for p in step.glob("*.pt")) == ["mp_rank_00_model_states.pt",
                                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    assert json.loads((step / "checkpoint.json").read_text())["run"]["processes"] == 2
    assert [list(cwd.iterdir()) for cwd in cwds] == [[], []]
    assert (two / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prepared):
    """The uninterrupted run: 6 steps of 8 documents (1 process, 2 accumulation steps, ZeRO-2)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, prepared, "--loop.max_steps", "6", "--loop.grad_accum_steps", "2")
    return read_losses(run)


def _layout(nproc, stage):
    """Arguments for a global batch of 8 documents (micro-batches of 4) on ``nproc`` processes."""
    return {"nproc": nproc, "launcher": "torchrun" if nproc > 1 else "python",
            "args": ("--loop.grad_accum_steps", str(2 // nproc), "--system.zero_stage", str(stage))}  # fmt: skip


def _checkpoint_files(step):
    return {str(p.relative_to(step)): p.stat().st_size for p in step.rglob("*") if p.is_file()}


@pytest.mark.parametrize("before,after,change", [
    ((2, 2), (1, 2), "the number of processes 2 -> 1"),
    ((1, 2), (2, 2), "the number of processes 1 -> 2"),
    ((1, 2), (1, 3), "ZeRO stage 2 -> 3"),
    ((2, 3), (1, 2), "the number of processes 2 -> 1 and ZeRO stage 3 -> 2"),
], ids=["2to1", "1to2", "zero2to3", "zero3x2_to_zero2x1"])  # fmt: skip
def test_resume_on_another_process_count_or_zero_stage(tmp_path, prepared, straight, before, after, change):
    """A checkpoint of 3 steps resumes on another number of processes or ZeRO stage (same global
    batch) through a universal conversion beside it, and the run continues with the uninterrupted
    run's losses: weights, Adam moments and step, schedule and data order all carry over."""
    run = tmp_path / "run"
    first, second = _layout(*before), _layout(*after)
    common = ("--loop.max_steps", "6", "--loop.checkpoint_every", "3")
    train(run, prepared, *common, *first["args"], "--run.stop_after", "3", launcher=first["launcher"],
          nproc=first["nproc"])  # fmt: skip
    step = run / "checkpoints" / STEP3
    files = _checkpoint_files(step)
    out = train(run, prepared, *common, *second["args"], launcher=second["launcher"], nproc=second["nproc"])
    notes = [line for line in out.stderr.splitlines() if line.startswith("train.py: note: resuming")]
    assert len(notes) == 1 and f"resuming {STEP3} with {change} through a DeepSpeed universal checkpoint" in notes[0]
    assert f"converted now into {STEP3}/universal" in notes[0]
    assert "the global batch and data order are unchanged" in notes[0]
    assert f"resumed from {step / 'universal'} (step 3)" in out.stdout
    torch.testing.assert_close(torch.tensor(read_losses(run)), torch.tensor(straight), **TOL)
    # the checkpoint itself is untouched and still verifies; the conversion is kept beside it, hashed
    assert {k: v for k, v in _checkpoint_files(step).items() if not k.startswith("universal/")} == files
    ckpt = Checkpointer(run, keep=2)
    assert ckpt.verify(step)[1] is None
    manifest, why = ckpt.verify(step / "universal")
    assert why is None and manifest["step"] == 3 and "zero/optimizer_state.pt" in manifest["files"]


def test_universal_resume_reuses_its_conversion_refuses_what_cannot_change(tmp_path, prepared):
    """A verified conversion is reused; a damaged one is moved to checkpoints/rejected/ and made
    again. run.resume_universal false, a changed global batch and ZeRO stage 0 are refused in one
    line, before anything is converted."""
    run = tmp_path / "run"
    common = ("--loop.max_steps", "6", "--loop.checkpoint_every", "3")
    train(run, prepared, *common, "--run.stop_after", "3")  # 1 process, ZeRO-2, global batch 8
    step = run / "checkpoints" / STEP3

    def refused(*args):
        out = train(run, prepared, *common, *args, check=False)
        errors = [line for line in out.stderr.splitlines() if "error" in line]
        assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert not (step / "universal").exists()
        return errors[0]

    line = refused("--system.zero_stage", "3", "--run.resume_universal", "false")
    assert f"cannot resume from {step}" in line and "system.zero_stage 2 -> 3 (run.resume_universal true would" in line
    line = refused("--loop.grad_accum_steps", "4", "--system.zero_stage", "3")  # 4 x 4 x 1 = 16 documents per step
    assert "the global batch (loop.micro_batch_documents x loop.grad_accum_steps x processes) 8 -> 16" in line
    assert "zero_stage" not in line  # that alone would be converted
    line = refused("--system.zero_stage", "0")
    assert "system.zero_stage 2 -> 0 (DeepSpeed converts the optimizer state only between ZeRO stages 1-3)" in line

    again = ("--system.zero_stage", "3", "--run.resume", str(step), "--run.stop_after", "1")
    out = train(run, prepared, *common, *again)
    assert f"converted now into {STEP3}/universal" in out.stderr
    out = train(run, prepared, *common, *again)  # step 4 of the line before is moved to superseded/
    assert f"its conversion {STEP3}/universal, made earlier, verified" in out.stderr
    damaged = step / "universal" / "zero" / "input_proj.weight" / "exp_avg.pt"
    damaged_bytes = damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 1])
    damaged.write_bytes(damaged_bytes)
    out = train(run, prepared, *common, *again)
    moved = run / "checkpoints" / "rejected" / f"{STEP3}-universal"
    assert (f"its earlier conversion is unusable (zero/input_proj.weight/exp_avg.pt failed its checksum; moved to "
            f"{moved}); converted now into {STEP3}/universal") in out.stderr  # fmt: skip
    assert (moved / "zero" / "input_proj.weight" / "exp_avg.pt").read_bytes() == damaged_bytes  # kept as it was
    assert Checkpointer(run, keep=2).verify(step / "universal")[1] is None


def test_a_checkpoint_deepspeed_cannot_convert_is_named_in_one_error(tmp_path):
    """DeepSpeed's converter failing (here: no ZeRO optimizer files) ends in a CheckpointError
    naming the checkpoint and DeepSpeed's reason; nothing is left beside it or in staging."""
    from training.checkpoint import CheckpointError
    from training.universal import universal_checkpoint

    step = tmp_path / "checkpoints" / STEP3
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    manifest = {"format_version": 1, "step": 3, "files": {}, "run": {}}
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"cannot convert checkpoint {step} to a DeepSpeed universal checkpoint: "
                                              "can't find \\*_optim_states.pt files"):  # fmt: skip
        universal_checkpoint(Checkpointer(tmp_path, keep=2), step, manifest)
    assert sorted(p.name for p in step.iterdir()) == ["checkpoint.json", "mp_rank_00_model_states.pt"]
    assert list((tmp_path / "checkpoints" / ".staging").iterdir()) == []


def test_the_trainer_decides_whether_deepspeed_loads_a_universal_checkpoint(tmp_path):
    """checkpoint.load_universal is set only for a universal conversion, whatever the template
    says (a template's true would make DeepSpeed misread every ordinary checkpoint)."""
    from training.config import load_config
    from training.engine import CONFIG_DIR, build_ds_config

    template = json.loads((CONFIG_DIR / "zero2.json").read_text()) | {"checkpoint": {"load_universal": True}}
    (tmp_path / "ds.json").write_text(json.dumps(template))
    cfg = load_config(None, {"system.deepspeed_config": str(tmp_path / "ds.json")})
    assert build_ds_config(cfg, 1)["checkpoint"] == {"load_universal": False}
    assert build_ds_config(cfg, 1, load_universal=True)["checkpoint"] == {"load_universal": True}
