"""Prepare training data once: text -> documents -> sentences -> SONAR embeddings + target tokens.

    python training/prepare_data.py --source corpus.jsonl --out data/mycorpus [--sonar toy|basic|sonar.json]
    sonarllm prepare ...                                       # the same

Each document becomes at most ``--max-sentences`` sentences plus "End of sequence." (documents
with fewer than two items are dropped). Sentences are embedded with the SONAR encoder (batched,
with a progress bar) and tokenised in SONAR's target mode (``[</s>, lang, pieces, </s>]``, cut to
``--max-target-tokens``). The last ``--eval-documents`` documents form the held-out split.

``--sonar toy`` (the default) trains a small SentencePiece model on the corpus and writes a
seeded random toy SONAR encoder/decoder; ``--sonar basic`` uses the released SONAR files
(downloaded to the cache); a path to a ``sonar.json`` uses the files it names.

Re-running resumes: shards already written are verified against their SHA-256 and kept; a
missing or corrupted shard (reported by name) is rebuilt. Changing an option that alters the
data of an existing directory is refused before anything is written (a toy SONAR that must be
rebuilt is built in a scratch directory and installed only once the options check passed). Two
preparations of one directory run one after the other: the second waits for the first's lock
(``prepare.lock``, named holder) and then reuses its shards. SIGINT or SIGTERM ends a preparation
in one line (exit status 130) after removing its scratch directory; re-running resumes it.
Sentence splitting reads only what ``--max-sentences`` needs of each document (sonarllm/text.py),
so preparation time is linear in the corpus size, and a progress bar counts the documents.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages, not training/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile

import torch

from sonarllm.corpus import read_documents
from sonarllm.sonar.checkpoint import checkpoint_config
from sonarllm.sonar.config import SONAR_CONFIGS
from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from sonarllm.sonar.tokenizer import SonarTokenizer
from sonarllm.sonar.toy import build_toy_sonar, train_toy_sonar, train_toy_tokenizer
from sonarllm.text import EOS_SENTENCE, document_sentences
from training.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    read_manifest,
    sha256_file,
    write_json_atomic,
    write_shard,
)
from training.runlock import describe_holder, read_holder, write_holder

log = logging.getLogger("sonarllm.prepare")
DEFAULT_SOURCE = Path(__file__).resolve().parent / "example" / "stories.jsonl.gz"
LOCK_NAME = "prepare.lock"
BASIC_SONAR = SonarSpec("sonar_tokenizer", "text_sonar_basic_encoder", "text_sonar_basic_decoder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sonarllm prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="corpus: .txt, .jsonl (optionally .gz) or a directory of .txt files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sonar", default="toy", help="'toy', 'basic' or a path to a sonar.json")
    p.add_argument("--lang", default="eng_Latn", help="SONAR language code of the corpus")
    p.add_argument("--max-sentences", type=int, default=32, help="sentences kept per document (before the end sentence)")
    p.add_argument("--max-target-tokens", type=int, default=256, help="cut target token sequences to this length")
    p.add_argument("--eval-documents", type=int, default=100, help="documents held out for evaluation")
    p.add_argument("--shard-documents", type=int, default=1000, help="documents per shard")
    p.add_argument("--embedding-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--toy-vocab-size", type=int, default=1000)
    p.add_argument("--toy-seed", type=int, default=0)
    p.add_argument("--toy-train-steps", type=int, default=600,
                   help="autoencoder steps that give the toy SONAR a meaningful space (0: leave it random)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--device", default="auto", help="device for the SONAR encoder")
    p.add_argument("--max-tokens", type=int, default=16_384, help="tokens per encoder batch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("max_sentences", "max_target_tokens", "shard_documents", "toy_vocab_size", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_docs is not None and args.max_docs < 1:
        p.error("--max-docs must be >= 1")
    if args.eval_documents < 1:
        p.error("--eval-documents must be >= 1 (the trainer evaluates on held-out documents)")
    if args.toy_train_steps < 0:
        p.error("--toy-train-steps must be >= 0")
    if args.max_target_tokens < 4:
        p.error("--max-target-tokens must be >= 4 (</s>, language tag, a piece, </s>)")
    from sonarllm.sonar.langs import NLLB_LANGS

    if args.lang not in NLLB_LANGS:
        p.error(f"--lang must be a SONAR language code such as eng_Latn, got {args.lang!r}")
    return args


def _source_digest(source: Path) -> str:
    """SHA-256 over the corpus file(s), so a changed corpus is noticed."""
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(source)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_documents(source: Path, max_sentences: int, max_docs: int | None, *, progress: bool = False) -> list[list[str]]:
    """Sentence lists (with the end sentence) of every document with at least two items."""
    from tqdm.auto import tqdm

    docs = []
    for text in tqdm(read_documents(source), desc="split", unit="doc", disable=not progress, dynamic_ncols=True):
        sentences = document_sentences(text, max_sentences=max_sentences)
        if len(sentences) >= 2:
            docs.append(sentences)
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise ValueError(f"{source} holds no document with at least one sentence")
    return docs


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


def _build_toy_sonar(args, folder: Path, scratch: Path, train_docs: list[list[str]], source_digest: str) -> Path:
    """Where the toy SONAR of these options is: ``folder`` if its ``toy.json`` says it was built
    with them, else ``scratch``, where it is built (and trained) now; ``_install_toy_sonar``
    moves it into place once the options check has passed."""
    wanted = _toy_options(args, source_digest)
    if _read_toy_marker(folder) == wanted and all((folder / f).is_file() for f in TOY_FILES):
        return folder
    folder = scratch
    marker = folder / TOY_MARKER
    sentences = [s for doc in train_docs for s in doc]
    spm_path = train_toy_tokenizer(sentences[:200_000], folder / "toy_spm.model", vocab_size=args.toy_vocab_size)
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


def resolve_sonar(args, out: Path, scratch: Path, train_docs: list[list[str]], source_digest: str) -> tuple[SonarSpec, SonarSpec]:
    """The SONAR to use: (where its files are now, what ``sonar.json`` in ``out`` will say).
    A toy SONAR that is not built yet is built (deterministically) in ``scratch``; nothing is
    written to ``out``."""
    if args.sonar == "toy":
        built = _build_toy_sonar(args, out / "sonar", scratch, train_docs, source_digest)
        now = SonarSpec(*(str((built / f).resolve()) for f in TOY_FILES), args.lang)
        return now, SonarSpec(*(f"sonar/{f}" for f in TOY_FILES), args.lang)
    if args.sonar == "basic":
        spec = SonarSpec(BASIC_SONAR.tokenizer, BASIC_SONAR.encoder, BASIC_SONAR.decoder, args.lang)
    else:
        spec = SonarSpec.load(args.sonar)
        spec = dataclasses.replace(spec, lang=args.lang)  # its encoder/decoder configs kept
    return spec, spec


def decoder_positions(spec: SonarSpec) -> int:
    """How many positions the SONAR decoder named by ``spec`` has, resolved as the trainer will
    load it (``spec.decoder_config``, the config the file records, a sonar.json beside it, the
    released architecture's sizes; else CheckpointError, before any encoding); an asset name
    (not a local file) is the released decoder, 512."""
    if spec.decoder and os.path.isfile(spec.decoder):
        return checkpoint_config(spec.decoder, "decoder", config=spec.decoder_config).max_seq_len
    return SONAR_CONFIGS["basic"].max_seq_len


def _identity(spec: SonarSpec) -> dict:
    """What identifies the SONAR that made the data: file digests, or asset names."""
    ident = {}
    for field in ("tokenizer", "encoder", "decoder"):
        value = getattr(spec, field)
        ident[field] = sha256_file(value) if value and os.path.isfile(value) else value
    return ident


def _encode_shard(pipe: SonarPipeline, docs: list[list[str]], lang: str, max_target: int, dtype, max_tokens, progress):
    sentences = [s for doc in docs for s in doc]
    emb = pipe.encode(sentences, lang=lang, max_tokens=max_tokens, progress=progress).to(dtype).cpu()
    seqs = pipe.tokenizer.encode(sentences, lang=lang, mode="target")
    eos = pipe.tokenizer.eos_idx
    seqs = [s if len(s) <= max_target else s[: max_target - 1] + [eos] for s in seqs]
    sentence_offsets = [0]
    for doc in docs:
        sentence_offsets.append(sentence_offsets[-1] + len(doc))
    token_offsets = [0]
    for s in seqs:
        token_offsets.append(token_offsets[-1] + len(s))
    return emb, sentence_offsets, [t for s in seqs for t in s], token_offsets


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on ``out/prepare.lock`` (creating ``out``), so that two preparations
    of one directory (two first-use trainings sharing data.prepared_dir) run one after the other:
    the second waits, with a note naming the holder, and then reuses what the first prepared. The
    kernel drops the lock when its holder ends, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another preparation of %s to finish (%s)", out, describe_holder(read_holder(fd)))
            fcntl.flock(fd, fcntl.LOCK_EX)
        write_holder(fd)
        yield
        os.ftruncate(fd, 0)  # no holder any more
    finally:
        os.close(fd)  # drops the lock


def prepare(args: argparse.Namespace) -> dict:
    """Run (or resume) preparation; returns the manifest."""
    source, out = Path(args.source), Path(args.out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a directory")
    docs = load_documents(source, args.max_sentences, args.max_docs, progress=not args.quiet)
    if len(docs) < 2:
        within = f" within --max-docs {args.max_docs}" if args.max_docs is not None else ""
        raise ValueError(f"{source} holds only {len(docs)} usable document{within}; at least 2 are needed, one for "
                         "training and one held out for evaluation (the trainer evaluates on it)")  # fmt: skip
    n_eval = min(args.eval_documents, len(docs) // 2)
    if n_eval < args.eval_documents:
        log.warning("--eval-documents %d capped to %d: the corpus has %d usable document(s) and at least half are "
                    "kept for training", args.eval_documents, n_eval, len(docs))  # fmt: skip
    train_docs, eval_docs = docs[: len(docs) - n_eval], docs[len(docs) - n_eval :]
    with _sigterm_interrupts(), _locked(out):
        return _prepare_locked(args, source, out, train_docs, eval_docs)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt while preparing, as SIGINT does, so that the scratch
    directory of a toy SONAR build and the lock are cleaned up on the way out (the default
    action would end the process on the spot). Only where handlers can be set (main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare_locked(args, source: Path, out: Path, train_docs: list[list[str]], eval_docs: list[list[str]]) -> dict:
    """``prepare`` once the documents are read and ``out`` is locked."""
    manifest_path = out / MANIFEST
    manifest = read_manifest(out) if manifest_path.exists() else None
    digest = _source_digest(source)
    marker, wanted = _read_toy_marker(out / "sonar"), _toy_options(args, digest)
    if manifest is not None and args.sonar == "toy" and marker is not None and marker != wanted:
        built = ", ".join(f"{TOY_FLAGS.get(k, k)} {v}" for k, v in marker.items() if wanted.get(k) != v)
        raise ShardError(f"{out} was prepared with different options (sonar); its toy SONAR was built with {built}; "
                         f"use a new --out directory or delete {manifest_path}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sonarllm-toy-") as scratch:
        spec, saved_spec = resolve_sonar(args, out, Path(scratch), train_docs, digest)
        max_target = min(args.max_target_tokens, decoder_positions(spec))  # decoder inputs must fit
        options = {
            "source": str(source.resolve()), "source_sha256": digest, "lang": args.lang,
            "max_sentences": args.max_sentences, "max_target_tokens": max_target,
            "eval_documents": len(eval_docs), "shard_documents": args.shard_documents, "max_docs": args.max_docs,
            "embedding_dtype": args.embedding_dtype, "eos_sentence": EOS_SENTENCE, "sonar": _identity(spec),
        }  # fmt: skip
        if manifest is not None and manifest["options"] != options:
            changed = sorted(k for k in options if manifest["options"].get(k) != options[k])
            raise ShardError(
                f"{out} was prepared with different options ({', '.join(changed)}); use a new --out directory "
                f"or delete {manifest_path}"
            )
        if args.sonar == "toy":
            _install_toy_sonar(Path(spec.tokenizer).parent, out / "sonar")
        saved_spec.save(out / "sonar.json")
    spec = SonarSpec.load(out / "sonar.json")
    done = {s["name"]: s for s in manifest["shards"]} if manifest else {}
    plan = []
    for split, split_docs in (("train", train_docs), ("eval", eval_docs)):
        for i, start in enumerate(range(0, len(split_docs), args.shard_documents)):
            plan.append((f"{split}-{i:05d}.safetensors", split, split_docs[start : start + args.shard_documents]))

    command = "sonarllm prepare " + " ".join(shlex.quote(a) for a in _argv(args))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    pipe = None
    shards = []
    for name, split, shard_docs in plan:
        path = out / name
        entry = done.get(name)
        if entry is not None and path.is_file():
            if sha256_file(path) == entry["sha256"]:
                log.info("shard %s verified, kept", name)
                shards.append(entry)
                continue
            log.warning("shard %s failed its checksum; rebuilding it", name)
        if pipe is None:
            pipe = SonarPipeline.from_spec(spec, decoder=False, device=device)
        emb, so, tokens, to = _encode_shard(pipe, shard_docs, args.lang, max_target,
                                            getattr(torch, args.embedding_dtype), args.max_tokens, not args.quiet)  # fmt: skip
        digest = write_shard(path, emb, so, tokens, to)
        shards.append({"name": name, "split": split, "documents": len(shard_docs), "sentences": so[-1],
                       "tokens": len(tokens), "sha256": digest, "bytes": path.stat().st_size})  # fmt: skip
        log.info("shard %s written (%d documents)", name, len(shard_docs))
        write_json_atomic(manifest_path, _manifest(options, shards, emb.shape[1], command))
    embedding_dim = pipe.encoder.config.model_dim if pipe else (manifest or {}).get("embedding_dim")
    manifest = _manifest(options, shards, embedding_dim, command, complete=True)
    write_json_atomic(manifest_path, manifest)
    return manifest


def _manifest(options: dict, shards: list[dict], embedding_dim: int, command: str, complete: bool = False) -> dict:
    totals = {split: {k: sum(s[k] for s in shards if s["split"] == split) for k in ("documents", "sentences", "tokens")}
              for split in ("train", "eval")}  # fmt: skip
    return {"format_version": FORMAT_VERSION, "complete": complete, "embedding_dim": embedding_dim,
            "options": options, "command": command, "totals": totals, "shards": shards}  # fmt: skip


def _argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` (what a rebuild must repeat)."""
    out = []
    for key, value in vars(args).items():
        if key in ("quiet", "device", "max_tokens") or value is None:
            continue
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        manifest = prepare(args)
    except (ShardError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"sonarllm prepare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sonarllm prepare: interrupted; run the same command again to resume preparing {args.out}",
              file=sys.stderr)  # fmt: skip
        return 130
    t = manifest["totals"]
    print(f"prepared {args.out}: train {t['train']['documents']} documents / {t['train']['sentences']} sentences / "
          f"{t['train']['tokens']} tokens; eval {t['eval']['documents']} documents")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
