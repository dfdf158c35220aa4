"""Loading the committed fairseq2 parity fixtures (tests/fixtures/README.md) and, when sonar-space
is importable, the live reference (tests/fixtures/sonar_reference.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from sonarllm.sonar import PackedBatch, SonarTokenizer, load_sonar_decoder, load_sonar_encoder
from sonarllm.sonar.config import from_fairseq2_config
from tests.fixtures import sonar_reference as reference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sonar"
SPM = FIXTURES / "tiny_spm.model"
LIVE = reference.sonar_available()
live_only = pytest.mark.skipif(not LIVE, reason="sonar-space/fairseq2 not importable (reference env only)")


@functools.cache
def load(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def tokenizer() -> SonarTokenizer:
    fx = load("tokenizer")
    return SonarTokenizer(SPM, langs=fx["langs"], default_lang=fx["default_lang"])


def decoder(kernel_impl="torch"):
    fx = load("decoder")
    return load_sonar_decoder(fx["state_dict"], config=from_fairseq2_config(fx["config"], "decoder"), kernel_impl=kernel_impl)


def encoder(kernel_impl="torch"):
    fx = load("encoder")
    return load_sonar_encoder(fx["state_dict"], config=from_fairseq2_config(fx["config"], "encoder"), kernel_impl=kernel_impl)


def unpadded(padded: torch.Tensor, seq_lens) -> list[torch.Tensor]:
    return [padded[i, :n] for i, n in enumerate(seq_lens)]


def packed(padded_tokens: torch.Tensor, seq_lens) -> PackedBatch:
    return PackedBatch.from_sequences(unpadded(padded_tokens, seq_lens))
