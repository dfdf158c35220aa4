"""Prepared-data shards: SONAR embeddings and target tokens of documents, with a manifest.

A prepared directory holds::

    manifest.json            options, SONAR identity, totals, one entry per shard (with SHA-256)
    sonar.json               the SonarSpec of the tokenizer/encoder/decoder used
    sonar/                   the toy SONAR files, when the toy SONAR was built
    prepare.lock             held by a preparation while it writes here (a second one waits)
    prepare.progress/        while a preparation is unfinished: one record per shard written
    train-00000.safetensors  ...  eval-00000.safetensors

Each shard (safetensors) holds, for its documents::

    embeddings       [sentences, E]      sentence embeddings (float32 or float16)
    sentence_offsets [documents + 1]     int64, document d's sentences are rows [o[d], o[d+1])
    tokens           [tokens]            int32, SONAR target-mode ids [</s>, lang, ..., </s>] of every sentence
    token_offsets    [sentences + 1]     int64

Reading is lazy (safetensors memory-maps the file; a document's rows are sliced on demand), so a
rank touches only the documents it trains on. Every shard's SHA-256 is checked against the
manifest before use; a mismatch names the shard.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from sonarllm.files import sha256_file, write_json_atomic  # noqa: F401 (re-exported: training imports them from here)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardError(ValueError):
    """Prepared data that is missing, corrupted or inconsistent."""


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no prepared data in {directory} ({MANIFEST} missing): run training/prepare_data.py first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is corrupted ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def write_shard(path: Path, embeddings: torch.Tensor, sentence_offsets, tokens, token_offsets) -> str:
    """Write one shard atomically; returns its SHA-256."""
    from safetensors.torch import save_file

    tensors = {
        "embeddings": embeddings.contiguous(),
        "sentence_offsets": torch.as_tensor(sentence_offsets, dtype=torch.int64),
        "tokens": torch.as_tensor(tokens, dtype=torch.int32),
        "token_offsets": torch.as_tensor(token_offsets, dtype=torch.int64),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file private; give it the usual permissions
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def rebuild_command(manifest: dict, directory: str | os.PathLike) -> str:
    """The preparation command recorded in the manifest, with ``--out`` naming ``directory``
    (where the data is now, which need not be where it was prepared)."""
    command = manifest.get("command")
    if not command:
        return f"training/prepare_data.py --out {shlex.quote(str(directory))} with the options in {MANIFEST}"
    words = shlex.split(command)
    if "--out" in words[:-1]:
        words[words.index("--out") + 1] = str(directory)
    return shlex.join(words)


def verify_shards(directory: str | os.PathLike, manifest: dict | None = None) -> None:
    """Check every shard's presence and SHA-256 against the manifest; the error names the shard
    and gives the command that rebuilds it."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    rebuild = rebuild_command(manifest, directory)
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        if not path.is_file():
            raise ShardError(f"shard {entry['name']} listed in the manifest is missing from {directory}; rebuild it with: {rebuild}")
        if sha256_file(path) != entry["sha256"]:
            raise ShardError(
                f"shard {entry['name']} failed its checksum (the file changed or is corrupted); "
                f"rebuild it with: {rebuild}"
            )


SONAR_FIELDS = ("tokenizer", "encoder", "decoder")


