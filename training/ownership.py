"""Directories a command may write into: new, empty, or its own, marked by a file written first.

``sonarllm compare`` marks its ``--out`` with ``.compare``; the trainer marks ``run.output_dir``
with ``.sonarllm-run`` before it writes anything else there (the run lock included). Any other
non-empty directory (a copy of ``final/``, a user's folder with a ``config.json`` or
``metrics.jsonl`` of their own) is refused untouched. A directory written by an older sonarllm,
before the markers, is recognised by what that version wrote (``earlier``) and marked when used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from sonarllm.files import write_text_atomic

RUN_MARKER = ".sonarllm-run"
RUN_SECTIONS = {"run", "data", "model"}  # sections every version's run config.json has (a model's has none)


def owned(directory: Path, marker: str, earlier: Callable[[Path], bool] = lambda _d: False) -> bool:
    """Whether a command may write into ``directory``: it does not exist, is empty, holds
    ``marker``, or ``earlier(directory)`` recognises it as one an older version made."""
    if not directory.is_dir() or (directory / marker).is_file() or not any(directory.iterdir()):
        return True
    return earlier(directory)


def mark(directory: Path, marker: str, text: str) -> None:
    """Create ``directory`` if needed and write ``marker`` into it (atomically), unless it is
    there already."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / marker).is_file():
        write_text_atomic(directory / marker, text)


def earlier_run(directory: Path) -> bool:
    """A run directory of an older sonarllm (before RUN_MARKER): the trainer's ``run.lock`` (the
    first file it made) and a ``config.json`` holding a training configuration (sections, among
    them ``run``, ``data`` and ``model``), which a model's ``config.json`` (a copy of ``final/``)
    or a user's is not."""
    from training.runlock import LOCK_NAME

    if not (directory / LOCK_NAME).is_file():
        return False
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and RUN_SECTIONS <= set(config) and all(isinstance(v, dict) for v in config.values())


def check_run_dir(directory: Path) -> None:
    """ValueError (one line) when ``run.output_dir`` is not the trainer's to write into."""
    if not owned(directory, RUN_MARKER, earlier_run):
        raise ValueError(
            f"run.output_dir {directory} is not empty and is not a training run (no {RUN_MARKER} file); the "
            "trainer writes only into a new or empty directory or one of its runs: choose another run.output_dir"
        )


def mark_run_dir(directory: Path) -> None:
    """Claim ``directory`` for a training run (before anything else is written there)."""
    mark(directory, RUN_MARKER, json.dumps({"sonarllm": "training run", "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
