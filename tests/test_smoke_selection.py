"""``pytest --smoke`` (tests/_smoke.py): the CUDA suite's representative subset of the parametrized tests."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from tests._smoke import smoke_subset

REPO = Path(__file__).resolve().parents[1]


def _item(fn, **params):
    return SimpleNamespace(path="t.py", originalname=fn, name=f"{fn}[{params}]", callspec=SimpleNamespace(params=params))


def test_greedy_cover_keeps_every_case_and_every_option_on_each_path():
    items = [
        _item("f", device="cuda", path=p, dtype=d, opt=o, trainable=t)
        for t in (False, True) for o in ("plain", "softcap", "smoothing") for p in ("torch", "triton") for d in ("fp32", "bf16")
    ]  # fmt: skip
    items.append(SimpleNamespace(path="t.py", originalname="g", name="g"))  # not parametrized: kept
    kept = smoke_subset(items)
    assert kept == smoke_subset(items), "deterministic"
    assert kept[-1].name == "g" and len(kept) < len(items) - 1
    chosen = [k.callspec.params for k in kept[:-1]]
    assert {(c["path"], c["dtype"]) for c in chosen} == {(p, d) for p in ("torch", "triton") for d in ("fp32", "bf16")}
    for path in ("torch", "triton"):
        on_path = [c for c in chosen if c["path"] == path]
        assert {c["opt"] for c in on_path} == {"plain", "softcap", "smoothing"}
        assert {c["trainable"] for c in on_path} == {False, True}
    order = [items.index(k) for k in kept]
    assert order == sorted(order), "original order kept"


def _collect(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


CASE = re.compile(r"(cpu|cuda)-(torch|triton|flash|reference)-(fp32|bf16|fp16)")


def _cases(ids):
    found = set()
    for test_id in ids:
        fn = test_id.split("[")[0]
        match = CASE.search(test_id)
        found.add((fn, match.group(0) if match else None))
    return found


def test_smoke_selection_of_the_cuda_tests_covers_every_kernel_path_and_dtype():
    """The gpu-marked tests, collected (not run) here: the smoke subset is under a third of the
    full matrix and still holds every test function with every device-path-dtype case it has."""
    full, smoke = _collect(), _collect("--smoke")
    assert len(smoke) < len(full) / 3, (len(smoke), len(full))
    assert set(smoke) <= set(full)
    assert _cases(smoke) == _cases(full)
    assert any("cuda-triton-fp16" in t for t in smoke) and any("cuda-torch-bf16" in t for t in smoke)
