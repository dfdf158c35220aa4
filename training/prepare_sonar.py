"""The SONAR a preparation encodes with: the released one (``--sonar basic``), the files a
``sonar.json`` names, or the toy SONAR, built from the corpus at first use (a SentencePiece
vocabulary and a small encoder/decoder trained as an autoencoder, deterministically from its
seed, on one thread) in a scratch directory and installed into ``out/sonar`` only once the
options check passed; rebuilt when its files no longer match the SHA-256 the manifest recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from sonarllm.files import cached_sha256
from sonarllm.sonar.checkpoint import checkpoint_config
from sonarllm.sonar.config import SONAR_CONFIGS
from sonarllm.sonar.pipeline import SonarSpec
from sonarllm.sonar.tokenizer import SonarTokenizer
from sonarllm.sonar.toy import build_toy_sonar, train_toy_sonar, train_toy_tokenizer
from training.shards import (
    MANIFEST,
    SONAR_FIELDS,
    write_json_atomic,
)

log = logging.getLogger("sonarllm.prepare")
BASIC_SONAR = SonarSpec("sonar_tokenizer", "text_sonar_basic_encoder", "text_sonar_basic_decoder")



TOY_FILES = ("toy_spm.model", "toy_encoder.pt", "toy_decoder.pt")
TOY_MARKER = "toy.json"
TOY_FLAGS = {"vocab_size": "--toy-vocab-size", "seed": "--toy-seed", "train_steps": "--toy-train-steps",
             "lang": "--lang", "source_sha256": "a corpus of SHA-256"}  # fmt: skip


def _toy_options(args, source_digest: str) -> dict:
    """What a toy SONAR is built from (recorded in its ``toy.json``)."""
    return {"vocab_size": args.toy_vocab_size, "seed": args.toy_seed, "train_steps": args.toy_train_steps,
            "lang": args.lang, "source_sha256": source_digest}  # fmt: skip


def _read_toy_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / TOY_MARKER).read_text())
    except (OSError, ValueError):
        return None  # absent or half-written


def _toy_files_match(folder: Path, recorded: dict | None) -> bool:
    """Whether the toy SONAR files in ``folder`` have the SHA-256 the manifest recorded
    (``recorded``: its options' ``sonar``; None when there is no manifest yet)."""
    if recorded is None:
        return True
    return all(cached_sha256(folder / f) == recorded.get(field) for field, f in zip(SONAR_FIELDS, TOY_FILES, strict=True))


def _build_toy_sonar(args, folder: Path, scratch: Path, toy_sentences: Callable[[], list[str]], source_digest: str,
                     recorded: dict | None = None) -> Path:  # fmt: skip
    """Where the toy SONAR of these options is: ``folder`` if its ``toy.json`` says it was built
    with them and its files match the SHA-256 the manifest recorded (``recorded``), else
    ``scratch``, where it is built (and trained) now, deterministically from the seed and the
    ``toy_sentences()`` (read only then); ``_install_toy_sonar`` moves it into place once the
    options check has passed."""
    wanted = _toy_options(args, source_digest)
    if _read_toy_marker(folder) == wanted and all((folder / f).is_file() for f in TOY_FILES):
        if _toy_files_match(folder, recorded):
            return folder
        log.warning("the toy SONAR in %s does not match the SHA-256 recorded in %s (a file changed or is corrupted); "
                    "rebuilding it", folder, MANIFEST)  # fmt: skip
    folder = scratch
    marker = folder / TOY_MARKER
    sentences = toy_sentences()
    spm_path = train_toy_tokenizer(sentences, folder / "toy_spm.model", vocab_size=args.toy_vocab_size)
    tokenizer = SonarTokenizer(spm_path)
    enc, dec = build_toy_sonar(tokenizer, folder, seed=args.toy_seed)
    if args.toy_train_steps:
        losses = train_toy_sonar(tokenizer, enc, dec, sentences, steps=args.toy_train_steps, seed=args.toy_seed,
                                 lang=args.lang, progress=not args.quiet)  # fmt: skip
        log.info("toy SONAR trained as an autoencoder: loss %.3f -> %.4f", losses[0], losses[-1])
    write_json_atomic(marker, wanted)
    return folder


def _install_toy_sonar(built: Path, folder: Path) -> None:
    """Copy a toy SONAR built in scratch space into ``folder``, each file atomically and the
    marker last (an interrupted install is rebuilt by the next run)."""
    if built.resolve() == folder.resolve():  # already in place (``built`` is a resolved path)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TOY_MARKER).unlink(missing_ok=True)
    for name in TOY_FILES + (TOY_MARKER,):
        tmp = folder / (name + ".tmp")
        shutil.copyfile(built / name, tmp)
        os.replace(tmp, folder / name)


def resolve_sonar(args, out: Path, scratch: Path, toy_sentences: Callable[[], list[str]],
                  source_digest: str, recorded: dict | None = None) -> tuple[SonarSpec, SonarSpec]:  # fmt: skip
    """The SONAR to use: (where its files are now, what ``sonar.json`` in ``out`` will say).
    A toy SONAR that is not built yet, or whose files do not match the SHA-256 the manifest
    recorded (``recorded``), is built (deterministically) in ``scratch``; nothing is written to
    ``out``."""
    if args.sonar == "toy":
        built = _build_toy_sonar(args, out / "sonar", scratch, toy_sentences, source_digest, recorded)
        now = SonarSpec(*(str((built / f).resolve()) for f in TOY_FILES), args.lang)
        return now, SonarSpec(*(f"sonar/{f}" for f in TOY_FILES), args.lang)
    spec = named_sonar(args)
    return spec, spec


def named_sonar(args) -> SonarSpec:
    """The SONAR ``--sonar basic`` or ``--sonar path/sonar.json`` names (not the toy)."""
    if args.sonar == "basic":
        return SonarSpec(BASIC_SONAR.tokenizer, BASIC_SONAR.encoder, BASIC_SONAR.decoder, args.lang)
    return dataclasses.replace(SonarSpec.load(args.sonar), lang=args.lang)  # its encoder/decoder configs kept


def decoder_positions(spec: SonarSpec) -> int:
    """How many positions the SONAR decoder named by ``spec`` has, resolved as the trainer will
    load it (``spec.decoder_config``, the config the file records, a sonar.json beside it, the
    released architecture's sizes; else CheckpointError, before any encoding); an asset name
    (not a local file) is the released decoder, 512."""
    if spec.decoder and os.path.isfile(spec.decoder):
        return checkpoint_config(spec.decoder, "decoder", config=spec.decoder_config).max_seq_len
    return SONAR_CONFIGS["basic"].max_seq_len


def encoder_dim(spec: SonarSpec) -> int:
    """The embedding dimension of the SONAR encoder ``spec`` names (resolved as loading does);
    an asset name is the released encoder, 1024."""
    if spec.encoder and os.path.isfile(spec.encoder):
        return checkpoint_config(spec.encoder, "encoder", config=spec.encoder_config).model_dim
    return SONAR_CONFIGS["basic"].model_dim


def _identity(spec: SonarSpec) -> dict:
    """What identifies the SONAR that made the data: file digests, or asset names."""
    ident = {}
    for field in SONAR_FIELDS:
        value = getattr(spec, field)
        ident[field] = cached_sha256(value) if value and os.path.isfile(value) else value
    return ident
