"""Training runs under injected faults (subprocesses, the smallest configuration): corrupted,
truncated and empty checkpoint files, a loss or parameters that turn NaN, a resume into another
run, another number of processes, a full disk, and start-up faults. Each ends in one clear line
and loses nothing a user made."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import read_losses
from tests.training.test_train import REPO, SCRIPT, _command, _env, train
from training import prepare_data
from training.config import EXAMPLE_CORPUS
from training.shards import sha256_file

CKPT = ("--loop.checkpoint_every", "1", "--loop.keep_checkpoints", "4")


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, prepared):
    """A run of 4 steps with a checkpoint after each (ZeRO stage 2, one process)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(run, prepared, "--loop.max_steps", "4", *CKPT)
    return run


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _checkpoints(run):
    root = run / "checkpoints"
    return sorted(p.name for p in root.glob("step-*")), (root / "latest").read_text().strip()


def _one_line(err, *fragments):
    """The last line of stderr is the error; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def _resign(folder):
    """Rewrite checkpoint.json's digests, as if the files had been written like this."""
    manifest = json.loads((folder / "checkpoint.json").read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(folder / name), bytes=(folder / name).stat().st_size)
    (folder / "checkpoint.json").write_text(json.dumps(manifest))


def test_corrupted_truncated_and_empty_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    ckpts = run / "checkpoints"
    with open(ckpts / "step-00000004" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.seek(3000)
        f.write(b"\xff" * 256)
    optim = ckpts / "step-00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    (ckpts / "step-00000002" / "mp_rank_00_model_states.pt").write_bytes(b"")
    out = train(run, prepared, "--loop.max_steps", "4", *CKPT)
    for step, why in (("4", "mp_rank_00_model_states.pt failed its checksum"),
                      ("3", "zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated (1000 bytes"),
                      ("2", "mp_rank_00_model_states.pt is empty")):  # fmt: skip
        assert f"checkpoint step-0000000{step} is unusable ({why}" in out.stderr
        assert (ckpts / "rejected" / f"step-0000000{step}").is_dir()  # kept for inspection
    assert "(step 1)" in out.stdout
    # the run continued exactly as the original did from step 1
    torch.testing.assert_close(torch.tensor(read_losses(run)), torch.tensor(read_losses(four_steps)), rtol=2e-7, atol=0)
    assert _checkpoints(run) == (["step-00000001", "step-00000002", "step-00000003", "step-00000004"], "step-00000004")


def test_a_checkpoint_from_before_checksums_resumes_only_when_named(tmp_path, prepared, four_steps):
    """An older sonarllm wrote no checkpoint.json: "auto" stops and says how to resume it; naming it
    in run.resume resumes it unverified (with a warning), exactly where the original run was."""
    run = _copy(four_steps, tmp_path)
    ckpts = run / "checkpoints"
    for folder in ckpts.glob("step-*"):
        (folder / "checkpoint.json").unlink()
    before = _checkpoints(run)
    out = train(run, prepared, "--loop.max_steps", "4", *CKPT, check=False)
    assert out.returncode == 1
    _one_line(out.stderr, "no checkpoint in", "has no checkpoint.json",
              f"resumed unverified with run.resume {ckpts / 'step-00000004'}")  # fmt: skip
    assert _checkpoints(run) == before  # nothing moved aside
    out = train(run, prepared, "--loop.max_steps", "4", *CKPT, "--run.resume", str(ckpts / "step-00000002"))
    assert "predates checksums" in out.stderr and "(step 2)" in out.stdout
    torch.testing.assert_close(torch.tensor(read_losses(run)), torch.tensor(read_losses(four_steps)), rtol=2e-7, atol=0)


def test_nonfinite_loss_or_parameters_stop_without_replacing_checkpoints(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    latest = run / "checkpoints" / "step-00000004"
    before = _checkpoints(run)
    model_file, optim_file = latest / "mp_rank_00_model_states.pt", latest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    original = model_file.read_bytes()
    state = torch.load(model_file, weights_only=False)
    state["module"]["output_proj.weight"].fill_(float("nan"))
    torch.save(state, model_file)
    _resign(latest)
    out = train(run, prepared, "--loop.max_steps", "6", *CKPT, check=False)
    assert out.returncode == 1
    _one_line(out.stderr, "the training loss became nan at step 5", "stopped without writing a checkpoint",
              f"the last checkpoint is {latest}")  # fmt: skip
    assert _checkpoints(run) == before

    model_file.write_bytes(original)  # finite weights, but an optimizer state that makes them NaN
    state = torch.load(optim_file, weights_only=False)
    state["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg_sq"].fill_(float("nan"))
    torch.save(state, optim_file)
    _resign(latest)
    out = train(run, prepared, "--loop.max_steps", "6", *CKPT, check=False)
    assert out.returncode == 1
    _one_line(out.stderr, "the model's parameters became NaN or inf by step 5", "stopped without writing a checkpoint")
    assert _checkpoints(run) == before


def test_resuming_into_another_run_is_refused_in_one_line(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    other = tmp_path / "other_sonar"  # the same corpus, prepared with another toy SONAR
    manifest = json.loads((prepared / "manifest.json").read_text())
    args = prepare_data.parse_args(["--source", manifest["options"]["source"], "--out", str(other), "--eval-documents",
                                    "16", "--shard-documents", "20", "--toy-vocab-size", "300", "--toy-seed", "1",
                                    "--toy-train-steps", "0", "--quiet"])  # fmt: skip
    prepare_data.prepare(args)
    before = _checkpoints(run)
    out = train(run, other, "--loop.max_steps", "6", "--model.objective", "mse", "--model.overrides.num_layers", "3",
                "--system.zero_stage", "3", check=False)  # fmt: skip
    assert out.returncode == 2
    line = _one_line(out.stderr, "cannot resume from", "step-00000004", "the prepared data (sonar differ)",
                     "the model (num_layers 2 -> 3)", "model.objective 'sonar' -> 'mse'",
                     "start fresh with another run.output_dir")  # fmt: skip
    assert "zero_stage" not in line  # a universal checkpoint conversion would resolve that one (test_cluster.py)
    assert not list(run.glob("checkpoints/*/universal"))  # refused before converting anything
    assert _checkpoints(run) == before


def test_zero_stage_0_resumes_with_another_number_of_processes(tmp_path, prepared):
    """Every process holds the whole optimizer state under ZeRO stage 0: a run written by one
    process continues on two, with the same global batch, exactly."""
    one = tmp_path / "one"
    common = ("--loop.max_steps", "3", "--system.zero_stage", "0", *CKPT)
    train(one, prepared, *common, "--loop.grad_accum_steps", "2")
    two = shutil.copytree(one, tmp_path / "two")
    shutil.rmtree(two / "checkpoints" / "step-00000002")
    shutil.rmtree(two / "checkpoints" / "step-00000003")
    (two / "checkpoints" / "latest").unlink()
    out = train(two, prepared, *common, "--loop.grad_accum_steps", "1", launcher="torchrun", nproc=2)
    assert "resuming step-00000001 with the number of processes 1 -> 2" in out.stderr and "(step 1)" in out.stdout
    torch.testing.assert_close(torch.tensor(read_losses(two)), torch.tensor(read_losses(one)), rtol=1e-5, atol=1e-6)


def _can_mount(*unshare_args: str, mount: str) -> bool:
    """Whether this user may mount in a new namespace (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", *unshare_args, "sh", "-c", mount], capture_output=True).returncode == 0


def test_a_full_disk_during_a_checkpoint_says_so(tmp_path, prepared):
    """A real 3 MB filesystem: the first checkpoint (1.7 MB) fits, the second does not. (The
    in-process variant, test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint,
    runs where mounting is not allowed.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tmpfs = f"mount -t tmpfs -o size=3m tmpfs {shlex.quote(str(mnt))}"
    if not _can_mount("-rm", mount=tmpfs):
        pytest.skip("mounting a tmpfs is not allowed here (the in-process ENOSPC test covers the logic)")
    cmd = shlex.join(map(str, _command(mnt / "run", prepared, "--loop.max_steps", "4", "--loop.checkpoint_every", "1")))
    script = f"{tmpfs} && {cmd}; echo exit=$?; cp -r {shlex.quote(str(mnt / 'run'))} {shlex.quote(str(tmp_path / 'after'))}"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert "exit=1" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    _one_line(out.stderr, "cannot write checkpoint step-00000002", "out of space",
              "the previous checkpoint step-00000001 is intact")  # fmt: skip
    after = tmp_path / "after" / "checkpoints"
    assert (after / "latest").read_text().strip() == "step-00000001" and not (after / ".staging").exists()


def test_a_mistyped_prepared_dir_is_not_prepared_from_the_example(tmp_path):
    typo = train(tmp_path / "run", tmp_path / "prepraed", check=False)
    assert typo.returncode == 2
    _one_line(typo.stderr, f"data.prepared_dir {tmp_path / 'prepraed'} holds no prepared data", "data.source is empty")
    assert not (tmp_path / "prepraed").exists()


def test_a_read_only_output_dir_ends_in_one_line(tmp_path, prepared):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    cmd = [sys.executable, SCRIPT, "--run.output_dir", str(readonly / "run"), "--data.prepared_dir", str(prepared)]
    if os.geteuid() == 0:  # root writes anywhere: make the directory read-only for real
        bind = f"mount --bind -o ro {shlex.quote(str(readonly))} {shlex.quote(str(readonly))}"
        if not _can_mount("-m", mount=bind):
            pytest.skip("running as root where a read-only bind mount is not allowed: nothing is read-only to root")
        cmd = ["unshare", "-m", "sh", "-c", f'{bind} && exec "$@"', "sh", *cmd]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    _one_line(out.stderr, f"cannot use run.output_dir {readonly / 'run'}: ")


def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    before = (run / "config.json").read_bytes()
    out = train(run, prepared, "--loop.max_steps", "5", "--model.objective", "mse", check=False)
    assert out.returncode == 2
    _one_line(out.stderr, "cannot resume from", "model.objective 'sonar' -> 'mse'")
    assert (run / "config.json").read_bytes() == before


def test_an_interrupted_last_line_of_metrics_jsonl_does_not_block_resuming(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed (or out of space) while writing a record
    out = train(run, prepared, "--loop.max_steps", "5")
    assert "train.py: warning: dropped the incomplete last line of" in out.stderr and "(step 4)" in out.stdout
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())][-1] == 5


def _damaged_copy(prepared, tmp_path, name, size):
    data = shutil.copytree(prepared, tmp_path / "data")
    with open(data / name, "r+b") as f:
        f.truncate(size)
    return data


def test_a_truncated_prepared_manifest_ends_in_one_line(tmp_path, prepared):
    data = _damaged_copy(prepared, tmp_path, "manifest.json", 100)
    out = train(tmp_path / "run", data, check=False)
    assert out.returncode == 1
    _one_line(out.stderr, f"{data / 'manifest.json'} is corrupted")


def test_a_truncated_shard_unverified_ends_in_one_line_naming_it(tmp_path, prepared):
    data = _damaged_copy(prepared, tmp_path, "train-00001.safetensors", 1000)
    out = train(tmp_path / "run", data, "--data.verify_checksums", "false", check=False)
    assert out.returncode == 1
    _one_line(out.stderr, f"shard train-00001.safetensors of data.prepared_dir {data} cannot be read",
              "data.verify_checksums true", "rebuild it with: ")  # fmt: skip


def test_changed_optimizer_settings_apply_on_resume_as_config_json_says(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    out = train(run, prepared, "--loop.max_steps", "5", "--optim.lr", "0.3", "--optim.beta1", "0.8",
                "--optim.eps", "1e-6", "--optim.weight_decay", "0.05", *CKPT)  # fmt: skip
    assert "(step 4)" in out.stdout
    for note in ("optim.lr 0.3 (checkpoint had 0.003)", "optim.beta1 0.8 (checkpoint had 0.9)",
                 "optim.eps 1e-06 (checkpoint had 1e-05)", "optim.weight_decay 0.05 (checkpoint had 0.01)"):  # fmt: skip
        assert f"train.py: note: resuming with {note}" in out.stderr
    # no warmup, cosine from 0.3 to 0.3 * 0.1 over the 5 steps; step 5 is the fifth (index 4)
    expected = 0.3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] == 5 and "lr" in r]
    assert logged[0]["lr"] == pytest.approx(expected, rel=1e-6)
    state = torch.load(run / "checkpoints" / "step-00000005" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)  # fmt: skip
    group = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][0]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.8, 0.999), 1e-6, 0.05)
    recorded = json.loads((run / "config.json").read_text())["optim"]
    assert (recorded["lr"], recorded["beta1"], recorded["eps"], recorded["weight_decay"]) == (0.3, 0.8, 1e-6, 0.05)


