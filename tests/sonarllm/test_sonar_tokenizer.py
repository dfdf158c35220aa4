"""Our tokenizer against fairseq2's NllbTokenizer (fixture tokenizer.pt) and its error cases."""

import pytest

from sonarllm.sonar import SonarTokenizer
from sonarllm.sonar.langs import NLLB_LANGS
from tests.sonarllm.sonar_fixtures import LIVE, SPM, live_only, load, reference, tokenizer


def test_vocabulary_layout_matches_fairseq2():
    fx = load("tokenizer")
    tok = tokenizer()
    assert tok.vocab_size == fx["vocab_size"]
    assert (tok.pad_idx, tok.unk_idx, tok.bos_idx, tok.eos_idx) == (fx["pad_idx"], fx["unk_idx"], fx["bos_idx"], fx["eos_idx"])
    assert {lang: tok.lang_id(lang) for lang in fx["langs"]} == fx["lang_ids"]
    for tag, idx in fx["special_ids"].items():
        if tag.startswith("<") and tag.endswith("_DATA>"):
            assert tok.data_tag_ids[tag] == idx


@pytest.mark.parametrize("case", range(11))
def test_encodings_match_fairseq2(case):
    enc = load("tokenizer")["encodings"][case]
    tok = tokenizer()
    assert tok.pieces(enc["text"]) == enc["raw_ids"]
    for lang in ("eng_Latn", "fra_Latn"):
        for mode in ("source", "target"):
            ids = tok.encode(enc["text"], lang=lang, mode=mode)
            assert ids == enc[f"{mode}/{lang}"], (mode, lang)
            assert tok.decode(ids) == enc[f"{mode}/{lang}/decoded"]


def test_decodes_match_fairseq2():
    tok = tokenizer()
    for case in load("tokenizer")["decodes"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]


def test_batch_encode_and_decode():
    tok = tokenizer()
    texts = ["The cat sat on the mat.", "Il fait beau."]
    ids = tok.encode(texts, lang="fra_Latn", mode="target")
    assert ids == [tok.encode(t, lang="fra_Latn", mode="target") for t in texts]
    assert tok.decode(ids) == texts


def test_real_vocabulary_ids():
    """With the 202 real languages the tags follow the pieces: 300 + 1 + index here; in the real
    256,000-piece model that is 256001 + index, eng_Latn = 256047 as in HF NLLB."""
    tok = SonarTokenizer(SPM)
    assert tok.langs == NLLB_LANGS and len(NLLB_LANGS) == 202
    assert tok.lang_id("eng_Latn") == 301 + 46 and NLLB_LANGS.index("eng_Latn") == 46
    assert tok.vocab_size == 300 + 1 + 202 + 3


def test_decoder_inputs_and_labels_conventions():
    tok = tokenizer()
    pieces = tok.pieces("The cat.")
    inputs, labels = tok.decoder_inputs_and_labels(pieces, "eng_Latn")
    assert inputs == [3, 301, *pieces, 3] and labels == [301, *pieces, 3, 3]
    inputs, labels = tok.decoder_inputs_and_labels(pieces, "eng_Latn", duplicate_eos=False)
    assert inputs == [3, 301, *pieces] and labels == [301, *pieces, 3]


def test_errors_name_the_problem(tmp_path):
    tok = tokenizer()
    with pytest.raises(ValueError, match="unknown language code 'eng_latn'.*did you mean eng_Latn"):
        tok.encode("hi", lang="eng_latn")
    with pytest.raises(ValueError, match="mode must be one of"):
        tok.encode("hi", mode="prompt")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 307\)"):
        tok.decode([5, 999])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode([b"bytes"])
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        SonarTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        SonarTokenizer(bad)


@live_only
def test_live_random_texts_match_fairseq2():
    fx = load("tokenizer")
    ref = reference.build_tokenizer(str(SPM), fx["langs"])
    tok = tokenizer()
    for text in ["A new sentence, never seen: 123!", "  spaces  and\ttabs ", "Ünïcödé ½"]:
        for mode in ("source", "target"):
            assert tok.encode(text, lang="deu_Latn", mode=mode) == reference.tokenizer_encode(ref, text, "deu_Latn", mode)
    assert LIVE
