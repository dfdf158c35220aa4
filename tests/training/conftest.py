"""A tiny prepared dataset (toy SONAR), shared by the training tests of a session."""

import gzip
import json

import pytest

from training import prepare_data
from training.config import EXAMPLE_CORPUS


def tiny_corpus(path, n):
    with gzip.open(EXAMPLE_CORPUS, "rt") as src, open(path, "w") as out:
        for i, line in enumerate(src):
            if i >= n:
                break
            out.write(line)
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """64 stories (48 train / 16 eval), toy SONAR with a 300-piece vocabulary."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = tiny_corpus(root / "stories.jsonl", 64)
    out = root / "data"
    args = prepare_data.parse_args(["--source", str(corpus), "--out", str(out), "--eval-documents", "16",
                                    "--shard-documents", "20", "--toy-vocab-size", "300", "--toy-train-steps", "0", "--quiet"])
    prepare_data.prepare(args)
    return out


def read_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
