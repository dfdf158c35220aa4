"""Reading documents from the text formats users have.

* ``.txt`` (or ``.txt.gz``): documents separated by one or more blank lines;
* ``.jsonl`` (or ``.jsonl.gz``): one JSON object per line, the document in its ``"text"`` field
  (``text_field`` to change it);
* a directory: every ``.txt``/``.txt.gz`` file below it (sorted) is one document.

A file that is not UTF-8 text, or not gzip data although its name ends in ``.gz`` (or a
truncated one), raises ValueError naming the file and the cause; so does a JSONL text holding a
lone surrogate (an unpaired ``\\ud800``-``\\udfff`` escape), naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_error(path: Path, exc: Exception) -> ValueError:
    """The ValueError for a file that cannot be decoded: it names the file and the cause."""
    if isinstance(exc, UnicodeDecodeError):
        return ValueError(f"{path} is not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x}); convert it to UTF-8")
    if isinstance(exc, EOFError):
        return ValueError(f"{path} is a truncated gzip file ({exc})")
    return ValueError(f"{path} is not a valid gzip file ({exc})")


DECODE_ERRORS = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)


def _check_encodable(text: str, where: str) -> None:
    """Refuse a string that is not Unicode text: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no tokenizer accepts (sentencepiece fails with a bare RuntimeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
                         f"(an unpaired \\ud800-\\udfff escape), which is not Unicode text; fix or drop that record") from None


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
            try:
                with _open_text(f) as fh:
                    text = fh.read().strip()
            except DECODE_ERRORS as exc:
                raise _read_error(f, exc) from exc
            if text:
                yield text
        return
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    try:
        yield from _file_documents(path, text_field)
    except DECODE_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
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
                text = record[text_field]
                _check_encodable(text, f"{path}:{lineno}: field {text_field!r}")
                if text.strip():
                    yield text
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