def test_data_settings_other_than_the_prepared_ones_are_refused(tmp_path, prepared, four_steps):
    """A complete preparation is used as it is: a data.* setting that differs from it is refused
    (the fixture's data was prepared with 16 evaluation documents; the runs leave the default 100)."""
    run = _copy(four_steps, tmp_path)
    before = (run / "config.json").read_bytes()
    for key, value, prepared_value in (("max_sentences", "4", "32"), ("eval_documents", "8", "16"),
                                       ("lang", "fra_Latn", "'eng_Latn'"), ("sonar", "basic", "'toy'")):  # fmt: skip
        out = train(run, prepared, "--loop.max_steps", "5", f"--data.{key}", value, check=False)
        assert out.returncode == 2
        _one_line(out.stderr, f"data.{key} is ", f"but data.prepared_dir {prepared} was prepared with {prepared_value}")
    assert (run / "config.json").read_bytes() == before


def test_run_resume_naming_a_folder_that_is_not_a_checkpoint_says_so(tmp_path, prepared, four_steps):
    run = _copy(four_steps, tmp_path)
    for folder in (run / "checkpoints", run):
        out = train(run, prepared, "--loop.max_steps", "5", "--run.resume", str(folder), check=False)
        assert out.returncode == 2 and "predates checksums" not in out.stderr
        _one_line(out.stderr, f"run.resume {folder} is not a checkpoint", "name one of the step-* folders")


