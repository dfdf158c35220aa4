"""metrics.jsonl on resume: records after the checkpoint's step dropped, an interrupted last line
dropped with a warning, a damaged line elsewhere named."""

import json

import pytest

from training.metrics import MetricsError, MetricsLog


def _log(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    return MetricsLog(tmp_path, enabled=True)


def _steps(tmp_path):
    return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_records_after_the_resumed_step_are_dropped(tmp_path):
    log = _log(tmp_path, "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    assert log.truncate_after(2) is None
    assert _steps(tmp_path) == [1, 2]


@pytest.mark.parametrize("tail", ['{"step": 5, "lo', '{"step": 1, "loss": 1.0}\x00\x00', "garbage\n", "[5]"])
def test_an_incomplete_last_line_is_dropped_with_a_warning(tmp_path, tail):
    log = _log(tmp_path, '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n' + tail)
    warning = log.truncate_after(4)
    assert warning.startswith(f"dropped the incomplete last line of {tmp_path / 'metrics.jsonl'}")
    assert _steps(tmp_path) == [1, 2]
    log.write({"step": 3, "loss": 0.25})
    assert [r["step"] for r in log.records()] == [1, 2, 3]


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    log = _log(tmp_path, '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 2 is not a metrics record .*repair or remove"):
        log.truncate_after(3)
