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
