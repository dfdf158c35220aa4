"""Prepare training data once: text -> documents -> sentences -> SONAR embeddings + target tokens.

    python training/prepare_data.py --source corpus.jsonl --out data/mycorpus [--sonar toy|basic|sonar.json]
    sonarllm prepare ...                                       # the same
    torchrun --nproc_per_node N training/prepare_data.py ...   # N processes (and GPUs); add --nnodes for nodes

The corpus is any format ``sonarllm.corpus`` reads (text or JSONL, optionally gzip/zstd,
Parquet, a Hugging Face ``datasets`` directory), the text in ``--text-field``. Each document
becomes at most ``--max-sentences`` sentences plus "End of sequence." Sentences are embedded
with the SONAR encoder (a shard at a time, batched by length, ``--max-tokens`` per batch) and
tokenised in SONAR's target mode (``[</s>, lang, pieces, </s>]``, cut to
``--max-target-tokens``). The last ``--eval-documents`` documents form the held-out split.
Pre-split, pre-embedded documents (``--embedding-field``: a Parquet or datasets column of SONAR
vectors beside the ``--text-field`` column of sentences, as LCM's pipeline writes) are used
without re-encoding, checked for dtype and the encoder's dimension; only the end sentence is
encoded.

The corpus is streamed, never held in memory: a first pass counts the documents (to place the
eval split), the toy SONAR (if built) learns from the first 200,000 training sentences, and
the encoding pass holds one shard's documents at a time.

``--sonar toy`` (the default) trains a small SentencePiece model on the corpus and writes a
seeded random toy SONAR encoder/decoder; ``--sonar basic`` uses the released SONAR files
(downloaded to the cache); a path to a ``sonar.json`` uses the files it names.

``--out`` must be new, empty or a preparation (its ``prepare.lock``, created first, or its
manifest): a directory a user made is refused untouched (exit 2; under torchrun rank 0 checks it
before anything is written). The manifest records the SHA-256 of the SONAR files and the corpus'
size and modification time (training checks both).

Under torchrun every rank reads the corpus; rank 0 checks the options and builds the toy SONAR
(once, for all), rank r encodes shards r, r + N, r + 2N, ... (on GPU ``LOCAL_RANK`` where there
is one), and rank 0 writes the manifest once every shard verifies. A shard is encoded in one
piece whatever N, so the shards and the manifest are byte for byte those of one process (the
encoder's floats depend on how sentences are batched, so batches never span ranks). The output
directory must be on a filesystem every rank sees.

Re-running resumes (with any number of processes): shards already written are verified against
their SHA-256 and kept (each rank records the shards it finished in ``prepare.progress/`` until
the manifest is written); a missing or corrupted shard (reported by name) is rebuilt, and so
is a toy SONAR whose files no longer match the manifest. Changing an option that alters the
data of an existing directory is refused before anything is written (a toy SONAR that must be
rebuilt is built in a scratch directory and installed only once the options check passed). Two preparations of one directory run one after the other: the second
waits for the first's lock (``prepare.lock``, named holder, held by rank 0) and then reuses its
shards. Sentence splitting reads only what ``--max-sentences`` needs of each document
(sonarllm/text.py), so preparation time is linear in the corpus size. SIGINT or SIGTERM ends a
preparation in one line (exit status 130) after removing its scratch directory; re-running
resumes it.

Size: about 470 lines, the preparation's command line and its one pipeline (set-up, encoding
pass, manifest), kept together so that it reads in order; what it reads, the SONAR it encodes
with and its ranks are in prepare_corpus.py, prepare_sonar.py and prepare_ranks.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages, not training/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import tempfile

import torch

from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from sonarllm.text import EOS_SENTENCE
from training.prepare_corpus import (  # noqa: F401 (load_documents, corpus_digest, source_stat: for callers of this module)
    _split_document,
    _stream,
    _toy_sentences,
    corpus_digest,
    load_documents,
    source_stat,
)
from training.prepare_ranks import (
    PROGRESS,
    PlannedShard,
    Ranks,
    _options_digest,
    _progress_entries,
    plan_shards,
)
from training.prepare_sonar import (  # noqa: F401 (decoder_positions: also for callers of this module)
    TOY_FLAGS,
    _identity,
    _install_toy_sonar,
    _read_toy_marker,
    _toy_options,
    decoder_positions,
    encoder_dim,
    named_sonar,
    resolve_sonar,
)
from training.runlock import describe_holder, read_holder, write_holder
from training.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    read_manifest,
    sha256_file,
    write_json_atomic,
    write_shard,
)

log = logging.getLogger("sonarllm.prepare")
DEFAULT_SOURCE = Path(__file__).resolve().parent / "example" / "stories.jsonl.gz"
LOCK_NAME = "prepare.lock"


class ForeignOutError(ValueError):
    """``--out`` is a directory with files that no preparation made (exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sonarllm prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(DEFAULT_SOURCE),
                   help="corpus: .txt or .jsonl (optionally .gz or .zst), .parquet, a directory of .parquet or .txt "
                        "files, or a Hugging Face datasets directory (save_to_disk)")
    p.add_argument("--text-field", default="text",
                   help="the document's field (JSONL) or column (Parquet, datasets); with --embedding-field the "
                        "column of each document's sentences")
    p.add_argument("--embedding-field", default=None,
                   help="pre-embedded input: the column of each document's SONAR vectors (list<list<float>>, as LCM's "
                        "pipeline writes), used without re-encoding; needs --sonar naming the SONAR that made them")
    p.add_argument("--split", default="train", help="the split to read from a datasets DatasetDict directory")
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
    if args.embedding_field and args.sonar == "toy":
        p.error("--embedding-field needs --sonar basic or a sonar.json naming the SONAR that made the embeddings "
                "(the toy SONAR is trained on the corpus and cannot match them)")
    if args.max_target_tokens < 4:
        p.error("--max-target-tokens must be >= 4 (</s>, language tag, a piece, </s>)")
    from sonarllm.sonar.langs import NLLB_LANGS

    if args.lang not in NLLB_LANGS:
        p.error(f"--lang must be a SONAR language code such as eng_Latn, got {args.lang!r}")
    return args


