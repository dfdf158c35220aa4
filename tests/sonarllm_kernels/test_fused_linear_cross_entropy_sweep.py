"""The logic of bench/sweep_flce.py (the H200 retuning run) on CPU: the interpreter runs the real
op at tiny shapes, a fake timer stands in for ``do_bench`` (its times depend on the tile
configuration the op actually ran with) and a fake clock for the time limit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sonarllm_kernels.fused_linear_cross_entropy import triton_backend as ft
from bench import sweep_flce
from tests._cases import needs_triton

pytestmark = needs_triton

TINY = dict(tune_shape=(40, 16, 301), goal_shape=(70, 16, 301), compare_shapes=[(70, 16, 301), (24, 16, 301)],
            chunk_mib=(256, 384))
CANDIDATES = {
    "hybrid": [dict(BLOCK_V=4096, SEGMENT=32768, num_warps=8), dict(BLOCK_V=2048, SEGMENT=16384, num_warps=4)],
    "logits": [sweep_flce.CANDIDATES["logits"][0], sweep_flce.CANDIDATES["logits"][1]],
    "grad": [sweep_flce.CANDIDATES["grad"][0], sweep_flce.CANDIDATES["grad"][2]],
    "weight": [sweep_flce.CANDIDATES["weight"][0]],
}


class FakeBench:
    """Runs the timed step once (the real op, interpreted) and returns a time that depends on the
    configuration the triton path resolved during it; advances a fake clock by 1 s per call."""

    def __init__(self, monkeypatch, cost):
        self.now, self.seen, self.cost, self.timed = 0.0, [], cost, []
        resolve = ft.TritonChunkBackend.resolve

        def spy(backend, dtype, device):
            cfg = resolve(backend, dtype, device)
            self.seen.append(copy.deepcopy(cfg))
            return cfg

        monkeypatch.setattr(ft.TritonChunkBackend, "resolve", spy)

    def clock(self) -> float:
        return self.now

    def timer(self, fn, grad_to_none):
        self.now += 1.0
        self.seen.clear()
        fn()
        self.timed.append(self.seen[0] if self.seen else None)
        ms = self.cost(self.seen[0]) if self.seen else 50.0  # the torch path resolves no tile config
        return (ms, ms * 0.9, ms * 1.1)


def _cost(cfg) -> float:
    """Fused beats hybrid; within each, one candidate per group is fastest; 384 MiB chunks win."""
    ms = 10.0 if cfg["schedule"] == "fused" else 20.0
    if cfg["schedule"] == "hybrid":
        ms -= cfg["BLOCK_V"] == 2048
    else:
        ms -= (cfg["logits"]["num_stages"] == 3) + (cfg["grad"]["BLOCK_D"] == 256)
    return ms - 0.5 * (cfg["chunk_mib"] == 384)


def _sweep(bench, **kw):
    checker = lambda cfg, device, dtype: sweep_flce.check_candidate(cfg, device, dtype, shape=(24, 16, 301))  # noqa: E731
    return sweep_flce.Sweep("cpu", torch.float32, deadline=kw.pop("deadline", 1e9), timer=bench.timer,
                            checker=kw.pop("checker", checker), clock=bench.clock, log=lambda *a: None,
                            candidates=CANDIDATES, **TINY, **kw)  # fmt: skip


def _base():
    return {"hybrid": {"schedule": "hybrid", **ft._TILES["sm_90"]["2"]["hybrid"]},
            "fused": {"schedule": "fused", **ft._TILES["sm_90"]["2"]["fused"]}}  # fmt: skip


def test_tune_and_choose_pick_the_fastest_and_write_a_valid_table(monkeypatch, tmp_path):
    bench = FakeBench(monkeypatch, _cost)
    sweep = _sweep(bench)
    winner, per_schedule = sweep.choose(sweep.tune(_base()))
    assert winner["schedule"] == "fused" and winner["chunk_mib"] == 384
    assert winner["logits"]["num_stages"] == 3 and winner["grad"]["BLOCK_D"] == 256
    assert per_schedule["hybrid"]["BLOCK_V"] == 2048
    assert winner in bench.timed, "the winner is a configuration the op really ran with"

    out = tmp_path / "tiles.json"
    meta = {"device": "test", "date": "2026-11-30"}
    sweep_flce.write_table(out, "sm_90", 2, winner, per_schedule, meta)
    table = ft.load_tiles(out)  # validates
    entry = table["sm_90"]["2"]
    assert entry["schedule"] == "fused" and table["sm_90"]["measured"] == meta
    assert entry["fused"]["chunk_mib"] == 384 and entry["hybrid"]["BLOCK_V"] == 2048
    assert table["sm_90"]["4"] == ft._TILES["sm_90"]["4"], "other operand sizes are kept"
    assert table["default"] == ft._TILES["default"]


def test_a_candidate_that_fails_its_check_is_never_timed(monkeypatch):
    bench = FakeBench(monkeypatch, _cost)
    bad = lambda cfg, device, dtype: "wrong" if cfg["schedule"] == "hybrid" and cfg["BLOCK_V"] == 2048 else None  # noqa: E731
    configs = _sweep(bench, checker=bad).tune(_base())
    assert configs["hybrid"]["BLOCK_V"] == 4096, "the failing (otherwise fastest) candidate must not win"
    hybrid = [c for c in bench.timed if c["schedule"] == "hybrid"]
    assert hybrid and all(c["BLOCK_V"] == 4096 for c in hybrid)


def test_a_schedule_without_a_passing_candidate_is_never_chosen(monkeypatch):
    bench = FakeBench(monkeypatch, _cost)
    bad = lambda cfg, device, dtype: "wrong" if cfg["schedule"] == "fused" else None  # noqa: E731
    sweep = _sweep(bench, checker=bad)
    configs = sweep.tune(_base())
    assert "fused" not in configs, "fused would be fastest, but it failed every check"
    winner, per_schedule = sweep.choose(configs)
    assert winner["schedule"] == "hybrid" and set(per_schedule) == {"hybrid"}


def test_check_candidate_catches_a_wrong_gradient_and_nondeterminism(monkeypatch):
    cfg = {"schedule": "hybrid", **ft._TILES["sm_90"]["2"]["hybrid"]}
    check = lambda: sweep_flce.check_candidate(cfg, "cpu", torch.float32, shape=(24, 16, 301))  # noqa: E731
    assert check() is None
    chunk = ft.TritonChunkBackend.chunk

    def wrong(self, *args, **kwargs):
        res = chunk(self, *args, **kwargs)
        if res.dh_CD is not None:
            res.dh_CD = res.dh_CD * 1.01
        return res

    monkeypatch.setattr(ft.TritonChunkBackend, "chunk", wrong)
    assert "d hidden" in check()
    calls = []

    def noisy(self, *args, **kwargs):  # differs from call to call, within tolerance
        res = chunk(self, *args, **kwargs)
        calls.append(1)
        if res.dh_CD is not None:
            res.dh_CD = res.dh_CD * (1 + 1e-7 * len(calls))
        return res

    monkeypatch.setattr(ft.TritonChunkBackend, "chunk", noisy)
    assert "differs between two runs" in check()


def test_time_limit_skips_what_does_not_fit_and_lists_it(monkeypatch):
    bench = FakeBench(monkeypatch, _cost)
    sweep = _sweep(bench, deadline=3.0)  # three timings
    configs = sweep.tune(_base())
    assert len(sweep.skipped) > 0 and bench.now == 3.0
    with pytest.raises(RuntimeError, match="time limit"):
        sweep.choose(configs)


def test_run_end_to_end_on_cpu(monkeypatch, tmp_path, capsys):
    """Phases 1-3 with the fp32 table entry (hybrid only), outputs written and printed."""
    bench = FakeBench(monkeypatch, _cost)
    table_out, json_out = tmp_path / "tiles.json", tmp_path / "sweep.json"
    args = sweep_flce.parse(["--dtype", "fp32", "--quick", "--table-out", str(table_out), "--json", str(json_out)])
    lines = []
    rc = sweep_flce.run(args, device="cpu", timer=bench.timer, clock=bench.clock, log=lines.append,
                        checker=lambda cfg, device, dtype: None, sweep_kwargs=dict(TINY, candidates=CANDIDATES))  # fmt: skip
    assert rc == 0
    table = ft.load_tiles(table_out)
    assert table["sm_90"]["4"]["schedule"] == "hybrid" and table["sm_90"]["measured"]["device"] == "cpu"
    assert table["sm_90"]["4"]["hybrid"]["BLOCK_V"] == 2048
    payload = json.loads(json_out.read_text())
    assert payload["winner"]["schedule"] == "hybrid"
    providers = {r["provider"] for r in payload["rows"]}
    assert {"ours hybrid", "ours torch"} <= providers
    assert any(line.startswith("| provider |") for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "tiles.json"
    assert sweep_flce.main(["--table-out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