def test_resuming_explicitly_from_an_older_step_sets_the_later_checkpoints_aside(tmp_path, prepared, four_steps):
    """run.resume step-2 starts a new line of the run: the old steps 3 and 4 move to
    checkpoints/superseded/ (kept), so the new line's checkpoints are the ones resumed and rotated."""
    run = _copy(four_steps, tmp_path)
    ckpts = run / "checkpoints"
    out = train(run, prepared, "--loop.max_steps", "4", *CKPT, "--run.resume", str(ckpts / "step-00000002"))
    for step in (3, 4):
        assert f"the later checkpoint step-0000000{step} is moved to {ckpts / 'superseded'}" in out.stderr
        assert (ckpts / "superseded" / f"step-0000000{step}" / "checkpoint.json").is_file()
    assert _checkpoints(run) == (["step-00000001", "step-00000002", "step-00000003", "step-00000004"], "step-00000004")
    torch.testing.assert_close(torch.tensor(read_losses(run)), torch.tensor(read_losses(four_steps)), rtol=2e-7, atol=0)


def test_a_diverging_run_logs_the_steps_before_the_failure(tmp_path, prepared):
    """log_every 4, loss NaN at step 2 (lr 1e30): step 1's finite loss is in metrics.jsonl."""
    run = tmp_path / "run"
    out = train(run, prepared, "--loop.max_steps", "4", "--loop.log_every", "4", "--optim.lr", "1e30", check=False)
    assert out.returncode == 1
    _one_line(out.stderr, "the training loss became nan at step 2")
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [1] and math.isfinite(logged[0]["loss"])


