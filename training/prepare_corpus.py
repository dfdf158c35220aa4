"""What a preparation reads: the corpus' documents, streamed in any supported format
(sonarllm/corpus.py) and split into sentences (at most ``max_sentences`` plus the end sentence;
pre-embedded documents keep their sentences and vectors), its digest and its size and
modification time (recorded in the manifest so that the trainer notices an edited corpus), and
the sentences the toy SONAR learns from.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

from sonarllm.corpus import read_documents, read_embedded_documents
from sonarllm.text import EOS_SENTENCE, document_sentences
from training.shards import sha256_file


def corpus_digest(source: Path) -> str:
    """SHA-256 over the corpus file(s), so a changed corpus is noticed."""
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(source)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def source_stat(source: Path) -> dict:
    """Size and newest modification time of the corpus file(s): recorded in the manifest, so that
    a corpus edited after its preparation is noticed cheaply (the trainer says so)."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return {"bytes": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def load_documents(source: Path, max_sentences: int, max_docs: int | None, *, progress: bool = False,
                   text_field: str = "text", split: str = "train") -> list[list[str]]:  # fmt: skip
    """Sentence lists (with the end sentence) of every document with at least two items (all
    in memory: preparation itself streams, see ``_stream``)."""
    from tqdm.auto import tqdm

    docs = []
    for text in tqdm(read_documents(source, text_field=text_field, split=split), desc="split", unit="doc",
                     disable=not progress, dynamic_ncols=True):  # fmt: skip
        sentences = document_sentences(text, max_sentences=max_sentences)
        if len(sentences) >= 2:
            docs.append(sentences)
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise ValueError(f"{source} holds no document with at least one sentence")
    return docs


def _stream(args, dim: int | None = None) -> Iterator:
    """The corpus documents, in order and at most ``--max-docs``: texts, or (sentences,
    embeddings_SD) pairs with ``--embedding-field`` (checked against the encoder's ``dim``).
    Read anew by every pass, so that memory does not grow with the corpus."""
    source = Path(args.source)
    if args.embedding_field:
        docs = read_embedded_documents(source, text_field=args.text_field, embedding_field=args.embedding_field,
                                       dim=dim, split=args.split)  # fmt: skip
    else:
        docs = read_documents(source, text_field=args.text_field, split=args.split)
    return itertools.islice(docs, args.max_docs)


def _split_document(doc, max_sentences: int, index: int):
    """What a shard stores of one corpus document: its sentences (first ``max_sentences``, then
    the end sentence), with their given embeddings for a pre-embedded document."""
    if isinstance(doc, str):
        sentences = document_sentences(doc, max_sentences=max_sentences)
        if len(sentences) < 2:  # read_documents yields only non-blank texts, which have a sentence
            raise ValueError(f"document {index} of the corpus has no sentence")
        return sentences
    sentences, emb_SD = doc
    return sentences[:max_sentences] + [EOS_SENTENCE], emb_SD[:max_sentences]


TOY_SENTENCES = 200_000
"""Training sentences (the first ones) the toy SONAR's tokenizer and autoencoder learn from."""


def _toy_sentences(args, n_train: int) -> list[str]:
    """The first ``TOY_SENTENCES`` sentences (end sentences included) of the training documents."""
    sentences: list[str] = []
    for k, doc in enumerate(_stream(args)):
        if k >= n_train or len(sentences) >= TOY_SENTENCES:
            break
        sentences += _split_document(doc, args.max_sentences, k)
    return sentences[:TOY_SENTENCES]
