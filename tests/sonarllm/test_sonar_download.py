"""The download helper, offline: file:// URLs stand in for the server."""

import hashlib

import pytest

from sonarllm.sonar.download import ASSETS, DownloadError, fetch


def test_fetch_caches_and_verifies(tmp_path):
    src = tmp_path / "src" / "weights.pt"
    src.parent.mkdir()
    src.write_bytes(b"sonar weights")
    digest = hashlib.sha256(b"sonar weights").hexdigest()
    cache = tmp_path / "cache"
    path = fetch(src.as_uri(), sha256=digest, cache=cache, progress=False)
    assert path == cache / "weights.pt" and path.read_bytes() == b"sonar weights"
    assert (cache / "weights.pt.sha256").read_text().strip() == digest
    src.unlink()  # the cached copy is used from now on
    assert fetch(src.as_uri(), cache=cache, progress=False) == path
    path.write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="fails its integrity check"):
        fetch(src.as_uri(), cache=cache, progress=False)


def test_digest_mismatch_keeps_nothing(tmp_path):
    src = tmp_path / "file.bin"
    src.write_bytes(b"abc")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="does not match the expected"):
        fetch(src.as_uri(), sha256="0" * 64, cache=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_no_network_gives_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="could not download .*place it at"):
        fetch("http://127.0.0.1:9/sonar_text_decoder.pt", cache=tmp_path, progress=False, timeout=5)
    with pytest.raises(ValueError, match="unknown asset"):
        fetch("not_an_asset", cache=tmp_path)
    assert ASSETS["text_sonar_basic_decoder"].url.endswith("/SONAR/sonar_text_decoder.pt")
