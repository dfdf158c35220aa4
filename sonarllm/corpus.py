"""Reading documents from the formats corpora come in, streaming (memory does not grow with the corpus).

* ``.txt``: documents separated by one or more blank lines;
* ``.jsonl``: one JSON object per line, the document in its ``"text"`` field (``text_field``);
* ``.txt`` and ``.jsonl`` may be compressed: ``.gz`` (gzip) or ``.zst`` (zstandard);
* ``.parquet``: the document in the string column ``text_field``, read one row group at a time;
  a directory of ``.parquet`` files (no ``.txt`` among them) is read file after file, sorted;
* a Hugging Face ``datasets`` directory written by ``save_to_disk``: ``state.json``,
  ``dataset_info.json`` and Arrow IPC stream files ``data-*.arrow`` (read in ``state.json``'s
  order, one record batch at a time, with pyarrow; ``datasets`` is not needed); a
  ``DatasetDict`` directory (``dataset_dict.json``, one sub-directory per split) is read from its
  ``split`` sub-directory;
* any other directory: every ``.txt`` file below it (sorted, optionally compressed) is one document.

Empty documents (only whitespace) are skipped. Parquet and Arrow rows are counted from 0, as
pyarrow and ``datasets`` index them; JSONL lines from 1.

``read_embedded_documents`` reads pre-split, pre-embedded documents (as LCM's pipeline writes
them): per row a list of sentences (``list<string>``) and their SONAR vectors (``list<list<float>>``
or ``list<fixed_size_list<float>>``), checked for dtype and dimension.

A file that cannot be decoded (not UTF-8, not the gzip/zstd/Parquet/Arrow data its name says,
truncated) or a record that is not what is expected raises ValueError naming the file and the
line or row, and the cause. pyarrow and zstandard are imported only for the formats that need
them (``pip install 'sonarllm[data]'``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

COMPRESSIONS = (".gz", ".zst")
READ_ROWS = 1024
"""Rows per Parquet batch: what is held in memory at once (besides pyarrow's row-group buffers)."""


def _require(module: str):
    """Import an optional dependency of the data extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"reading this corpus format needs {module.split('.')[0]}: pip install 'sonarllm[data]'") from exc


class _ZstdReader(io.RawIOBase):
    """A zstandard-compressed file as a binary stream, decompressed block by block. Unlike
    ``zstandard.open``, it raises EOFError when the data ends inside a frame (a truncated file)."""

    def __init__(self, path: Path):
        self._zstd = _require("zstandard")
        self._file = open(path, "rb")
        self._dobj = self._zstd.ZstdDecompressor().decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            block = self._file.read(1 << 20)
            if not block:
                if not self._dobj.eof:
                    raise EOFError("compressed data ends inside a zstd frame")
                return 0
            while block:
                if self._dobj.eof:  # the next frame of a multi-frame file
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                self._pending += self._dobj.decompress(block)
                block = self._dobj.unused_data
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path)), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_error(path: Path, exc: Exception) -> ValueError:
    """The ValueError for a file that cannot be decoded: it names the file and the cause."""
    if isinstance(exc, UnicodeDecodeError):
        return ValueError(f"{path} is not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x}); convert it to UTF-8")
    compression = "zstd" if path.suffix == ".zst" else "gzip"
    if isinstance(exc, EOFError):
        return ValueError(f"{path} is a truncated {compression} file ({exc})")
    return ValueError(f"{path} is not a valid {compression} file ({exc})")


def _decode_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is in the data/dev extras
        pass
    return errors


DECODE_ERRORS = _decode_errors()


def _check_encodable(text: str, where: str) -> None:
    """Refuse a string that is not Unicode text: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no tokenizer accepts (sentencepiece fails with a bare RuntimeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
                         f"(an unpaired \\ud800-\\udfff escape), which is not Unicode text; fix or drop that record") from None


def _kind(path: Path) -> str:
    name = path.name
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return Path(name).suffix


# --- tables: Parquet files and Hugging Face datasets directories -----------------------------


def _hf_files(path: Path, split: str) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in ``state.json``'s order (the split's
    sub-directory for a DatasetDict)."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path / 'dataset_dict.json'} is not a valid DatasetDict description ({exc})") from exc
        if split not in splits:
            raise ValueError(f"{path} is a DatasetDict without a split {split!r} (it has {', '.join(map(str, splits))}); "
                             "choose one with --split")  # fmt: skip
        path = path / split
    state_path = path / "state.json"
    try:
        files = [path / entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state_path} is not a valid datasets state file ({exc})") from exc
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}, listed in {state_path}, is missing")
    return files


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _table_files(path: Path, split: str) -> list[Path] | None:
    """The Parquet or Arrow files a corpus path stands for, or None for a text corpus."""
    if path.is_dir():
        if _is_hf_dataset(path):
            return _hf_files(path, split)
        parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if parquet and not any(p.is_file() and _kind(p) == ".txt" for p in path.rglob("*")):
            return parquet
        return None
    return [path] if path.suffix in (".parquet", ".arrow") else None


