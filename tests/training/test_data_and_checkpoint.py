"""The step schedule (which documents go where), collation, the atomic checkpoint protocol with
its verification and fallback, the run identity, and the run-directory lock."""

import errno
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training import checkpoint
from training.checkpoint import Checkpointer, CheckpointError, nonfinite_parameters
from training.data import StepSchedule, collate
from training.identity import compare
from training.universal import universal_changes
from training.runlock import RunLock, RunLockedError
from training.shards import ShardedDocuments


def _schedule(prepared, micro, accum, world, seed=0):
    return StepSchedule(ShardedDocuments(prepared, "train"), micro=micro, accum=accum, world=world, seed=seed,
                        duplicate_eos=True)  # fmt: skip


def test_each_epoch_visits_documents_once_and_ranks_partition_steps(prepared):
    s = _schedule(prepared, micro=4, accum=2, world=2)
    assert s.steps_per_epoch == 48 // 16
    seen = Counter()
    for step in range(s.steps_per_epoch):
        parts = [s.micro_documents(step, m, r) for m in range(2) for r in range(2)]
        assert sorted(d for p in parts for d in p) == sorted(s.step_documents(step))
        seen.update(s.step_documents(step))
    assert set(seen.values()) == {1} and len(seen) == 48
    assert s.step_documents(s.steps_per_epoch) != s.step_documents(0)  # a new epoch reshuffles


def test_one_process_and_two_processes_see_the_same_steps(prepared):
    one, two = _schedule(prepared, 4, 2, 1), _schedule(prepared, 4, 1, 2)
    for step in range(5):
        assert one.step_documents(step) == two.step_documents(step)
        assert one.step_counts(step) == two.step_counts(step)


def test_step_counts_match_collated_targets(prepared):
    s = _schedule(prepared, 4, 2, 1)
    docs = ShardedDocuments(prepared, "train")
    labels = preds = 0
    for m in range(2):
        batch = collate([docs[d] for d in s.micro_documents(0, m, 0)], eos_idx=3, duplicate_eos=True)
        labels += batch.targets.num_tokens
        preds += batch.pred_index_N.numel()
        torch.testing.assert_close(batch.target_embeds_NE, batch.embeds_TE[batch.pred_index_N + 1])
    assert s.step_counts(0) == (labels, preds)


def test_too_few_documents_for_one_step_is_an_error(prepared):
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        _schedule(prepared, micro=16, accum=2, world=2)


class _FakeEngine:
    """Writes DeepSpeed-like files; can die half-way through a save, or fail like a full disk."""

    def __init__(self, die=False, fail=None):
        self.die, self.fail = die, fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_text(str(client_state["step"]))
        if self.die:
            raise KeyboardInterrupt("killed during the save")
        if self.fail is not None:
            raise self.fail
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("optim")


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    first = ckpt.save(_FakeEngine(), 100, {})
    assert ckpt.latest() == first
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_FakeEngine(die=True), 200, {})
    assert ckpt.latest() == first and (first / "mp_rank_00_model_states.pt").read_text() == "100"
    assert not (tmp_path / "checkpoints" / "step-00000200").exists()
    ckpt.save(_FakeEngine(), 300, {})  # the next save clears the leftovers
    ckpt.save(_FakeEngine(), 400, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".staging", "latest", "step-00000300", "step-00000400"]
    assert list((tmp_path / "checkpoints" / ".staging").iterdir()) == []


def test_resaving_a_step_keeps_the_published_checkpoint_and_rotation_follows_steps(tmp_path):
    """After resuming from an older checkpoint, a save of an existing step gets a new name (a
    published checkpoint is never replaced) and counts as newer than the first save of that step."""
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(_FakeEngine(), 5, {})
    nine = ckpt.save(_FakeEngine(), 9, {})
    again = ckpt.save(_FakeEngine(), 5, {})  # resumed from step 5 and saved it again
    assert again.name == "step-00000005-r1" and ckpt.latest() == nine
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000005-r1", "step-00000009"]
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")  # dangling pointer
    assert ckpt.latest() == nine and ckpt.candidates() == [nine, again]