def test_checkpoints_carry_deepspeeds_recovery_script(four_steps):
    """zero_to_fp32.py (DeepSpeed writes it beside the checkpoint folder) is part of each
    published checkpoint, hashed with it, and nothing is left in the staging directory."""
    step = four_steps / "checkpoints" / "step-00000004"
    assert (step / "zero_to_fp32.py").is_file()
    assert "zero_to_fp32.py" in json.loads((step / "checkpoint.json").read_text())["files"]
    assert not list((four_steps / "checkpoints" / ".staging").glob("*"))


def test_a_training_split_smaller_than_one_step_is_refused_in_one_line(tmp_path, prepared):
    """48 training documents, one optimizer step of 10**9 x 2: refused at start-up, exit 2."""
    run = tmp_path / "run"
    out = train(run, prepared, "--loop.micro_batch_documents", str(10**9), check=False)
    assert out.returncode == 2
    _one_line(out.stderr, f"the training split of data.prepared_dir {prepared} has 48 documents",
              f"loop.micro_batch_documents {10**9} x loop.grad_accum_steps 2 x 1 process(es) = {2 * 10**9}")  # fmt: skip
    assert not (run / "config.json").exists()


def test_documents_longer_than_the_model_are_refused_at_start_up(tmp_path):
    """Data prepared with 40 sentences per document (41 with the end sentence) for a model of 36
    positions (data.max_sentences keeps its default, 32, which fits): refused before the first step."""
    corpus = tmp_path / "long.txt"
    doc = " ".join(f"Sentence number {i} is about the cat." for i in range(45))
    corpus.write_text("\n\n".join([doc] * 4) + "\n")
    data = tmp_path / "data"
    prepare_data.prepare(prepare_data.parse_args([
        "--source", str(corpus), "--out", str(data), "--max-sentences", "40", "--eval-documents", "1",
        "--toy-vocab-size", "100", "--toy-train-steps", "0", "--quiet"]))  # fmt: skip
    out = train(tmp_path / "run", data, "--model.overrides.max_seq_len", "36", "--loop.micro_batch_documents", "1",
                "--loop.grad_accum_steps", "1", check=False)
    assert out.returncode == 2
    _one_line(out.stderr, f"data.prepared_dir {data} holds documents of up to 41 sentences",
              "data.max_sentences 40", "max_seq_len 36", "set model.overrides.max_seq_len 41",
              "data.max_sentences 35")  # fmt: skip


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, prepared):
    """model_dim 2**20: trillions of parameters, hundreds of TiB of model state (never allocated)."""
    out = train(tmp_path / "run", prepared, "--model.overrides.model_dim", str(2**20), check=False)
    assert out.returncode == 2
    line = _one_line(out.stderr, "model.preset 'toy' with model.overrides {'model_dim': 1048576}",
                     "trainable parameters; training it needs at least", "16 bytes per parameter in fp32",
                     "available on this machine", "system.zero_stage 3")  # fmt: skip
    assert "ZeRO stage 2" not in line  # one process: nothing is sharded