def _batches(path: Path, columns: list[str]) -> Iterator:
    """Record batches of ``columns`` of one Parquet or Arrow IPC stream file, one at a time."""
    pa = _require("pyarrow")
    kind = "an Arrow IPC stream" if path.suffix == ".arrow" else "a Parquet"
    try:
        if path.suffix == ".arrow":
            source = pa.OSFile(str(path))
            reader = pa.ipc.open_stream(source)
            schema = reader.schema
        else:
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(str(path))
            schema = parquet.schema_arrow
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not {kind} file ({exc})") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(schema.names)}); "
                         "name the right one with --text-field / --embedding-field")  # fmt: skip
    row = 0
    try:
        if path.suffix == ".arrow":
            with source:
                for batch in reader:
                    yield row, batch.select(columns)
                    row += batch.num_rows
        else:
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns, use_threads=False):
                yield row, batch
                row += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: rows from {row} on cannot be read ({exc})") from exc


def _is_string(t) -> bool:
    pa = _require("pyarrow")
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)


def _table_texts(files: list[Path], text_field: str) -> Iterator[str]:
    for f in files:
        for first, batch in _batches(f, [text_field]):
            column = batch.column(0)
            if not _is_string(column.type):
                raise ValueError(f"{f}: column {text_field!r} holds {column.type}, expected strings")
            for i, text in enumerate(column.to_pylist()):
                if text is None:
                    raise ValueError(f"{f}: row {first + i}: column {text_field!r} is null, expected a string")
                _check_encodable(text, f"{f}: row {first + i}: column {text_field!r}")
                if text.strip():
                    yield text


# --- the public readers ----------------------------------------------------------------------


def read_documents(path: str | os.PathLike, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the non-empty documents of a file or directory (see module docstring); ``split``
    picks the split of a Hugging Face DatasetDict directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    files = _table_files(path, split)
    if files is not None:
        yield from _table_texts(files, text_field)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) == ".txt")
        if not files:
            raise ValueError(f"{path} contains no .txt or .parquet files and is not a datasets directory")
        for f in files:
            try:
                with _open_text(f) as fh:
                    text = fh.read().strip()
            except DECODE_ERRORS as exc:
                raise _read_error(f, exc) from exc
            if text:
                yield text
        return
    try:
        yield from _file_documents(path, text_field)
    except DECODE_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    kind = _kind(path)
    if kind not in (".jsonl", ".txt"):
        raise ValueError(f"{path}: unsupported corpus format {kind!r} (use .txt or .jsonl, optionally .gz or .zst, "
                         ".parquet, a datasets directory saved with save_to_disk, or a directory)")  # fmt: skip
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
        else:
            block: list[str] = []
            for line in fh:
                if line.strip():
                    block.append(line.strip())
                elif block:
                    yield " ".join(block)
                    block = []
            if block:
                yield " ".join(block)


def _vector_type(t):
    """The float type of a ``list<list<float>>`` / ``list<fixed_size_list<float>>`` column, else None."""
    pa = _require("pyarrow")
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return None
    inner = t.value_type
    if not (pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner)):
        return None
    return inner.value_type if pa.types.is_floating(inner.value_type) else None


