"""Data preparation: shards, manifest, resume, checksum failures, and the shard reader."""

import gzip
import json
import os

import pytest
import torch

from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from sonarllm.text import EOS_SENTENCE
from tests.training.conftest import tiny_corpus
from training import prepare_data
from training.config import EXAMPLE_CORPUS
from training.shards import ShardedDocuments, ShardError, sha256_file


def _args(corpus, out, *extra):
    return prepare_data.parse_args(["--source", str(corpus), "--out", str(out), "--eval-documents", "4",
                                    "--shard-documents", "5", "--toy-vocab-size", "200", "--toy-train-steps", "0", "--quiet", *extra])


def test_prepared_data_matches_the_sonar_it_names(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["train"]["documents"] == 48
    assert manifest["totals"]["eval"]["documents"] == 16
    for shard in manifest["shards"]:
        assert sha256_file(prepared / shard["name"]) == shard["sha256"]
    docs = ShardedDocuments(prepared, "train")
    pipe = SonarPipeline.from_spec(SonarSpec.load(prepared / "sonar.json"), decoder=False, kernel_impl="torch")
    doc = docs[3]
    text = pipe.tokenizer.decode(doc.tokens[-1])
    assert text == EOS_SENTENCE  # every document ends with the end sentence
    sentences = [pipe.tokenizer.decode(t) for t in doc.tokens]
    torch.testing.assert_close(doc.embeddings, pipe.encode(sentences), atol=1e-5, rtol=1e-5)
    assert manifest["embedding_dim"] == docs.embedding_dim == doc.embeddings.shape[1] == pipe.encoder.config.model_dim
    assert all(t[0] == pipe.tokenizer.eos_idx and t[1] == pipe.tokenizer.lang_id("eng_Latn") for t in doc.tokens)
    assert docs.sentence_token_counts(3) == [len(t) for t in doc.tokens]


def test_rerun_resumes_verifies_and_rebuilds(tmp_path, caplog):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 20)
    out = tmp_path / "data"
    first = prepare_data.prepare(_args(corpus, out))
    digests = {s["name"]: s["sha256"] for s in first["shards"]}
    (out / "train-00001.safetensors").unlink()
    with open(out / "train-00002.safetensors", "r+b") as f:  # corrupt a shard
        f.seek(200)
        f.write(b"\xff\xff\xff")
    caplog.set_level("INFO", logger="sonarllm.prepare")
    second = prepare_data.prepare(_args(corpus, out))
    assert "shard train-00002.safetensors failed its checksum; rebuilding it" in caplog.text
    assert "shard train-00000.safetensors verified, kept" in caplog.text
    assert {s["name"]: s["sha256"] for s in second["shards"]} == digests  # deterministic rebuild


