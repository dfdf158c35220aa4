"""Files a user can trust: atomic writes with the usual permissions, SHA-256 digests (computed
once per file per process), checksum tables, and the rule for a file a command writes where the
user says.

A checksum table maps a file name (relative to a directory) to ``{"sha256": ..., "bytes": ...}``;
checkpoints (training/checkpoint.py, ``checkpoint.json``) and exported models
(sonarllm/bundle.py, ``bundle.json``) both carry one and are verified against it before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

_BLOCK = 1 << 20
# (real path, device, inode, size, mtime in ns) -> SHA-256: a file hashed once in this process is
# not hashed again unless it was replaced or changed size or modification time
_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def cached_sha256(path: str | os.PathLike) -> str:
    """``sha256_file`` once per file per process: a second call for an unchanged file (same real
    path, inode, size and modification time) returns the digest computed the first time. The
    released SONAR decoder is 1.5 GB; every process that loads it would otherwise hash it again."""
    key = _stat_key(path)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = sha256_file(path)
        if _stat_key(path) == key:  # not changed while it was read
            _DIGESTS[key] = digest
    return digest


def file_entry(path: str | os.PathLike) -> dict:
    """A checksum-table entry for one file: ``{"sha256": ..., "bytes": ...}``."""
    return {"sha256": cached_sha256(path), "bytes": os.path.getsize(path)}


def size_problem(path: Path, name: str, entry: dict) -> str | None:
    """What is wrong with ``path`` (table name ``name``) judged by its size against ``entry``
    (missing, empty, truncated, larger), or None: the cheap check before any hashing."""
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        what = "empty" if size == 0 else "truncated" if size < entry["bytes"] else "larger than written"
        return f"{name} is {what} ({size} bytes, {entry['bytes']} written)"
    return None


def table_problem(directory: str | os.PathLike, files: dict[str, dict]) -> str | None:
    """The first file of a checksum table that does not match (sizes of all first, then digests),
    in words, or None when every file matches."""
    directory = Path(directory)
    for name, entry in sorted(files.items()):
        problem = size_problem(directory / name, name, entry)
        if problem:
            return problem
    for name, entry in sorted(files.items()):
        if cached_sha256(directory / name) != entry["sha256"]:
            return f"{name} failed its checksum"
    return None


def atomic_write(final: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` into a fresh temporary file beside ``final``, give it the permissions
    a new file gets under the umask (some writers, e.g. safetensors, create files private), fsync
    it, rename it over ``final`` and fsync the directory; the temporary file is removed on
    failure."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(final.parent, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def output_file_problem(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike],
                        is_ours: Callable[[Path], bool]) -> str | None:  # fmt: skip
    """Why a command must not write the file ``path`` a user named, or None: it is a directory,
    one of the command's ``inputs`` (files, or directories whose every file is an input), or an
    existing file that ``is_ours`` does not recognise as an earlier output of the command."""
    out = Path(path)
    if out.is_dir():
        return "is a directory"
    resolved = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if resolved == source or resolved.is_relative_to(source) and source.is_dir():
            return f"is {'in ' if resolved != source else ''}an input of this command ({given})"
    if out.exists() and not is_ours(out):
        return "is an existing file this command did not write"
    return None