def _start(run_dir, prepared, *args, env=None):
    return subprocess.Popen(_command(run_dir, prepared, *args), cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_second_signal_interrupts_in_one_line(tmp_path, prepared):
    """SIGTERM asks for a stop at the end of the step; a second one, 0.1 s later (during the step
    or the checkpoint), interrupts at once: one line naming the last checkpoint, exit 130."""
    import signal
    import time

    proc = _start(tmp_path / "run", prepared, "--loop.max_steps", "100000")
    try:
        for line in proc.stdout:
            if line.startswith("first step done"):
                break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    if proc.returncode == -signal.SIGTERM:  # the second signal came during the shutdown: ended silently
        return
    assert proc.returncode == 130
    _one_line(err, "interrupted; ")


def test_sigterm_during_first_use_preparation_leaves_no_scratch(tmp_path):
    """The first run prepares data.prepared_dir (a toy SONAR built in a scratch folder): SIGTERM
    then ends it in one line, exit 130, and the scratch folder is removed."""
    import signal
    import time

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    proc = _start(tmp_path / "run", tmp_path / "data", "--data.source", EXAMPLE_CORPUS,
                  env=_env() | {"TMPDIR": str(scratch_root)})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(scratch_root.glob("sonarllm-toy-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(scratch_root.glob("sonarllm-toy-*")), "no toy SONAR scratch folder appeared"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    _one_line(err, "interrupted; no checkpoint was written")
    assert not list(scratch_root.glob("sonarllm-toy-*"))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)"),
])  # fmt: skip
def test_an_allocation_failure_ends_in_one_line(tmp_path, prepared, capsys, monkeypatch, error):
    """What the estimate cannot foresee (activations, fragmentation) fails in one line, exit 1;
    another RuntimeError is not disguised as one."""
    import training.train as train_module

    def build(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_module, "Trainer", build)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from tests.training.test_train import _port

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_port()), "OMP_NUM_THREADS": "1"}.items():  # a world of one, undone after
        monkeypatch.setenv(key, value)
    argv = ["--run.output_dir", str(tmp_path / "run"), "--data.prepared_dir", str(prepared), "--system.progress", "false"]
    assert train_module.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train.py: error: out of memory: {str(error).splitlines()[0]}")

    monkeypatch.setattr(train_module, "Trainer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        train_module.main(argv)
