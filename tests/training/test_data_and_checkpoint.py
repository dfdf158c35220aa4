"""The step schedule (which documents go where), collation, and the atomic checkpoint protocol."""

from collections import Counter

import pytest
import torch

from training.checkpoint import Checkpointer
from training.data import StepSchedule, collate
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
    """Writes DeepSpeed-like files; can die half-way through a save."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = __import__("pathlib").Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_text(str(client_state["step"]))
        if self.die:
            raise KeyboardInterrupt("killed during the save")
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


def test_resaving_a_step_keeps_the_published_checkpoint_and_rotation_follows_time(tmp_path):
    """After resuming from an older checkpoint, a save of an existing step gets a new name (the
    directory `latest` names is never replaced) and rotation keeps the newest published ones."""
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(_FakeEngine(), 5, {})
    ckpt.save(_FakeEngine(), 9, {})
    again = ckpt.save(_FakeEngine(), 5, {})  # resumed from step 5 and saved it again
    assert again.name == "step-00000005-r1" and ckpt.latest() == again
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000005-r1", "step-00000009"]
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")  # dangling pointer
    assert ckpt.latest() == again  # the newest published checkpoint