def test_reader_names_a_corrupted_shard(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    prepare_data.prepare(_args(corpus, out))
    with open(out / "train-00001.safetensors", "r+b") as f:
        f.seek(300)
        f.write(b"\x00\x01")
    with pytest.raises(ShardError, match="shard train-00001.safetensors failed its checksum"):
        ShardedDocuments(out, "train")
    (out / "train-00000.safetensors").unlink()
    with pytest.raises(ShardError, match="shard train-00000.safetensors listed in the manifest is missing"):
        ShardedDocuments(out, "train", verify=False)


def test_changed_options_are_refused(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    prepare_data.prepare(_args(corpus, out))
    with pytest.raises(ValueError, match="prepared with different options \\(max_sentences\\)"):
        prepare_data.prepare(_args(corpus, out, "--max-sentences", "4"))


def test_inputs_formats_and_errors(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("First story. It is short.\n\nSecond story here. With two sentences.\n\nThird. Fourth.\n")
    docs = prepare_data.load_documents(txt, max_sentences=32, max_docs=None)
    assert docs[0] == ["First story.", "It is short.", EOS_SENTENCE] and len(docs) == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("One. Two.")
    (folder / "b.txt").write_text("Three.")
    assert prepare_data.load_documents(folder, 1, None) == [["One.", EOS_SENTENCE], ["Three.", EOS_SENTENCE]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok."}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        prepare_data.load_documents(bad, 32, None)
    assert prepare_data.main(["--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--out", "x", "--max-sentences", "0"])


def test_interrupted_toy_build_is_redone_and_changed_toy_options_are_refused(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    args = _args(corpus, out)
    args.toy_train_steps = 3
    first = prepare_data.prepare(args)
    marker = out / "sonar" / "toy.json"
    assert json.loads(marker.read_text())["train_steps"] == 3
    marker.unlink()  # as if the process died after writing random weights, before training them
    (out / "sonar" / "toy_decoder.pt").write_bytes(b"half-written")
    assert prepare_data.prepare(args)["options"] == first["options"]  # rebuilt, deterministically
    args.toy_vocab_size = 150
    with pytest.raises(ValueError, match="prepared with different options \\(sonar\\)"):
        prepare_data.prepare(args)


def test_target_sentences_are_cut_to_the_decoder_positions(tmp_path):
    long_story = " ".join(["A very long sentence about the little cat who liked to run and play"] * 12) + ". The end."
    corpus = tmp_path / "long.txt"
    corpus.write_text(long_story + "\n\nShort story. Two sentences.\n\nAnother one. Here.\n\nFour. Five.\n")
    out = tmp_path / "data"
    with pytest.warns(UserWarning, match="truncated"):  # the encoder cuts it too, like SONAR
        manifest = prepare_data.prepare(_args(corpus, out, "--eval-documents", "1"))
    assert manifest["options"]["max_target_tokens"] == 128  # the toy decoder's positions, not 256
    doc = ShardedDocuments(out, "train")[0]
    assert max(len(t) for t in doc.tokens) == 128 and doc.tokens[0][-1] == 3  # cut, </s> kept


def test_decoder_positions_come_from_the_config_the_decoder_loads_with(tmp_path):
    """A fairseq2-layout decoder file records no config: its positions come from the spec's
    decoder_config or a sonar.json beside it (as loading resolves them), never a 512 guess."""
    from sonarllm.sonar import SonarDecoder, SonarTextConfig
    from sonarllm.sonar.checkpoint import CheckpointError

    cfg = SonarTextConfig(model_dim=48, num_layers=1, num_heads=3, ffn_dim=96, vocab_size=64, max_seq_len=40)
    path = tmp_path / "decoder.pt"
    torch.save({"model": SonarDecoder(cfg).state_dict()}, path)
    given = {"num_heads": 3, "max_seq_len": 40, "legacy_pad_idx": 1}
    assert prepare_data.decoder_positions(SonarSpec(tokenizer="t.model", decoder=str(path), decoder_config=given)) == 40
    (tmp_path / "sonar.json").write_text(json.dumps({"tokenizer": "t.model", "decoder": "decoder.pt", "decoder_config": given}))
    assert prepare_data.decoder_positions(SonarSpec(tokenizer="t.model", decoder=str(path))) == 40
    (tmp_path / "sonar.json").unlink()
    with pytest.raises(CheckpointError, match="max_seq_len"):  # before any encoding, not after
        prepare_data.decoder_positions(SonarSpec(tokenizer="t.model", decoder=str(path)))


def _snapshot(directory):
    """Every file's mtime and digest, but the lock file's (a refused run takes the lock too)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != prepare_data.LOCK_NAME}  # fmt: skip


def test_a_refused_rerun_writes_nothing(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    prepare_data.prepare(_args(corpus, out))
    before = _snapshot(out)
    for change in (["--sonar", "basic"], ["--toy-vocab-size", "150"], ["--max-sentences", "4"]):
        with pytest.raises(ShardError, match="prepared with different options"):
            prepare_data.prepare(_args(corpus, out, *change))
        assert _snapshot(out) == before, change
    assert prepare_data.main([*map(str, ["--source", corpus, "--out", out, "--sonar", "basic", "--quiet"])]) == 1
    assert _snapshot(out) == before


def test_eval_documents_capped_by_the_corpus_are_reported(tmp_path, caplog):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    caplog.set_level("WARNING", logger="sonarllm.prepare")
    manifest = prepare_data.prepare(_args(corpus, tmp_path / "data", "--eval-documents", "100"))
    assert manifest["totals"]["eval"]["documents"] == 6
    assert "--eval-documents 100 capped to 6: the corpus has 12 usable document(s)" in caplog.text


def test_the_rebuild_hint_names_the_directory_in_use(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    prepare_data.prepare(_args(corpus, tmp_path / "data"))
    moved = tmp_path / "moved here"
    (tmp_path / "data").rename(moved)
    (moved / "train-00001.safetensors").unlink()
    with pytest.raises(ShardError, match="rebuild it with: sonarllm prepare .*--out '.*moved here'") as info:
        ShardedDocuments(moved, "train")
    assert str(tmp_path / "data") + " " not in str(info.value)


@pytest.mark.parametrize("name,content,cause", [
    ("latin1.txt", "caf\xe9 au lait. Second sentence.\n".encode("latin-1"), "is not UTF-8 text (invalid byte 0xe9)"),
    ("plain.jsonl.gz", b'{"text": "Not compressed. At all."}\n', "is not a valid gzip file"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "A story. It ends."}\n' * 50)[:40], "is a truncated gzip file"),
])  # fmt: skip
def test_undecodable_input_is_named(tmp_path, capsys, name, content, cause):
    bad = tmp_path / name
    bad.write_bytes(content)
    assert prepare_data.main(["--source", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad} {cause}" in err
    assert not (tmp_path / "o").exists()  # nothing written
    folder = tmp_path / "folder"  # a directory of .txt files names the file too
    folder.mkdir()
    (folder / "bad.txt").write_bytes("caf\xe9.".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{folder / 'bad.txt'} is not UTF-8"):
        prepare_data.load_documents(folder, 32, None)


def test_long_single_document_is_split_with_progress(tmp_path, capsys):
    with gzip.open(EXAMPLE_CORPUS, "rt") as f:
        stories = [json.loads(line)["text"] for line in f]
    big = tmp_path / "one.txt"
    big.write_text(" ".join(stories * 5))  # one document of about 5 MB
    docs = prepare_data.load_documents(big, max_sentences=32, max_docs=None, progress=True)
    assert len(docs) == 1 and len(docs[0]) == 33
    assert "split: " in capsys.readouterr().err  # the progress bar


def test_a_lone_surrogate_in_jsonl_is_refused_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"text": "Fine. Two sentences."}\n{"text": "Bad \\ud800 here. And more."}\n')
    assert prepare_data.main(["--source", str(bad), "--out", str(tmp_path / "o"), "--toy-train-steps", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: " in err and "lone surrogate U+D800" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_a_second_preparation_of_one_directory_waits_for_the_first(tmp_path):
    """Two preparations into one directory (two first-use trainings sharing data.prepared_dir):
    while one holds the directory, the other waits, saying for whom, then reuses its work."""
    import logging
    import threading

    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    waiting = threading.Event()

    class Note(logging.Handler):
        def emit(self, record):
            if "waiting for another preparation" in record.getMessage():
                self.message = record.getMessage()
                waiting.set()

    note = Note()
    logging.getLogger("sonarllm.prepare").addHandler(note)
    results = []
    try:
        with prepare_data._locked(out):  # the first preparer, mid-way
            second = threading.Thread(target=lambda: results.append(prepare_data.prepare(_args(corpus, out))))
            second.start()
            assert waiting.wait(timeout=120), "the second preparation did not wait for the lock"
            assert not (out / "manifest.json").exists()  # it is blocked on the lock, not preparing
        second.join(timeout=300)
    finally:
        logging.getLogger("sonarllm.prepare").removeHandler(note)
    assert f"waiting for another preparation of {out} to finish (pid {os.getpid()} on host" in note.message
    assert results and results[0]["complete"]
    ShardedDocuments(out, "train")  # verifies every shard


def test_a_rerun_with_a_relative_out_keeps_the_toy_sonar(tmp_path, monkeypatch):
    """The toy SONAR already in place was 'installed' onto itself (a resolved path compared with a
    relative one): its toy.json was deleted and the re-run failed."""
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    monkeypatch.chdir(tmp_path)
    first = prepare_data.prepare(_args(corpus, "data"))
    marker = (tmp_path / "data" / "sonar" / "toy.json").read_text()
    assert prepare_data.prepare(_args(corpus, "data")) == first
    assert (tmp_path / "data" / "sonar" / "toy.json").read_text() == marker


@pytest.mark.parametrize("option", [["--max-docs", "0"], ["--max-docs", "-3"], ["--eval-documents", "0"]])
def test_options_that_leave_no_document_or_no_eval_split_are_refused(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as info:
        prepare_data.main(["--source", str(tiny_corpus(tmp_path / "c.jsonl", 12)), "--out", str(tmp_path / "o"),
                           "--toy-train-steps", "0", "--quiet", *option])
    assert info.value.code == 2 and f"{option[0]} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("corpus_docs,max_docs", [(1, []), (12, ["--max-docs", "1"])])
def test_a_corpus_of_one_document_is_refused_before_writing(tmp_path, capsys, corpus_docs, max_docs):
    """One document leaves nothing to hold out, and the trainer refuses data without an eval split."""
    corpus = tiny_corpus(tmp_path / "c.jsonl", corpus_docs)
    assert prepare_data.main(["--source", str(corpus), "--out", str(tmp_path / "o"), "--toy-train-steps", "0", "--quiet",
                             *max_docs]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds only 1 usable document" in err and "held out for evaluation" in err
    assert not (tmp_path / "o").exists()


def test_an_unknown_lang_is_refused_before_anything_is_built(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 12)
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as info:
        prepare_data.main(["--source", str(corpus), "--out", str(out), "--lang", "english", "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--lang must be a SONAR language code such as eng_Latn, got 'english'" in err
    assert not out.exists()  # no toy SONAR, no lock
