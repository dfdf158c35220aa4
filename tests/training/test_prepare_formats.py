"""Preparation from Parquet and from pre-embedded (LCM-style) Parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from sonarllm.text import EOS_SENTENCE, document_sentences
from tests.training.conftest import tiny_corpus
from training import prepare_data
from training.shards import ShardedDocuments

OPTIONS = ["--eval-documents", "3", "--shard-documents", "4", "--toy-vocab-size", "200", "--toy-train-steps", "0", "--quiet"]


def _texts(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


def test_a_parquet_corpus_gives_the_shards_of_its_jsonl(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(12)), "story": _texts(corpus)}), parquet, row_group_size=5)
    from_jsonl = prepare_data.prepare(prepare_data.parse_args(["--source", str(corpus), "--out", str(tmp_path / "a"), *OPTIONS]))
    args = prepare_data.parse_args(["--source", str(parquet), "--text-field", "story", "--out", str(tmp_path / "b"), *OPTIONS])
    from_parquet = prepare_data.prepare(args)
    assert [s["sha256"] for s in from_parquet["shards"]] == [s["sha256"] for s in from_jsonl["shards"]]
    assert from_parquet["options"]["reading"] == {"text_field": "story", "embedding_field": None, "split": "train"}
    assert "--text-field story" in from_parquet["command"] and "--text-field" not in from_jsonl["command"]


def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, capsys):
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["One. Two.", "Three. Four.", None]}), parquet)
    assert prepare_data.main(["--source", str(parquet), "--out", str(tmp_path / "o"), *OPTIONS]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{parquet}: row 2: column 'text' is null" in err
    assert not (tmp_path / "o").exists()


def _lcm_parquet(path, docs, pipe, *, dim_cut=None):
    """LCM's layout: text_sentences list<string>, text_sentences_sonar_emb list<fixed_size_list<float32>>."""
    vectors = [pipe.encode(doc).numpy() for doc in docs]
    if dim_cut:
        vectors = [v[:, :dim_cut] for v in vectors]
    dim = vectors[0].shape[1]
    emb = pa.array([v.tolist() for v in vectors], pa.list_(pa.list_(pa.float32(), dim)))
    pq.write_table(pa.table({"text_sentences": pa.array(docs, pa.list_(pa.string())), "text_sentences_sonar_emb": emb}), path)
    return vectors


def test_pre_embedded_parquet_is_used_without_re_encoding(tmp_path, prepared, capsys):
    pipe = SonarPipeline.from_spec(SonarSpec.load(prepared / "sonar.json"), decoder=False, kernel_impl="torch")
    with open(prepared.parent / "stories.jsonl") as f:
        docs = [document_sentences(json.loads(line)["text"], max_sentences=5, add_eos=False) for line in list(f)[:9]]
    source = tmp_path / "lcm.parquet"
    vectors = _lcm_parquet(source, docs, pipe)
    vectors = [v + 0.5 for v in vectors]  # not what the encoder gives: proves they are not re-encoded
    emb = pa.array([v.tolist() for v in vectors], pa.list_(pa.list_(pa.float32(), vectors[0].shape[1])))
    pq.write_table(pq.read_table(source).set_column(1, "text_sentences_sonar_emb", emb), source)
    out = tmp_path / "out"
    argv = ["--source", str(source), "--out", str(out), "--sonar", str(prepared / "sonar.json"), "--text-field",
            "text_sentences", "--embedding-field", "text_sentences_sonar_emb", "--max-sentences", "3", *OPTIONS]  # fmt: skip
    manifest = prepare_data.prepare(prepare_data.parse_args(argv))
    assert manifest["totals"]["train"]["documents"] == 6 and manifest["totals"]["eval"]["documents"] == 3
    train = ShardedDocuments(out, "train")
    eos = pipe.encode([EOS_SENTENCE])[0]
    for d in range(6):
        doc = train[d]
        torch.testing.assert_close(doc.embeddings[:-1], torch.from_numpy(vectors[d][:3]), atol=0, rtol=0)
        torch.testing.assert_close(doc.embeddings[-1], eos, atol=0, rtol=0)
        assert [pipe.tokenizer.decode(t) for t in doc.tokens] == docs[d][:3] + [EOS_SENTENCE]
    wrong = tmp_path / "wrong.parquet"
    _lcm_parquet(wrong, docs, pipe, dim_cut=10)
    argv[1], argv[3] = str(wrong), str(tmp_path / "o2")
    assert prepare_data.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{wrong}: column 'text_sentences_sonar_emb' holds vectors of dimension 10" in err
    assert f"the SONAR encoder's is {pipe.encoder.config.model_dim}" in err


def test_pre_embedded_input_needs_the_sonar_that_made_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prepare_data.parse_args(["--source", "x.parquet", "--out", str(tmp_path / "o"), "--embedding-field", "emb"])
    assert info.value.code == 2 and "--embedding-field needs --sonar basic or a sonar.json" in capsys.readouterr().err