def read_embedded_documents(path: str | os.PathLike, *, text_field: str, embedding_field: str, dim: int,
                            split: str = "train") -> Iterator[tuple[list[str], np.ndarray]]:  # fmt: skip
    """Yield (sentences, embeddings_SD) of every row with at least one sentence, from Parquet
    files or a datasets directory whose ``text_field`` column holds each document's sentences
    (``list<string>``) and ``embedding_field`` their SONAR vectors (lists of ``dim`` floats of
    any float dtype; returned as float32, or float16 as stored). Anything else raises ValueError
    naming the file and the row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    files = _table_files(path, split)
    if files is None:
        raise ValueError(f"{path}: pre-embedded documents are read from Parquet files or a datasets directory "
                         "(--embedding-field names their vector column)")  # fmt: skip
    pa = _require("pyarrow")
    for f in files:
        for first, batch in _batches(f, [text_field, embedding_field]):
            texts, vectors = batch.column(0), batch.column(1)
            if not ((pa.types.is_list(texts.type) or pa.types.is_large_list(texts.type)) and _is_string(texts.type.value_type)):
                raise ValueError(f"{f}: column {text_field!r} holds {texts.type}, expected lists of sentences (list<string>)")
            float_type = _vector_type(vectors.type)
            if float_type is None:
                raise ValueError(f"{f}: column {embedding_field!r} holds {vectors.type}, expected lists of float vectors "
                                 "(list<list<float>>)")  # fmt: skip
            inner = vectors.type.value_type
            if pa.types.is_fixed_size_list(inner) and inner.list_size != dim:
                raise ValueError(f"{f}: column {embedding_field!r} holds vectors of dimension {inner.list_size}; "
                                 f"the SONAR encoder's is {dim}")  # fmt: skip
            for i in range(batch.num_rows):
                yield from _embedded_row(f, first + i, texts[i], vectors[i], dim, text_field, embedding_field)


def _embedded_row(f: Path, row: int, texts, vectors, dim: int, text_field: str, embedding_field: str):
    """The (sentences, embeddings_SD) of one row, checked; nothing for a row without sentences."""
    pa = _require("pyarrow")
    where = f"{f}: row {row}"
    if not texts.is_valid or not vectors.is_valid:
        raise ValueError(f"{where}: column {text_field if not texts.is_valid else embedding_field!r} is null")
    sentences = texts.values
    if sentences.null_count:
        raise ValueError(f"{where}: column {text_field!r} holds a null sentence")
    sentences = sentences.to_pylist()
    rows = vectors.values
    if len(rows) != len(sentences):
        raise ValueError(f"{where}: {len(sentences)} sentences in {text_field!r} but {len(rows)} vectors in {embedding_field!r}")
    if not sentences:
        return
    if rows.null_count:
        raise ValueError(f"{where}: column {embedding_field!r} holds a null vector")
    if not pa.types.is_fixed_size_list(rows.type):
        lengths = _require("pyarrow.compute").list_value_length(rows).to_numpy()
        bad = np.flatnonzero(lengths != dim)
        if bad.size:
            raise ValueError(f"{where}: vector {bad[0]} of {embedding_field!r} has dimension {lengths[bad[0]]}; "
                             f"the SONAR encoder's is {dim}")  # fmt: skip
    flat = rows.flatten()
    if flat.null_count:
        raise ValueError(f"{where}: column {embedding_field!r} holds a null value")
    values = flat.to_numpy(zero_copy_only=False)
    emb_SD = values.reshape(len(sentences), dim)
    if not np.isfinite(emb_SD).all():
        raise ValueError(f"{where}: column {embedding_field!r} holds a NaN or infinite value")
    for s, text in enumerate(sentences):
        _check_encodable(text, f"{where}: sentence {s} of {text_field!r}")
    yield sentences, emb_SD if emb_SD.dtype == np.float16 else emb_SD.astype(np.float32, copy=False)
