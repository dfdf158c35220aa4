"""Beam search and greedy decoding against fairseq2's BeamSearchSeq2SeqGenerator (fixture
beam_search.pt: 7 option sets), and the text pipeline."""

import pytest
import torch

from sonarllm.sonar.generation import BeamSearchOptions, beam_search
from sonarllm.sonar.pipeline import SonarPipeline
from tests.sonarllm.sonar_fixtures import decoder, encoder, live_only, load, reference, tokenizer

RUNS = ["beam1", "beam3", "beam5", "beam3_lenpen_unkpen", "beam3_nonorm_mingen_temp", "beam4_maxseqlen", "beam3_echo"]


def _options(raw: dict) -> BeamSearchOptions:
    raw = {k: v for k, v in raw.items() if k not in ("prefill_chunk_size", "decode_capacity_increment")}
    return BeamSearchOptions(**(raw | {"max_gen_len": tuple(raw["max_gen_len"])}))


@pytest.mark.parametrize("run", RUNS)
def test_beam_search_matches_fairseq2(run):
    fx = load("beam_search")
    spec = fx["runs"][run]
    got = beam_search(decoder(), fx["embeddings"], fx["prefix"], options=_options(spec["options"]))
    assert len(got) == len(spec["hypotheses"])
    for row, (hyps, want) in enumerate(zip(got, spec["hypotheses"], strict=True)):
        assert [h.seq for h in hyps] == [w["seq"] for w in want], (run, row)
        for h, w in zip(hyps, want, strict=True):
            assert h.score == pytest.approx(w["score"], abs=1e-5)
            assert h.step_scores == pytest.approx(w["step_scores"], abs=1e-5)


def test_beam_search_never_worse_than_greedy_in_log_likelihood():
    fx = load("beam_search")
    raw = {"max_gen_len": (0, 16), "normalize_scores": False}
    greedy = beam_search(decoder(), fx["embeddings"], fx["prefix"], options=BeamSearchOptions(beam_size=1, **raw))
    beam = beam_search(decoder(), fx["embeddings"], fx["prefix"], options=BeamSearchOptions(beam_size=4, **raw))
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].score >= g[0].score - 1e-6


def test_options_are_validated():
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearchOptions(beam_size=0)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchOptions(temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        beam_search(decoder(), torch.zeros(1, 64), [3] * 64)


def test_pipeline_round_trip_and_long_sentences():
    pipe = SonarPipeline(tokenizer(), encoder(), decoder())
    emb = pipe.encode(["The cat sat on the mat.", "Bonjour le monde !"], lang="eng_Latn")
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    texts = pipe.decode(emb, options=BeamSearchOptions(beam_size=2, max_gen_len=(0, 6)))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    long_text = "the cat " * 60  # > 66 tokens for the tiny encoder
    with pytest.warns(UserWarning, match="truncated"):
        truncated = pipe.encode([long_text])
    with pytest.warns(UserWarning, match="truncated"):
        (ids,) = pipe.tokenize_sources([long_text])
    assert len(ids) == 66 and ids[-1] != pipe.tokenizer.eos_idx  # cut like SONAR: the final </s> is lost
    assert truncated.shape == (1, 64)
    with pytest.raises(ValueError, match="exceed the encoder's 66 tokens"):
        pipe.encode([long_text], on_long="error")
    with pytest.raises(ValueError, match="at least one sentence"):
        pipe.encode([])
    with pytest.raises(TypeError, match="list of sentences"):
        pipe.encode("one string")


def test_pipeline_rejects_mismatched_tokenizer():
    from sonarllm.sonar import SonarTokenizer
    from tests.sonarllm.sonar_fixtures import SPM

    with pytest.raises(ValueError, match="does not match the tokenizer"):
        SonarPipeline(SonarTokenizer(SPM), decoder=decoder())


@live_only
def test_live_beam_search_matches_fairseq2_on_new_embeddings():
    fx = load("decoder")
    ref = reference.build_decoder(fx["config"], fx["state_dict"])
    emb = torch.randn(3, 64, generator=torch.Generator().manual_seed(11)) * 0.5
    vocab = load("beam_search")["vocab_info"]
    want = reference.beam_search(ref, emb, [3, 301], vocab, beam_size=3, max_gen_len=(0, 12))
    got = beam_search(decoder(), emb, [3, 301], options=BeamSearchOptions(beam_size=3, max_gen_len=(0, 12)))
    assert [[h.seq for h in row] for row in got] == [[[int(t) for t in w["seq"]] for w in row] for row in want]