def _encode_shard(pipe: SonarPipeline, docs: list, lang: str, max_target: int, dtype, max_tokens, progress,
                  eos_emb_1D: torch.Tensor | None = None):  # fmt: skip
    """The tensors of one shard. Text documents (sentence lists) are encoded here, in one call
    whatever the number of processes, so a shard's encoder batches (sentences sorted by length,
    ``max_tokens`` each) and hence its bytes never depend on the ranks: the encoder's float
    results do depend on a batch's composition. Pre-embedded documents ((sentences, embeddings_SD)
    pairs) keep their vectors; their end sentence gets ``eos_emb_1D``."""
    embedded = bool(docs) and isinstance(docs[0], tuple)
    sentence_docs = [sentences for sentences, _ in docs] if embedded else docs
    sentences = [s for doc in sentence_docs for s in doc]
    if embedded:
        emb = torch.cat([t for _, emb_SD in docs for t in (torch.tensor(emb_SD, dtype=torch.float32), eos_emb_1D[None])])
        emb = emb.to(dtype)
    else:
        emb = pipe.encode(sentences, lang=lang, max_tokens=max_tokens, progress=progress).to(dtype).cpu()
    seqs = pipe.tokenizer.encode(sentences, lang=lang, mode="target")
    eos = pipe.tokenizer.eos_idx
    seqs = [s if len(s) <= max_target else s[: max_target - 1] + [eos] for s in seqs]
    sentence_offsets = [0]
    for doc in sentence_docs:
        sentence_offsets.append(sentence_offsets[-1] + len(doc))
    token_offsets = [0]
    for s in seqs:
        token_offsets.append(token_offsets[-1] + len(s))
    return emb, sentence_offsets, [t for s in seqs for t in s], token_offsets


