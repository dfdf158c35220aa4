"""``system.compile``: the key (true / false / auto, from TOML and the command line), what "auto"
means per device, the start-up check, what is compiled under each ZeRO stage, and compiled
training runs that reproduce the eager ones."""

import json

import pytest
import torch

import training.compile as tc
from training.config import ConfigError, load_config
from training.train import main


def test_the_key_reads_toml_booleans_and_command_line_words(tmp_path):
    assert load_config().system.compile == "auto"
    for toml_value, want in (("true", "true"), ("false", "false"), ('"auto"', "auto")):
        path = tmp_path / "run.toml"
        path.write_text(f"[system]\ncompile = {toml_value}\n")
        assert load_config(path).system.compile == want
    assert load_config(None, {"system.compile": "false"}).system.compile == "false"
    with pytest.raises(ConfigError, match="system.compile must be true, false or auto, got 'sometimes'"):
        load_config(None, {"system.compile": "sometimes"})


def test_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not tc.wanted("auto", cpu) and tc.wanted("auto", cuda)
    assert tc.wanted("true", cpu) and not tc.wanted("false", cuda)


def test_cpu_compile_without_a_cxx_compiler_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(tc.shutil, "which", lambda name: None)
    tc.check_compile("false", torch.device("cpu"))  # nothing to compile: nothing to check
    tc.check_compile("true", torch.device("cuda", 0))  # inductor needs no C++ compiler for CUDA code
    with pytest.raises(ConfigError, match=r"system.compile true on CPU needs a C\+\+ compiler"):
        tc.check_compile("true", torch.device("cpu"))
    run = tmp_path / "run"
    assert main(["--system.compile", "true", "--system.device", "cpu", "--run.output_dir", str(run),
                 "--data.prepared_dir", str(tmp_path / "data")]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: system.compile true on CPU needs a C++ compiler (torch.compile's inductor); install g++ "
        "(or set CXX) or use system.compile false"
    ]
    assert not run.exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero3_leaves_the_concept_transformer_eager(stage):
    model, loss = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    what = tc.compile_for_training(model, loss, stage)
    assert "forward" in vars(loss), "the token loss is compiled under every stage"
    assert ("forward" in vars(model)) == (stage < 3), what
    assert ("concept transformer runs eagerly under ZeRO-3" in what) == (stage == 3)


def test_a_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append("compiled")
            raise torch._dynamo.exc.BackendCompilerFailed(broken_compile, RuntimeError("no ptxas\nmore"), None)

        return run

    monkeypatch.setattr(tc.torch, "compile", broken_compile)
    double = tc.compiled(lambda x: x * 2)
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))
    assert calls == ["compiled"], "after a failure the compiled function is not tried again"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed (RuntimeError: no ptxas)" in err[0] and "runs eagerly from now on" in err[0]
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):  # what tests and benchmarks use
        tc.compiled(lambda x: x * 2, fallback=False)(torch.ones(1))


def test_a_failure_to_compile_the_backward_falls_back_too(capsys):
    """AOTAutograd compiles the backward at the first backward() unless told otherwise: there a
    failure would escape the fallback and end every step."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(gm, example_inputs):
        raise RuntimeError("backward codegen failed")

    loss = tc.compiled(lambda x, w: (x @ w).square().sum(), backend=aot_autograd(fw_compiler=lambda gm, ex: gm.forward,
                                                                              bw_compiler=no_backward))  # fmt: skip
    x = torch.randn(4, 3)
    for _ in range(2):
        w = torch.randn(3, 2, requires_grad=True)
        loss(x, w).backward()
        torch.testing.assert_close(w.grad, 2 * x.T @ (x @ w.detach()))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backward codegen failed" in err[0]


def test_the_recompile_limit_falls_back_instead_of_failing_every_step(capsys):
    scale = tc.compiled(lambda x, factor: x * factor, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        for factor in (1.5, 2.5, 3.5, 4.5):  # floats are specialised: one graph per value
            assert torch.equal(scale(torch.ones(2), factor), torch.full((2,), factor))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs eagerly from now on" in err[0]


def test_an_error_of_the_call_is_not_taken_for_a_compile_failure(capsys):
    """Dynamo meets the ValueError while tracing: it reaches the caller as in eager mode, and
    compiling stays on for the next, good call."""
    from torch._dynamo.testing import CompileCounter

    def check(x):
        if x.shape[0] > 3:
            raise ValueError("x must have at most 3 rows")
        return x + 1

    counter = CompileCounter()
    fn = tc.compiled(check, backend=counter)
    with pytest.raises(ValueError, match="at most 3 rows"):
        fn(torch.ones(5))
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert counter.frame_count >= 1, "the good call was compiled"
    assert capsys.readouterr().err == ""


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_compiled_run_reproduces_the_eager_run(tmp_path, prepared, stage, monkeypatch):
    """Two steps and an evaluation; stages 0 and 1 compile exactly what stage 2 does. The
    aot_eager backend traces and differentiates the same graphs in seconds; inductor's code for
    them is checked in tests/sonarllm/test_compiled_step.py."""
    from tests.training.test_train import train

    monkeypatch.setenv("SONARLLM_COMPILE_BACKEND", "aot_eager")

    args = ("--loop.max_steps", "2", "--loop.eval_every", "2", "--system.zero_stage", str(stage))
    eager = train(tmp_path / "eager", prepared, *args, "--system.compile", "false")
    fast = train(tmp_path / "compiled", prepared, *args, "--system.compile", "true")
    assert "system.compile" not in eager.stdout
    what = "the SONAR token loss (the concept" if stage == 3 else "the concept transformer and the SONAR token loss"
    assert f"system.compile: compiling {what}" in fast.stdout
    assert "runs eagerly from now on" not in fast.stderr, "it compiled (no fallback to eager)"
    got, want = _records(tmp_path / "compiled"), _records(tmp_path / "eager")
    for key in ("loss", "eval_loss", "eval_token_ce"):
        a = torch.tensor([r[key] for r in got if key in r])
        b = torch.tensor([r[key] for r in want if key in r])
        assert a.numel() == b.numel() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
