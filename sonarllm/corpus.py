"""Reading documents from the text formats users have.

* ``.txt`` (or ``.txt.gz``): documents separated by one or more blank lines;
* ``.jsonl`` (or ``.jsonl.gz``): one JSON object per line, the document in its ``"text"`` field
  (``text_field`` to change it);
* a directory: every ``.txt``/``.txt.gz`` file below it (sorted) is one document.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _kind(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a file or directory (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) == ".txt")
        if not files:
            raise ValueError(f"{path} contains no .txt files")
        for f in files:
            with _open_text(f) as fh:
                text = fh.read().strip()
            if text:
                yield text
        return
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    kind = _kind(path)
    with _open_text(path) as fh:
        if kind == ".jsonl":
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                if record[text_field].strip():
                    yield record[text_field]
        elif kind == ".txt":
            block: list[str] = []
            for line in fh:
                if line.strip():
                    block.append(line.strip())
                elif block:
                    yield " ".join(block)
                    block = []
            if block:
                yield " ".join(block)
        else:
            raise ValueError(f"{path}: unsupported corpus format {kind!r} (use .txt, .jsonl, optionally .gz, or a directory)")