def test_checkpoints_are_ordered_by_step_not_by_file_times_or_the_pointer(tmp_path):
    """A copy or a restore changes directory times, and a kill or a full disk between publishing a
    checkpoint and moving `latest` leaves the pointer behind: neither decides which checkpoint is
    resumed, and rotation never deletes an intact newer one."""
    ckpt = Checkpointer(tmp_path, keep=3)
    saved = [ckpt.save(_FakeEngine(), step, {}) for step in (1, 2, 3, 4)]
    os.utime(saved[2], (0, 0))  # step 3 now looks the oldest
    (saved[3] / "mp_rank_00_model_states.pt").write_text("x")  # step 4 corrupted
    path, _, rejected = ckpt.newest_verified()
    assert path == saved[2] and [p for p, _ in rejected] == [saved[3]]
    ckpt.reject(saved[3])
    ckpt.save(_FakeEngine(), 4, {})
    five = ckpt.save(_FakeEngine(), 5, {})
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-00000003", "step-00000004", "step-00000005"]
    (ckpt.root / "latest").write_text("step-00000004\n")  # step 5 published, the pointer not yet moved
    assert ckpt.latest() == five and ckpt.newest_verified()[0] == five


@pytest.mark.parametrize("pointer", ["", "\n", ".", "..", "rejected", "/tmp"])
def test_an_empty_or_garbled_latest_pointer_does_not_block_resuming(tmp_path, pointer):
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(_FakeEngine(), 1, {})
    newest = ckpt.save(_FakeEngine(), 2, {})
    (ckpt.root / "rejected").mkdir()
    (ckpt.root / "latest").write_text(pointer)
    path, manifest, rejected = ckpt.newest_verified()
    assert path == newest and manifest["step"] == 2 and rejected == []
    for folder in (ckpt.root, ckpt.root / "rejected", tmp_path):  # never moved aside, whatever is asked
        with pytest.raises(CheckpointError, match="it is not a checkpoint folder"):
            ckpt.reject(folder)
        assert folder.is_dir()


def test_resume_takes_the_newest_checkpoint_that_verifies_and_names_the_others(tmp_path):
    """Corrupted bytes, a truncated optimizer file, an empty model-states file and a checkpoint
    without checkpoint.json are each rejected with the reason; the intact one is chosen."""
    ckpt = Checkpointer(tmp_path, keep=5)
    saved = [ckpt.save(_FakeEngine(), step, {}, {"model.objective": "sonar"}) for step in (1, 2, 3, 4, 5)]
    (saved[4] / "mp_rank_00_model_states.pt").write_bytes(b"\xff")
    optim = saved[3] / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:2])
    (saved[2] / "mp_rank_00_model_states.pt").write_bytes(b"")
    published = saved[1].stat().st_mtime_ns
    (saved[1] / "checkpoint.json").unlink()
    os.utime(saved[1], ns=(published, published))  # as a checkpoint of an older sonarllm
    path, manifest, rejected = ckpt.newest_verified()
    assert path == saved[0] and manifest["step"] == 1 and manifest["run"] == {"model.objective": "sonar"}
    reasons = {p.name: why for p, why in rejected}
    assert reasons == {
        "step-00000005": "mp_rank_00_model_states.pt failed its checksum",
        "step-00000004": "zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated (2 bytes, 5 written)",
        "step-00000003": "mp_rank_00_model_states.pt is empty (0 bytes, 1 written)",
        "step-00000002": "it has no checkpoint.json (incomplete, or written by an older sonarllm)",
    }
    moved = ckpt.reject(saved[4])
    assert moved == tmp_path / "checkpoints" / "rejected" / "step-00000005" and moved.is_dir()
    assert ckpt.candidates()[0] == saved[3]  # the rejected one is out of the way, not deleted
    for p in saved[1:4]:
        ckpt.reject(p)
    assert ckpt.newest_verified() == (saved[0], manifest, [])


