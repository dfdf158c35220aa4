"""Held-out test documents for ``training.compare``, disjoint from the training data.

For the embedded example the test set is the first stories of
``training/example/make_stories.py --seed 4242`` (the corpus itself is seed 0). Whatever the
source, a test document is dropped when the prepared data (train or eval split) holds a document
with the same target-mode token ids sentence by sentence, i.e. what the model saw in training or
validation; the documents kept are written to ``test.jsonl`` beside the results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

from sonarllm.corpus import read_documents
from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from sonarllm.text import document_sentences
from training.shards import ShardedDocuments, read_manifest, sha256_file

MAKE_STORIES = Path(__file__).resolve().parent / "example" / "make_stories.py"
EXAMPLE_TEST_SEED = 4242


class NoTestDocuments(ValueError):
    """Every test document is also in the prepared data."""


def write_example_stories(path: Path, count: int) -> None:
    """``training/example/make_stories.py --count COUNT --seed 4242 --out PATH`` (quietly)."""
    spec = importlib.util.spec_from_file_location("_make_stories", MAKE_STORIES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(["--count", str(count), "--seed", str(EXAMPLE_TEST_SEED), "--out", str(path)])


def _document_key(tokenizer, sentences: list[str], lang: str, max_target: int) -> tuple:
    """A document as prepared data stores it: the target-mode token ids of each sentence."""
    eos = tokenizer.eos_idx
    seqs = tokenizer.encode(sentences, lang=lang, mode="target")
    return tuple(tuple(s if len(s) <= max_target else s[: max_target - 1] + [eos]) for s in seqs)


def unseen_documents(texts: list[str], prepared: Path, limit: int) -> tuple[list[str], int]:
    """The first ``limit`` of ``texts`` that the prepared data (train or eval split) does not
    hold, in order, and how many were dropped before the last one kept."""
    options = read_manifest(prepared)["options"]
    tokenizer = SonarPipeline.from_spec(SonarSpec.load(prepared / "sonar.json"), encoder=False, decoder=False).tokenizer
    seen = set()
    for split in ("train", "eval"):
        docs = ShardedDocuments(prepared, split, verify=False)
        seen.update(tuple(map(tuple, docs[d].tokens)) for d in range(len(docs)))
    kept, dropped = [], 0
    for text in texts:
        if len(kept) == limit:
            break
        sentences = document_sentences(text, max_sentences=options["max_sentences"])
        if sentences and _document_key(tokenizer, sentences, options["lang"], options["max_target_tokens"]) in seen:
            dropped += 1
        else:
            kept.append(text)
    return kept, dropped


def held_out_documents(source: Path | None, out: Path, limit: int, prepared: Path, *,
                       text_field: str = "text") -> tuple[list[str], dict]:  # fmt: skip
    """The first ``limit`` documents of ``source`` (None: the example's test stories, written
    into ``out``) that ``prepared`` does not hold, also written to ``out/test.jsonl``; and a
    description of them (source, path, SHA-256, documents, dropped_in_prepared_data)."""
    if source is None:
        source = out / f"make_stories-seed{EXAMPLE_TEST_SEED}.jsonl.gz"
        write_example_stories(source, 2 * limit)  # twice as many: room for dropped ones
        described = f"training/example/make_stories.py --seed {EXAMPLE_TEST_SEED}"
    else:
        described = str(source)
    texts = list(read_documents(source, text_field=text_field))
    kept, dropped = unseen_documents(texts, prepared, limit)
    if not kept:
        raise NoTestDocuments(f"no test document left: all {len(texts)} documents of {source} are in the prepared data {prepared}")
    path = out / "test.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    os.replace(tmp, path)
    return kept, {"source": described, "path": str(path), "sha256": sha256_file(path), "documents": len(kept),
                  "dropped_in_prepared_data": dropped}  # fmt: skip