def _is_preparation(out: Path) -> bool:
    """Whether ``out`` holds a preparation: its ``prepare.lock`` (created before anything else is
    written there) or a manifest of ours."""
    if (out / LOCK_NAME).is_file():
        return True
    try:
        read_manifest(out)
    except (ShardError, OSError, ValueError):
        return False
    return True


def check_out(out: Path) -> None:
    """Refuse to write into a directory a user made: ``out`` must be new, empty or a preparation
    (ForeignOutError, nothing written)."""
    if out.is_dir() and any(out.iterdir()) and not _is_preparation(out):
        raise ForeignOutError(f"{out} is not empty and holds no preparation ({LOCK_NAME} or {MANIFEST}); "
                              "choose a new or empty directory")  # fmt: skip


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


def prepare(args: argparse.Namespace, ranks: Ranks | None = None) -> dict:
    """Run (or resume) preparation; returns the manifest. With several ``ranks`` (torchrun),
    shard i is encoded by rank i mod N and rank 0 writes the manifest once every shard verifies;
    the result is byte for byte that of one process. ``--out`` must be new, empty or a
    preparation: rank 0 checks it before anything is written (ForeignOutError)."""
    ranks = ranks or Ranks()
    source, out = Path(args.source), Path(args.out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a directory")
    ranks.run(lambda: check_out(out), rank0_only=True)
    dim = encoder_dim(named_sonar(args)) if args.embedding_field else None
    n_docs = ranks.run(lambda: _count_documents(args, dim))
    n_eval = min(args.eval_documents, n_docs // 2)
    if n_eval < args.eval_documents and ranks.rank == 0:
        log.warning("--eval-documents %d capped to %d: the corpus has %d usable document(s) and at least half are "
                    "kept for training", args.eval_documents, n_eval, n_docs)  # fmt: skip
    plan = plan_shards(n_docs - n_eval, n_eval, args.shard_documents)
    with _sigterm_interrupts(), _locked(out) if ranks.rank == 0 else contextlib.nullcontext():
        stat = ranks.run(lambda: _set_up(args, source, out, n_docs - n_eval, n_eval), rank0_only=True)  # rank 0's
        manifest = read_manifest(out)  # the options, as rank 0 settled them
        ranks.run(lambda: _encode_shards(args, out, manifest, plan, dim, ranks))
        return ranks.run(lambda: _finish(args, out, manifest, plan, stat) if ranks.rank == 0 else None) or \
            read_manifest(out)


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


def _count_documents(args, dim: int | None) -> int:
    """How many documents preparation uses (a first, cheap pass: nothing is split or encoded)."""
    from tqdm.auto import tqdm

    source = Path(args.source)
    n = sum(1 for _ in tqdm(_stream(args, dim), desc="read", unit="doc", disable=args.quiet, dynamic_ncols=True))
    if n == 0:
        raise ValueError(f"{source} holds no document with at least one sentence")
    if n < 2:
        within = f" within --max-docs {args.max_docs}" if args.max_docs is not None else ""
        raise ValueError(f"{source} holds only {n} usable document{within}; at least 2 are needed, one for "
                         "training and one held out for evaluation (the trainer evaluates on it)")  # fmt: skip
    return n


def _set_up(args, source: Path, out: Path, n_train: int, n_eval: int) -> dict:
    """Rank 0, with ``out`` locked: check the options against an earlier preparation (refusing
    before anything is written), build the toy SONAR if needed (or rebuild it if its files no
    longer match the SHA-256 the manifest recorded), and write ``sonar.json`` and an unfinished
    manifest holding the options the other ranks then read. Returns the corpus' ``source_stat``
    (taken before its digest: a corpus edited meanwhile is then noticed by the trainer)."""
    manifest_path = out / MANIFEST
    manifest = read_manifest(out) if manifest_path.exists() else None
    stat = source_stat(source)
    digest = corpus_digest(source)
    marker, wanted = _read_toy_marker(out / "sonar"), _toy_options(args, digest)
    if manifest is not None and args.sonar == "toy" and marker is not None and marker != wanted:
        built = ", ".join(f"{TOY_FLAGS.get(k, k)} {v}" for k, v in marker.items() if wanted.get(k) != v)
        raise ShardError(f"{out} was prepared with different options (sonar); its toy SONAR was built with {built}; "
                         f"use a new --out directory or delete {manifest_path}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sonarllm-toy-") as scratch:
        recorded = manifest["options"].get("sonar") if manifest is not None else None
        spec, saved_spec = resolve_sonar(args, out, Path(scratch), lambda: _toy_sentences(args, n_train), digest,
                                         recorded)  # fmt: skip
        max_target = min(args.max_target_tokens, decoder_positions(spec))  # decoder inputs must fit
        options = {
            "source": str(source.resolve()), "source_sha256": digest, "lang": args.lang,
            "max_sentences": args.max_sentences, "max_target_tokens": max_target,
            "eval_documents": n_eval, "shard_documents": args.shard_documents, "max_docs": args.max_docs,
            "embedding_dtype": args.embedding_dtype, "eos_sentence": EOS_SENTENCE, "sonar": _identity(spec),
        }  # fmt: skip
        reading = {"text_field": args.text_field, "embedding_field": args.embedding_field, "split": args.split}
        if reading != READING_DEFAULTS:  # recorded only when not the defaults: older preparations stay valid
            options["reading"] = reading
        if manifest is not None and manifest["options"] != options:
            changed = sorted(k for k in options.keys() | manifest["options"].keys()
                             if manifest["options"].get(k) != options.get(k))  # fmt: skip
            raise ShardError(
                f"{out} was prepared with different options ({', '.join(changed)}); use a new --out directory "
                f"or delete {manifest_path}"
            )
        if args.sonar == "toy":
            _install_toy_sonar(Path(spec.tokenizer).parent, out / "sonar")
        saved_spec.save(out / "sonar.json")
        dim = encoder_dim(spec)  # while a toy SONAR's scratch files exist
    if manifest is None:  # records of a preparation whose manifest was deleted describe other options
        shutil.rmtree(out / PROGRESS, ignore_errors=True)
    if manifest is None or not manifest["complete"]:
        shards = manifest["shards"] if manifest else []
        write_json_atomic(manifest_path, _manifest(options, shards, dim, _command(args), stat))
    return stat


READING_DEFAULTS = {"text_field": "text", "embedding_field": None, "split": "train"}


def _device(args, ranks: Ranks) -> str:
    """``--device``; ``auto`` is this rank's GPU (local rank) where there is one, else the CPU."""
    if args.device != "auto":
        return args.device
    return f"cuda:{ranks.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _encode_shards(args, out: Path, manifest: dict, plan: list[PlannedShard], dim: int | None, ranks: Ranks) -> None:
    """Write this rank's shards (plan index mod world == rank) that are not already there and
    verified, reading the corpus once more and splitting only their documents; each shard is
    followed by its record in ``prepare.progress/``."""
    options = manifest["options"]
    known = {s["name"]: s for s in manifest["shards"]} | _progress_entries(out, options)
    todo = []
    for shard in plan[ranks.rank :: ranks.world]:
        path, entry = out / shard.name, known.get(shard.name)
        if entry is not None and path.is_file():
            if sha256_file(path) == entry["sha256"]:
                log.info("shard %s verified, kept", shard.name)
                continue
            log.warning("shard %s failed its checksum; rebuilding it", shard.name)
        todo.append(shard)
    if not todo:
        return
    spec = SonarSpec.load(out / "sonar.json")
    pipe = SonarPipeline.from_spec(spec, decoder=False, device=_device(args, ranks))
    eos_emb = pipe.encode([EOS_SENTENCE], lang=args.lang)[0].cpu() if args.embedding_field else None
    (out / PROGRESS).mkdir(exist_ok=True)
    pending, docs = iter(todo), []
    shard = next(pending)
    for k, doc in enumerate(_stream(args, dim)):
        if k < shard.start:
            continue  # another rank's document, or one of a shard already written
        docs.append(_split_document(doc, args.max_sentences, k))
        if len(docs) < shard.documents:
            continue
        emb, so, tokens, to = _encode_shard(pipe, docs, args.lang, options["max_target_tokens"],
                                            getattr(torch, args.embedding_dtype), args.max_tokens, not args.quiet,
                                            eos_emb)  # fmt: skip
        path = out / shard.name
        digest = write_shard(path, emb, so, tokens, to)
        entry = {"name": shard.name, "split": shard.split, "documents": len(docs), "sentences": so[-1],
                 "tokens": len(tokens), "sha256": digest, "bytes": path.stat().st_size}  # fmt: skip
        write_json_atomic(out / PROGRESS / (shard.name + ".json"), {"options_sha256": _options_digest(options), "entry": entry})
        log.info("shard %s written (%d documents)", shard.name, len(docs))
        docs, shard = [], next(pending, None)
        if shard is None:
            return
    raise ShardError(f"{args.source} ended before document {shard.start + len(docs)} of shard {shard.name}: "
                     "the corpus changed during preparation")  # fmt: skip


def _finish(args, out: Path, manifest: dict, plan: list[PlannedShard], stat: dict) -> dict:
    """Rank 0, once every rank is done: verify every shard against its record and write the
    complete manifest with the corpus' ``stat`` (then drop the records)."""
    known = {s["name"]: s for s in manifest["shards"]} | _progress_entries(out, manifest["options"])
    shards = []
    for shard in plan:
        entry = known.get(shard.name)
        if entry is None or not (out / shard.name).is_file() or sha256_file(out / shard.name) != entry["sha256"]:
            raise ShardError(f"shard {shard.name} is missing or failed its checksum after encoding; run the "
                             "preparation again to rebuild it")  # fmt: skip
        shards.append(entry)
    manifest = _manifest(manifest["options"], shards, manifest["embedding_dim"], _command(args), stat, complete=True)
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    return manifest


def _command(args) -> str:
    return "sonarllm prepare " + " ".join(shlex.quote(a) for a in _argv(args))


def _manifest(options: dict, shards: list[dict], embedding_dim: int, command: str, source_stat: dict,
              complete: bool = False) -> dict:  # fmt: skip
    totals = {split: {k: sum(s[k] for s in shards if s["split"] == split) for k in ("documents", "sentences", "tokens")}
              for split in ("train", "eval")}  # fmt: skip
    return {"format_version": FORMAT_VERSION, "complete": complete, "embedding_dim": embedding_dim,
            "options": options, "source_stat": source_stat, "command": command, "totals": totals,
            "shards": shards}  # fmt: skip


def _argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` (what a rebuild must repeat)."""
    out = []
    for key, value in vars(args).items():
        if key in ("quiet", "device", "max_tokens") or value is None:
            continue
        if key in READING_DEFAULTS and value == READING_DEFAULTS[key]:
            continue  # the default way of reading the corpus
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = Ranks.from_env()  # several under torchrun
    quiet = args.quiet or ranks.rank > 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s" if ranks.world == 1 else f"[rank {ranks.rank}] %(message)s")  # fmt: skip
    try:
        manifest = prepare(args, ranks)
    except ForeignOutError as exc:
        print(f"sonarllm prepare: error: --out {exc}", file=sys.stderr)
        return 2
    except (ShardError, ValueError, FileNotFoundError, OSError, ImportError) as exc:
        print(f"sonarllm prepare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sonarllm prepare: interrupted; run the same command again to resume preparing {args.out}",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        ranks.close()
    if ranks.rank > 0:
        return 0
    t = manifest["totals"]
    print(f"prepared {args.out}: train {t['train']['documents']} documents / {t['train']['sentences']} sentences / "
          f"{t['train']['tokens']} tokens; eval {t['eval']['documents']} documents")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
