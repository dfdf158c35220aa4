"""Corpus formats: every format yields the same documents as JSONL; bad files are named with
the row; reading streams."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sonarllm.corpus import read_documents, read_embedded_documents

TEXTS = ["A cat sat. It was happy.", "  ", "The dog ran home. Then it slept.", "Third story here."]
EXPECTED = [TEXTS[0], TEXTS[2], TEXTS[3]]  # the blank document is skipped


def _jsonl(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def save_to_disk(folder, table, *, batch_rows=2, shards=2, split=None):
    """The layout ``datasets.Dataset.save_to_disk`` writes (arrow_dataset.py): Arrow IPC *stream*
    files ``data-{i:05d}-of-{n:05d}.arrow`` holding contiguous shards, the schema carrying the
    features under the ``huggingface`` metadata key, ``state.json`` listing the files in order and
    ``dataset_info.json`` (sorted keys)."""
    folder.mkdir(parents=True)
    features = {name: {"dtype": "string", "_type": "Value"} for name in table.column_names}
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    per_shard = -(-table.num_rows // shards)
    files = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(files):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in table.slice(i * per_shard, per_shard).cast(schema).to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    state = {"_data_files": [{"filename": f} for f in files], "_fingerprint": "0123456789abcdef", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": split}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}, indent=2))
    return folder


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.txt.zst", "c.parquet", "hf", "hf-dict", "pq-dir"])
def test_every_format_yields_the_jsonl_documents(tmp_path, name):
    table = pa.table({"story": TEXTS, "n": list(range(len(TEXTS)))})
    path = tmp_path / name
    if name.startswith("c.jsonl"):
        data = _jsonl(TEXTS, "story")
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else
                         zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else data)  # fmt: skip
    elif name == "c.txt.zst":  # blank-line separated; a blank document cannot exist here
        path.write_bytes(zstandard.ZstdCompressor().compress("\n\n".join(EXPECTED).encode()))
    elif name == "c.parquet":
        pq.write_table(table, path, row_group_size=2)
    elif name == "hf":
        save_to_disk(path, table)
    elif name == "hf-dict":
        save_to_disk(path / "train", table, split="train")
        save_to_disk(path / "test", table.slice(0, 1), split="test")
        (path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    else:
        path.mkdir()
        pq.write_table(table.slice(0, 2), path / "part-0.parquet")
        pq.write_table(table.slice(2), path / "part-1.parquet")
    assert list(read_documents(path, text_field="story")) == EXPECTED
    if name == "hf-dict":
        assert list(read_documents(path, text_field="story", split="test")) == TEXTS[:1]
        with pytest.raises(ValueError, match="without a split 'validation' \\(it has train, test\\)"):
            list(read_documents(path, text_field="story", split="validation"))


def test_multi_frame_zstd_is_read_whole(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(_jsonl(TEXTS[:1])) + c.compress(_jsonl(TEXTS[2:])))
    assert list(read_documents(path)) == EXPECTED


@pytest.mark.parametrize("name,content,cause", [
    ("cut.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl(TEXTS * 50))[:40], "is a truncated zstd file"),
    ("plain.jsonl.zst", _jsonl(TEXTS), "is not a valid zstd file"),
    ("bad.parquet", b"PAR1 not really", "is not a Parquet file"),
    ("bad.arrow", b"not arrow", "is not an Arrow IPC stream file"),
])  # fmt: skip
def test_undecodable_files_are_named(tmp_path, name, content, cause):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} {cause}"):
        list(read_documents(path))


def test_bad_rows_and_columns_are_named(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["One. Two.", "Fine.", None, "x"]}), path, row_group_size=2)
    with pytest.raises(ValueError, match=f"{path}: row 2: column 'text' is null"):
        list(read_documents(path))
    with pytest.raises(ValueError, match=f"{path} has no column 'story' \\(its columns: text\\)"):
        list(read_documents(path, text_field="story"))
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(ValueError, match=f"{numbers}: column 'text' holds int64, expected strings"):
        list(read_documents(numbers))
    hf = save_to_disk(tmp_path / "hf", pa.table({"text": ["ok.", "fine."]}))
    (hf / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(FileNotFoundError, match="data-00001-of-00002.arrow, listed in .*state.json, is missing"):
        list(read_documents(hf))


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    """Streaming: the first document arrives before the rest of the file is read."""
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"Story {i}." for i in range(5000)]}), path, row_group_size=1000)
    import sonarllm.corpus as corpus

    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs = read_documents(path)
    assert next(docs) == "Story 0." and sizes == [corpus.READ_ROWS]
    assert sum(1 for _ in docs) == 4999 and max(sizes) <= corpus.READ_ROWS


def _lcm_table(dim=4, value_type=pa.float32(), fixed=True):
    """LCM's layout: per document ``text_sentences`` list<string> and ``text_sentences_sonar_emb``
    list<fixed_size_list<float32>[dim]> (or list<list<...>>)."""
    docs = [["First.", "Second."], [], ["Third."]]
    vectors = [[[float(10 * d + s + k / 10) for k in range(dim)] for s in range(len(doc))] for d, doc in enumerate(docs)]
    inner = pa.list_(value_type, dim) if fixed else pa.list_(value_type)
    return pa.table({"text_sentences": pa.array(docs, pa.list_(pa.string())),
                     "text_sentences_sonar_emb": pa.array(vectors, pa.list_(inner))}), vectors  # fmt: skip


@pytest.mark.parametrize("fixed", [True, False])
def test_pre_embedded_documents_keep_their_vectors(tmp_path, fixed):
    table, vectors = _lcm_table(fixed=fixed)
    path = tmp_path / "lcm.parquet"
    pq.write_table(table, path)
    docs = list(read_embedded_documents(path, text_field="text_sentences", embedding_field="text_sentences_sonar_emb", dim=4))
    assert [d[0] for d in docs] == [["First.", "Second."], ["Third."]]  # the row without sentences is skipped
    assert docs[0][1].dtype.name == "float32"
    np.testing.assert_array_equal(docs[0][1], np.array(vectors[0], dtype=np.float32))
    np.testing.assert_array_equal(docs[1][1], np.array(vectors[2], dtype=np.float32))


@pytest.mark.parametrize("build,message", [
    (lambda: _lcm_table(dim=3)[0], "holds vectors of dimension 3; the SONAR encoder's is 4"),
    (lambda: _lcm_table(dim=3, fixed=False)[0], "row 0: vector 0 of 'text_sentences_sonar_emb' has dimension 3"),
    (lambda: _lcm_table(value_type=pa.int32())[0], "holds list<.*int32>.*, expected lists of float vectors"),
    (lambda: _lcm_table()[0].set_column(0, "text_sentences", pa.array([["a"], [], ["c"]], pa.list_(pa.string()))),
     "row 0: 1 sentences in 'text_sentences' but 2 vectors"),
])  # fmt: skip
def test_pre_embedded_dtype_and_dimension_are_checked(tmp_path, build, message):
    path = tmp_path / "lcm.parquet"
    pq.write_table(build(), path)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        list(read_embedded_documents(path, text_field="text_sentences", embedding_field="text_sentences_sonar_emb", dim=4))
