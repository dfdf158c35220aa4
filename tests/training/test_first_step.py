"""The trainer reports how long its first step took from process start (kernel compilation
included): the number bench/gpu_suite.sh reads for the CUDA time-to-first-step goal."""

import json

from tests.training.test_train import train


def test_first_step_time_is_logged_once(tmp_path, prepared):
    run = tmp_path / "run"
    out = train(run, prepared, "--loop.max_steps", "3", "--loop.log_every", "1")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if "first_step_s" in r]
    assert len(first) == 1 and first[0]["step"] == 1
    assert 0 < first[0]["first_step_s"] < 600
    assert "first step done" in out.stdout
    assert len([r for r in records if "loss" in r]) == 3, "the loss records are unchanged"
