"""Nothing a user made is lost (issue 21): the prepared SONAR files are verified against the
manifest, the trainer writes only into its own run directories, ``prepare --out`` only into a
new, empty or prepared one, a corpus edited after its preparation is noticed, a read-only
checkpoints/ is named, and final/ carries checksums and its SONAR's identity."""

import errno
import json
import os
import shlex
import shutil
import tempfile

import pytest

from tests.training.test_train import train
from tests.training.test_train_faults import _one_line
from training import prepare_data
from training.checkpoint import read_only_problem
from training.ownership import RUN_MARKER, check_run_dir
from training.shards import ShardError, read_manifest, sha256_file, verify_sonar
from training.startup import changed_corpus_note


def _overwrite_1k(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x3c" * 1024)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, prepared):
    """A finished run of 2 steps (a checkpoint after each, final/ exported)."""
    run = tmp_path_factory.mktemp("two") / "run"
    train(run, prepared, "--loop.max_steps", "2", "--loop.checkpoint_every", "1")
    return run


# --- DL1: the prepared SONAR files ------------------------------------------------------------


def test_a_changed_prepared_sonar_file_is_named_and_prepare_rebuilds_it(tmp_path, prepared):
    data = shutil.copytree(prepared, tmp_path / "data")
    decoder = data / "sonar" / "toy_decoder.pt"
    original = sha256_file(decoder)
    verify_sonar(data)
    for name in ("toy_decoder.pt", "toy_encoder.pt", "toy_spm.model"):
        damaged = shutil.copytree(data, tmp_path / f"damaged-{name}")
        _overwrite_1k(damaged / "sonar" / name)
        with pytest.raises(ShardError, match=f"{damaged / 'sonar' / name} does not match the SHA-256 recorded"):
            verify_sonar(damaged)
    _overwrite_1k(decoder)
    with pytest.raises(ShardError) as caught:
        verify_sonar(data)
    message = str(caught.value)
    assert "rebuild it with: sonarllm prepare " in message and "data.verify_sonar false" in message
    rebuild = shlex.split(message.split("rebuild it with: sonarllm prepare ")[1].split(";")[0])
    assert prepare_data.main([*rebuild, "--quiet"]) == 0  # the command the message gives
    assert sha256_file(decoder) == original
    verify_sonar(data)


def test_training_refuses_a_changed_sonar_decoder_in_one_line(tmp_path, prepared, two_steps):
    """On resume (the same check runs at a fresh start); data.verify_sonar false overrides it
    (not run here: it would train)."""
    data = shutil.copytree(prepared, tmp_path / "data")
    _overwrite_1k(data / "sonar" / "toy_decoder.pt")
    run = shutil.copytree(two_steps, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = train(run, data, "--loop.max_steps", "3", check=False)
    assert out.returncode == 1
    _one_line(out.stderr, f"SONAR decoder {data / 'sonar' / 'toy_decoder.pt'} does not match the SHA-256 recorded",
              "rebuild it with: sonarllm prepare", "data.verify_sonar false")  # fmt: skip
    assert {p: p.read_bytes() for p in before} == before


def test_final_has_checksums_the_sonar_identity_and_usual_permissions(prepared, two_steps):
    final = two_steps / "final"
    manifest = json.loads((final / "bundle.json").read_text())
    recorded = read_manifest(prepared)["options"]["sonar"]
    for field in ("tokenizer", "encoder", "decoder"):
        assert manifest["sonar"][field]["sha256"] == recorded[field]  # the SONAR the data was prepared with
    assert {"model.safetensors", "config.json", "sonar.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(final / name)
    umask = os.umask(0)
    os.umask(umask)
    assert (final / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- DL2: the trainer's output directory ------------------------------------------------------


def test_a_copy_of_final_as_output_dir_is_refused_untouched(tmp_path, prepared, two_steps):
    target = shutil.copytree(two_steps / "final", tmp_path / "model")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    out = train(target, prepared, "--loop.max_steps", "1", check=False)
    assert out.returncode == 2
    _one_line(out.stderr, f"run.output_dir {target} is not empty and is not a training run")
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_which_output_dirs_the_trainer_writes_into(tmp_path, two_steps):
    check_run_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")
    check_run_dir(two_steps)
    assert (two_steps / RUN_MARKER).is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "metrics.jsonl").write_text('{"step": 1}\n')
    earlier = shutil.copytree(two_steps, tmp_path / "earlier")  # a run of an older sonarllm: no marker
    (earlier / RUN_MARKER).unlink()
    check_run_dir(earlier)
    without_lock = shutil.copytree(earlier, tmp_path / "copied-files")  # its config.json elsewhere
    (without_lock / "run.lock").unlink()
    final_with_lock = shutil.copytree(two_steps / "final", tmp_path / "final-copy")
    (final_with_lock / "run.lock").write_text("")
    for refused in (user, without_lock, final_with_lock):
        with pytest.raises(ValueError, match=f"run.output_dir {refused} is not empty and is not a training run"):
            check_run_dir(refused)


def test_a_run_from_before_the_marker_resumes_and_is_marked(tmp_path, prepared, two_steps):
    run = shutil.copytree(two_steps, tmp_path / "run")
    (run / RUN_MARKER).unlink()
    out = train(run, prepared, "--loop.max_steps", "3")
    assert "(step 2)" in out.stdout and (run / RUN_MARKER).is_file()


# --- DL3 for prepare --out; the corpus; read-only checkpoints ---------------------------------


def test_prepare_out_refuses_a_users_directory_untouched(tmp_path, prepared, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "sonar.json").write_text("my notes\n")
    corpus = read_manifest(prepared)["options"]["source"]
    assert prepare_data.main(["--source", corpus, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"sonarllm prepare: error: --out {out} is not empty and holds no preparation (prepare.lock "
                           "or manifest.json); choose a new or empty directory")  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["sonar.json"] and (out / "sonar.json").read_text() == "my notes\n"


def test_a_corpus_edited_after_its_preparation_is_noticed(tmp_path, prepared):
    data = shutil.copytree(prepared, tmp_path / "data")
    manifest = read_manifest(data)
    corpus = tmp_path / "corpus.jsonl"
    shutil.copyfile(manifest["options"]["source"], corpus)
    manifest["options"]["source"] = str(corpus)
    assert manifest["source_stat"]["bytes"] == corpus.stat().st_size
    assert changed_corpus_note(manifest, data) is None
    os.utime(corpus, ns=(1, 1))  # touched, same content: nothing to say
    assert changed_corpus_note(manifest, data) is None
    with open(corpus, "a") as f:
        f.write('{"text": "A new story. It is short."}\n')
    note = changed_corpus_note(manifest, data)
    assert note is not None and f"the corpus {corpus} changed after data.prepared_dir {data}" in note


def test_a_read_only_checkpoints_directory_is_named(tmp_path, monkeypatch):
    assert read_only_problem(tmp_path) is None
    assert read_only_problem(tmp_path / "absent") is None

    def refuse(**_kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root writes anywhere: simulate a read-only mount
    assert read_only_problem(tmp_path) == (f"{tmp_path} is read-only ({os.strerror(errno.EROFS)}); make it writable, "
                                           "or choose another run.output_dir")  # fmt: skip
