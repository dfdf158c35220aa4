"""Shared fixtures of the sonarllm tests: a toy bundle (toy SentencePiece model, seeded random toy
SONAR, random toy SonarLLM) built once per session for the generation, evaluation and CLI tests,
and a one-thread fixture: on a busy 2-core machine OpenMP's second thread makes the tiny ops of
those tests ~30x slower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sonarllm.bundle import load_bundle, save_bundle
from sonarllm.config import SonarLLMConfig
from sonarllm.model import SonarLLM
from sonarllm.sonar.pipeline import SonarSpec
from sonarllm.sonar.tokenizer import SonarTokenizer
from sonarllm.sonar.toy import build_toy_sonar, train_toy_tokenizer
from sonarllm.text import EOS_SENTENCE

STORY_SENTENCES = [
    "Once upon a time there was a little cat.",
    "The cat sat on the mat.",
    "A dog ran in the park.",
    "Tom had a red ball.",
    "She was very happy today.",
    "They played all day long.",
    "The sun was warm and bright.",
    EOS_SENTENCE,
]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_bundle_dir(tmp_path_factory) -> Path:
    """A saved toy bundle (model directory with config.json, model.safetensors, sonar.json)."""
    root = tmp_path_factory.getbasetemp() / "toy_generation_bundle"
    bundle = root / "bundle"
    spm = train_toy_tokenizer(STORY_SENTENCES * 4, root / "toy.model", vocab_size=100)
    enc, dec = build_toy_sonar(SonarTokenizer(spm), root, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SonarLLM(SonarLLMConfig.from_name("toy")).eval()
    save_bundle(bundle, model, SonarSpec(str(spm), str(enc), str(dec)))
    return bundle


@pytest.fixture(scope="session")
def toy(toy_bundle_dir):
    """The loaded toy Bundle (model, pipeline, spec)."""
    return load_bundle(toy_bundle_dir)
