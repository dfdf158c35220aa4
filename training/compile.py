"""``system.compile``: torch.compile the concept transformer and the SONAR token loss for training.

Each forward method is compiled in place (parameter names, checkpoints and the exported model
are unchanged): the concept transformer's inside the DeepSpeed engine, whose own hooks (timers,
ZeRO bookkeeping) stay eager around it, and the token loss's (the frozen SONAR decoder and the
fused cross-entropy, outside the engine). Each is one graph (``fullgraph``: the kernels are
custom ops, sonarllm_kernels/*_op.py) with dynamic shapes: micro-batches of other sizes, sentence counts
and lengths reuse the compiled graphs instead of recompiling every step.

ZeRO-3 gathers every layer's parameters in DeepSpeed module hooks that torch.compile cannot
trace; a compiled concept transformer there breaks into per-layer pieces that recompile until
Dynamo gives up. Under ZeRO-3 the concept transformer therefore runs eagerly and only the
token loss is compiled (announced in one line).

"auto" compiles on CUDA only: on CPU compiling costs about a minute per run and shows no
consistent gain (toy and 39M steps within the run-to-run spread; bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import torch

from training.config import ConfigError


def wanted(setting: str, device: torch.device) -> bool:
    """Whether ``system.compile`` (``"auto"``, ``"true"`` or ``"false"``) compiles on ``device``."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"


def check_compile(setting: str, device: torch.device) -> None:
    """Refuse at start-up, in one line, what would fail at the first step: inductor compiles CPU
    code with a C++ compiler."""
    if not wanted(setting, device) or device.type != "cpu":
        return
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise ConfigError(
            "system.compile true on CPU needs a C++ compiler (torch.compile's inductor); install g++ "
            "(or set CXX) or use system.compile false"
        )


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failure to compile raises: Dynamo's and inductor's errors, and the recompile limit
    (not a TorchDynamoException), when a function would need more graphs than Dynamo allows."""
    exc = torch._dynamo.exc
    return tuple(t for t in (exc.TorchDynamoException, getattr(exc, "FailOnRecompileLimitHit", None)) if t)


def _cause(exc: BaseException) -> str:
    """The reason in one line: for a backend failure that is the inner exception's first line
    (the outer message's first line only says which backend raised)."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    first = (str(inner).strip().splitlines() or [""])[0][:200]
    return f"{type(inner).__name__}: {first}"


def compiled(fn, *, fullgraph: bool = True, backend="inductor", fallback: bool = True):
    """``torch.compile(fn, dynamic=True)``, called with float constants (eps, loss options)
    specialised: otherwise Dynamo first turns them into graph inputs, then traces everything
    a second time when an op needs their value (about doubling the tracing time). The backward
    is compiled with the forward, not at the first ``backward()``, so that its failure too
    happens here.

    If compiling fails (a Dynamo or inductor error, e.g. a combination of this torch, its
    compiler and the machine that was never tried, or the recompile limit), ``fn`` runs eagerly
    from then on, with one warning line: the run goes on with the same numbers, only without
    the compiler's speed. An error of the call itself (a ValueError for bad targets, also when
    Dynamo meets it while tracing) is not a compile failure: ``fn`` is run eagerly once, and its
    error propagates as in eager mode; compiling stays on. ``fallback=False`` raises compile
    errors instead (tests and benchmarks: a compiled function must not pass as the eager one)."""
    compiled_fn = torch.compile(fn, dynamic=True, fullgraph=fullgraph, backend=backend)
    functorch_config = torch._functorch.config
    eager_backward = {"force_non_lazy_backward_lowering": True} if hasattr(
        functorch_config, "force_non_lazy_backward_lowering") else {}  # fmt: skip
    failed: list[str] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if failed:
            return fn(*args, **kwargs)
        try:
            with torch._dynamo.config.patch(specialize_float=True), functorch_config.patch(**eager_backward):
                return compiled_fn(*args, **kwargs)
        except _compile_errors() as exc:
            if not fallback:
                raise
            out = fn(*args, **kwargs)  # an error of the call itself propagates from here
            failed.append(type(exc).__name__)
            print(f"system.compile: compiling {getattr(fn, '__qualname__', fn)} failed ({_cause(exc)}); it runs "
                  "eagerly from now on (system.compile false skips compiling)", file=sys.stderr, flush=True)  # fmt: skip
            return out

    return call


def compile_for_training(model: torch.nn.Module, token_loss: torch.nn.Module, zero_stage: int,
                         fallback: bool = True) -> str:  # fmt: skip
    """Compile ``token_loss.forward`` and, below ZeRO-3, ``model.forward`` (the engine's module),
    in place (``fallback``: see ``compiled``); returns what was compiled, in words. The backend is
    inductor, or ``SONARLLM_COMPILE_BACKEND`` (e.g. "aot_eager": the same graphs without
    inductor's code generation, to tell a tracing problem from a code-generation one)."""
    backend = os.environ.get("SONARLLM_COMPILE_BACKEND", "inductor")
    token_loss.forward = compiled(token_loss.forward, backend=backend, fallback=fallback)
    if zero_stage >= 3:
        return ("the SONAR token loss (the concept transformer runs eagerly under ZeRO-3: DeepSpeed's "
                "parameter-gathering hooks cannot be compiled)")  # fmt: skip
    model.forward = compiled(model.forward, backend=backend, fallback=fallback)
    return "the concept transformer and the SONAR token loss"
