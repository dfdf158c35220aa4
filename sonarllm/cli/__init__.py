"""The ``sonarllm`` command: generate, evaluate, and the data / training entry points.

    sonarllm generate --model DIR --prompt "Once upon a time, ..." [--stream] [--json]
    sonarllm evaluate --model DIR --data held_out.jsonl [--json results.json]
    sonarllm convert --official PATH [--config JSON] --out DIR   # the paper's checkpoints
    sonarllm prepare ...   # delegated to training.prepare_data.main
    sonarllm train ...     # delegated to training.train.main
    sonarllm compare ...   # delegated to training.compare.main

Modules: ``args`` (the parser), ``commands`` (generate, evaluate), ``convert``, ``delegate``
(prepare, train, compare: ``training`` is imported from the checkout, see there why).

Conventions: ``--help`` on every command; exit status 0 on success, 2 for a bad command line
(argparse's errors, an empty prompt), 1 for a runtime error (missing or incompatible model
directory, missing SONAR file, corrupted checkpoint, missing optional dependency, ...), which is
reported as one line on stderr without a traceback (set ``SONARLLM_DEBUG=1`` to get the
traceback instead). ``--device auto`` picks CUDA when available, else the CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from sonarllm.cli.args import DELEGATES, PROG, UsageError, build_parser, resolve_device
from sonarllm.cli.commands import cmd_evaluate, cmd_generate
from sonarllm.cli.convert import cmd_convert
from sonarllm.cli.delegate import _delegate

__all__ = ["main", "build_parser", "resolve_device", "UsageError"]


def _error(command: str | None, exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    where = f"{PROG} {command}" if command else PROG
    print(f"{where}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sonarllm`` command line; returns the exit status (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    debug = os.environ.get("SONARLLM_DEBUG", "") not in ("", "0")
    try:
        if command in DELEGATES:
            return _delegate(command, argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error (2)
            return exc.code if isinstance(exc.code, int) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        run = {"generate": cmd_generate, "evaluate": cmd_evaluate, "convert": cmd_convert}[args.command]
        return run(args)
    except UsageError as exc:
        _error(command, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        _error(command, exc)
        return 1