@pytest.mark.parametrize("damage, reason", [
    (lambda m: m.pop("files"), "no 'files' table"),
    (lambda m: m.update(files=[]), "no 'files' table"),
    (lambda m: m["files"].update({"mp_rank_00_model_states.pt": {"bytes": 3}}), "no sha256 and size for mp_rank_00"),
    (lambda m: m.update(step="2"), "no integer 'step'"),
    (lambda m: m.update(run=[]), "'run' is not a table"),
])  # fmt: skip
def test_a_damaged_checkpoint_json_is_rejected_with_a_reason(tmp_path, damage, reason):
    ckpt = Checkpointer(tmp_path, keep=3)
    first, second = ckpt.save(_FakeEngine(), 1, {}), ckpt.save(_FakeEngine(), 2, {})
    manifest = json.loads((second / "checkpoint.json").read_text())
    damage(manifest)
    (second / "checkpoint.json").write_text(json.dumps(manifest))
    path, _, rejected = ckpt.newest_verified()
    assert path == first and [p for p, _ in rejected] == [second]
    assert rejected[0][1].startswith(f"its checkpoint.json is damaged ({reason}")


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=2)
    first = ckpt.save(_FakeEngine(), 1, {})
    full = _FakeEngine(fail=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(CheckpointError, match="cannot write checkpoint step-00000002 .*: out of space .*; "
                                              "the previous checkpoint step-00000001 is intact"):  # fmt: skip
        ckpt.save(full, 2, {})
    # torch.save reports a full disk without an errno; the free space tells
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: SimpleNamespace(free=512))
    with pytest.raises(CheckpointError, match=r"out of space on the filesystem of .*\(512 bytes free\)"):
        ckpt.save(_FakeEngine(fail=RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3904 vs 3796")), 2, {})
    assert ckpt.latest() == first and ckpt.newest_verified()[0] == first
    assert not (tmp_path / "checkpoints" / ".staging").exists()  # the partial files are gone
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="RuntimeError: something else"):
        ckpt.save(_FakeEngine(fail=RuntimeError("something else")), 2, {})


def test_nonfinite_parameters_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert nonfinite_parameters(model) == ["1.bias"]
    partitioned = torch.nn.Linear(2, 2)  # under ZeRO-3 the local partition is param.ds_tensor
    partitioned.weight.ds_tensor = torch.tensor([float("inf")])
    assert nonfinite_parameters(partitioned) == ["weight"]


def _identity(**changes):
    base = {"data": {"source_sha256": "a", "sonar": {"decoder": "d1"}}, "model": {"num_layers": 2},
            "model.objective": "sonar", "data.duplicate_eos": True, "run.seed": 0, "global batch": 8,
            "system.zero_stage": 2, "system.precision": "fp32", "processes": 1}  # fmt: skip
    return base | changes


def test_resume_compares_what_defines_the_run():
    assert compare(_identity(), _identity()) == ([], [])
    refused, _ = compare(_identity(), _identity(data={"source_sha256": "a", "sonar": {"decoder": "d2"}},
                                                  model={"num_layers": 3}, **{"model.objective": "mse"}))  # fmt: skip
    assert refused == ["the prepared data (sonar differ)", "the model (num_layers 2 -> 3)", "model.objective 'sonar' -> 'mse'"]
    refused, _ = compare(_identity(), _identity(processes=2, **{"global batch": 16}))
    assert refused[0].startswith("the global batch")
    assert refused[1] == ("the number of processes 1 -> 2 (run.resume_universal true would convert it through a "
                          "DeepSpeed universal checkpoint)")  # fmt: skip
    # between ZeRO stages 1-3 a universal checkpoint conversion resolves the process count and the stage
    two_zero3 = _identity(processes=2, **{"system.zero_stage": 3})
    assert compare(_identity(), two_zero3, universal=True) == ([], [])
    assert universal_changes(_identity(), two_zero3) == ["the number of processes 1 -> 2", "ZeRO stage 2 -> 3"]
    assert compare(_identity(), two_zero3)[0][0].startswith("system.zero_stage 2 -> 3 (run.resume_universal true")
    refused, _ = compare(_identity(), _identity(processes=2, **{"global batch": 16}), universal=True)
    assert [r.split(" (")[0] for r in refused] == ["the global batch"]  # the global batch still cannot change
    refused, _ = compare(_identity(), _identity(**{"system.zero_stage": 0}), universal=True)
    assert refused == ["system.zero_stage 2 -> 0 (DeepSpeed converts the optimizer state only between ZeRO stages 1-3)"]
    assert universal_changes(_identity(**{"system.zero_stage": 0}), _identity(processes=2)) == []
    # ZeRO stage 0 in fp32 keeps the whole optimizer state in every process: resumable
    zero0 = {"system.zero_stage": 0}
    refused, allowed = compare(_identity(**zero0), _identity(processes=2, **zero0))
    assert refused == [] and allowed[0].startswith("the number of processes 1 -> 2 (ZeRO stage 0")
    refused, _ = compare(_identity(**zero0), _identity(processes=2, **zero0, **{"system.precision": "bf16"}))
    assert any("processes" in r for r in refused) and any("system.precision" in r for r in refused)


def test_one_run_per_directory_and_a_stale_lock_is_taken_over(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(RunLockedError, match=f"in use by another training run \\(pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing stale
    again._fd and os.close(again._fd)  # the process "dies": the kernel drops the lock, the record stays
    again._fd = None
    stale = RunLock(tmp_path).acquire()
    assert stale is not None and stale["pid"] == os.getpid()


def test_a_filesystem_without_file_locks_is_named_in_one_line(tmp_path, monkeypatch):
    import errno

    import training.runlock as runlock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.raises(RunLockedError, match="cannot be locked .*does not support flock"):
        RunLock(tmp_path).acquire()
