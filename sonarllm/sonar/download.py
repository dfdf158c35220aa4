"""Downloading SONAR's released files into a local cache, with integrity checks.

Files land in ``$SONARLLM_CACHE`` (default ``~/.cache/sonarllm``) under their URL's file name.
A download goes to a temporary file in the cache directory and is renamed into place only
after its size (when the server sends one) and its SHA-256 (when one is expected) match, so an
interrupted or corrupted download never masquerades as a good file. The digest of every
completed download is recorded beside it (``<file>.sha256``) and re-checked on later use.
Without a network the error says where to put a file fetched elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_BASE = "https://dl.fbaipublicfiles.com/SONAR/"


@dataclass(frozen=True)
class Asset:
    """A released SONAR file."""

    url: str
    kind: str  # "decoder", "encoder" or "tokenizer"
    sha256: str | None = None  # not published by Meta; set it to pin a file you trust


ASSETS: dict[str, Asset] = {
    "text_sonar_basic_decoder": Asset(_BASE + "sonar_text_decoder.pt", "decoder"),
    "text_sonar_finetuned_decoder": Asset(_BASE + "finetuned_decoder.pt", "decoder"),
    "text_sonar_basic_encoder": Asset(_BASE + "sonar_text_encoder.pt", "encoder"),
    "sonar_tokenizer": Asset(_BASE + "sentencepiece.source.256000.model", "tokenizer"),
}


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its integrity check."""


def cache_dir() -> Path:
    return Path(os.environ.get("SONARLLM_CACHE", Path.home() / ".cache" / "sonarllm"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name_or_url: str, *, sha256: str | None = None, cache: str | os.PathLike | None = None,
          progress: bool = True, timeout: float = 30.0) -> Path:  # fmt: skip
    """Path of a cached copy of an asset (a name of ``ASSETS`` or a URL), downloading it if needed.

    Args:
        sha256: expected digest (overrides the asset's); a mismatch raises and keeps nothing.
        cache: cache directory (default: ``cache_dir()``).
        progress: show a progress bar while downloading.
        timeout: seconds to wait for the server before giving up.

    Raises:
        DownloadError: no network, an HTTP error, a short read, or a digest mismatch.
    """
    asset = ASSETS.get(name_or_url)
    url = asset.url if asset else name_or_url
    if asset is None and "://" not in url:
        raise ValueError(f"unknown asset {name_or_url!r}: give a URL or one of {sorted(ASSETS)}")
    expected = sha256 or (asset.sha256 if asset else None)
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / url.rstrip("/").rsplit("/", 1)[-1]
    record = path.with_name(path.name + ".sha256")

    if path.exists():
        want = expected or (record.read_text().strip() if record.exists() else None)
        if want is not None and _sha256(path) != want:
            raise DownloadError(
                f"cached file {path} fails its integrity check (SHA-256 differs from {want}); "
                "delete it to download it again"
            )
        return path

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(
                f"could not download {url} ({getattr(exc, 'reason', exc)}). Without network access, fetch "
                f"the file elsewhere and place it at {path}, or pass a local file path instead."
            ) from exc
        size = response.headers.get("Content-Length")
        total = int(size) if size and size.isdigit() else None
        digest = hashlib.sha256()
        from tqdm.auto import tqdm

        with response, os.fdopen(fd, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, disable=not progress, desc=path.name
        ) as bar:  # fmt: skip
            fd = None
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        got = tmp.stat().st_size
        if total is not None and got != total:
            raise DownloadError(f"download of {url} stopped early: {got} of {total} bytes")
        if expected is not None and digest.hexdigest() != expected:
            raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {expected}")
        os.replace(tmp, path)
        record.write_text(digest.hexdigest() + "\n")
        return path
    finally:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
