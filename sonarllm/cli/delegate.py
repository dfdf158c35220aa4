"""``sonarllm prepare | train | compare``: run ``training.prepare_data`` / ``train`` / ``compare``.

This is the one place where ``sonarllm`` reaches the floor above it, and only by module name at
run time: ``sonarllm`` imports without ``training``, which the wheel does not install (research
code often has a ``training`` package of its own). The delegates stay here rather than in
``training/`` because ``sonarllm`` is the one command users know; they import ``training`` from
the checkout this ``sonarllm`` lives in (an editable install), whatever directory the command
runs from.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sonarllm.cli.args import DELEGATES, PROG


def _checkout_module(name: str, module_name: str):
    """Import ``module_name`` (a ``training.*`` module) from the checkout holding this package.

    The checkout's root goes first on ``sys.path`` of this (command) process, so that a
    ``training`` package of someone else's installed or in the current directory is not taken
    for ours; a module that still resolves elsewhere is refused."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "training" / "__init__.py").is_file():
        raise ImportError(
            f"'{PROG} {name}' runs the trainer from a checkout of the sonarllm repository "
            f"(git clone, then pip install -e . there); the sonarllm at {root} has no training/ "
            "beside it (a wheel install carries no trainer)"
        )
    if sys.path[:1] != [str(root)]:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"'{PROG} {name}' needs the training extra (pip install -e '.[train]'): {exc}"
        ) from exc
    where = Path(module.__file__).resolve()
    if not where.is_relative_to(root):
        raise ImportError(f"'{PROG} {name}': {module_name} resolves to {where}, not to {root / 'training'}")
    return module


def _delegate(name: str, argv: list[str]) -> int:
    module = _checkout_module(name, DELEGATES[name][0])
    try:
        code = module.main(argv)
    except SystemExit as exc:  # argparse inside the delegate
        code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1