def is_digest(value) -> bool:
    """Whether a recorded SONAR identity is a SHA-256 (a local file), not an asset name."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def verify_sonar(directory: str | os.PathLike, manifest: dict | None = None, fields=SONAR_FIELDS) -> None:
    """Check the SONAR files ``sonar.json`` names (``fields`` of tokenizer, encoder, decoder: the
    ones the caller uses) against the SHA-256 the manifest recorded when the data was prepared:
    data embedded by one encoder and trained through another decoder trains silently on garbage.
    Each file is hashed once per process (sonarllm.files.cached_sha256). Released SONAR assets
    (recorded by name) are verified by sonarllm.sonar.download when fetched. The error names the
    file and the remedy."""
    from sonarllm.files import cached_sha256
    from sonarllm.sonar.pipeline import SonarSpec

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    recorded = manifest["options"].get("sonar") or {}
    spec = SonarSpec.load(directory / "sonar.json")  # FileNotFoundError naming a missing file
    for field in fields:
        want, path = recorded.get(field), getattr(spec, field)
        if not is_digest(want) or path is None or not os.path.isfile(path):
            continue
        if cached_sha256(path) == want:
            continue
        if Path(path).resolve().is_relative_to((directory / "sonar").resolve()):  # the toy SONAR, rebuilt by prepare
            remedy = f"rebuild it with: {rebuild_command(manifest, directory)}"
        else:
            remedy = "put the original file back, or prepare the corpus with this SONAR into a new data.prepared_dir"
        raise ShardError(
            f"SONAR {field} {path} does not match the SHA-256 recorded when {directory} was prepared (the file "
            f"changed or is corrupted); {remedy}; or set data.verify_sonar false to train with it anyway"
        )


@dataclass
class Document:
    """One document: its sentence embeddings [S, E] and the target-mode token ids of each sentence."""

    embeddings: torch.Tensor
    tokens: list[list[int]]


class ShardedDocuments:
    """Random access to the documents of one split of a prepared directory.

    Args:
        directory: the prepared directory.
        split: "train" or "eval".
        verify: check every shard's SHA-256 against the manifest first.
    """

    def __init__(self, directory: str | os.PathLike, split: str, *, verify: bool = True):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        entries = [s for s in self.manifest["shards"] if s["split"] == split]
        if not entries:
            raise ShardError(f"{self.directory} has no {split!r} shards")
        if verify:
            verify_shards(self.directory, {**self.manifest, "shards": entries})
        self._files, self._sentence_offsets, self._token_offsets = [], [], []
        doc_index = []
        for i, entry in enumerate(entries):
            path = self.directory / entry["name"]
            if not path.is_file():
                raise ShardError(f"shard {entry['name']} listed in the manifest is missing from {self.directory}")
            handle = safe_open(str(path), framework="pt")
            self._files.append(handle)
            self._sentence_offsets.append(handle.get_tensor("sentence_offsets"))
            self._token_offsets.append(handle.get_tensor("token_offsets"))
            doc_index += [(i, d) for d in range(entry["documents"])]
        self._doc_index = doc_index
        self.embedding_dim = int(self.manifest["embedding_dim"])

    def __len__(self) -> int:
        return len(self._doc_index)

    def longest_document(self) -> int:
        """The most sentences one document of this split has (the positions a model needs)."""
        return max(int((o[1:] - o[:-1]).max()) for o in self._sentence_offsets)

    def num_sentences(self, doc: int) -> int:
        shard, d = self._doc_index[doc]
        o = self._sentence_offsets[shard]
        return int(o[d + 1] - o[d])

    def sentence_token_counts(self, doc: int) -> list[int]:
        """Length of each sentence's target-mode token sequence."""
        shard, d = self._doc_index[doc]
        so, to = self._sentence_offsets[shard], self._token_offsets[shard]
        return (to[so[d] + 1 : so[d + 1] + 1] - to[so[d] : so[d + 1]]).tolist()

    def __getitem__(self, doc: int) -> Document:
        shard, d = self._doc_index[doc]
        f, so, to = self._files[shard], self._sentence_offsets[shard], self._token_offsets[shard]
        first, last = int(so[d]), int(so[d + 1])
        embeddings = f.get_slice("embeddings")[first:last]
        flat = f.get_slice("tokens")[int(to[first]) : int(to[last])].tolist()
        bounds = (to[first : last + 1] - to[first]).tolist()
        return Document(embeddings, [flat[bounds[i] : bounds[i + 1]] for i in range(last - first)])
