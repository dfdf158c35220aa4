"""Nothing a user made is lost and nothing changed is used silently: atomic writes with the usual
permissions, SHA-256 computed once per file per process, a bundle's bundle.json (checksums and
the SONAR it was trained with) verified on load, and ``evaluate --json`` / ``--prompts-file``
refusing or naming bad paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from sonarllm import bundle as bundle_module
from sonarllm import files
from sonarllm.bundle import BundleError, load_bundle, save_bundle
from sonarllm.cli import main
from sonarllm.config import SonarLLMConfig
from sonarllm.model import SonarLLM
from sonarllm.sonar.pipeline import SonarSpec


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err, *fragments):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def overwrite_1k(path):
    """Overwrite 1 KB in the middle (tensor data: the file still loads, with other values)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x3c" * 1024)  # float32 0.0115: finite values


@pytest.fixture
def model_copy(toy_bundle_dir, tmp_path):
    return shutil.copytree(toy_bundle_dir, tmp_path / "model")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_files_get_the_usual_permissions(tmp_path, umask_022):
    """safetensors creates its file 0600; the atomic writer gives it what the umask allows."""
    SonarLLM(SonarLLMConfig.from_name("toy")).save_pretrained(tmp_path / "m")
    for name in ("model.safetensors", "config.json"):
        assert oct((tmp_path / "m" / name).stat().st_mode & 0o777) == oct(0o644), name
    files.write_text_atomic(tmp_path / "t.txt", "x")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o644


def test_a_file_is_hashed_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    first = files.cached_sha256(path)
    assert files.cached_sha256(path) == first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"b" * 1001)  # changed: hashed again
    assert files.cached_sha256(path) == hashlib.sha256(b"b" * 1001).hexdigest()
    assert len(calls) == 2


def test_bundle_json_holds_checksums_and_the_sonar_the_model_was_trained_with(toy_bundle_dir):
    manifest = json.loads((toy_bundle_dir / "bundle.json").read_text())
    spec = json.loads((toy_bundle_dir / "sonar.json").read_text())
    named = [spec[field] for field in ("tokenizer", "encoder", "decoder")]
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sonar.json", *named}
    for name, entry in manifest["files"].items():
        path = toy_bundle_dir / name
        assert entry == {"sha256": sha256(path), "bytes": path.stat().st_size}
    for field in ("tokenizer", "encoder", "decoder"):  # where the files came from, and what they were
        source = manifest["sonar"][field]["source"]
        assert os.path.isabs(source) and manifest["sonar"][field]["sha256"] == sha256(source)
        assert sha256(toy_bundle_dir / spec[field]) == sha256(source)


@pytest.mark.parametrize("name", ["sonar/decoder", "sonar/tokenizer", "sonar/encoder", "model.safetensors"])
def test_a_changed_bundle_file_is_refused_in_one_line_unless_no_verify(capsys, model_copy, name):
    spec = json.loads((model_copy / "sonar.json").read_text())
    field = name.removeprefix("sonar/")
    target = spec[field] if name.startswith("sonar/") else name
    overwrite_1k(model_copy / target)
    code, out, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.", "--max-sentences", "2")
    assert code == 1 and out == ""
    one_line(err, str(model_copy), f"{target} failed its checksum", "export it again", "--no-verify")
    if name in ("sonar/decoder", "model.safetensors"):  # still loadable files: the override loads them
        code, out, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.", "--max-sentences",
                             "2", "--no-verify")  # fmt: skip
        assert code == 0, err


def test_another_sonar_decoder_copied_in_is_refused(capsys, model_copy, tmp_path):
    """The same size, another toy SONAR (another seed): only the digest tells them apart."""
    from sonarllm.sonar.tokenizer import SonarTokenizer
    from sonarllm.sonar.toy import build_toy_sonar

    spec = json.loads((model_copy / "sonar.json").read_text())
    _, other = build_toy_sonar(SonarTokenizer(model_copy / spec["tokenizer"]), tmp_path / "other", seed=1)
    assert os.path.getsize(other) == os.path.getsize(model_copy / spec["decoder"])
    shutil.copyfile(other, model_copy / spec["decoder"])
    code, _, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.")
    assert code == 1
    one_line(err, f"{spec['decoder']} failed its checksum")


def test_a_referenced_sonar_file_that_changed_is_refused(tmp_path, toy_bundle_dir, monkeypatch):
    """SONAR files above COPY_LIMIT stay where they are; bundle.json records their SHA-256."""
    sonar = shutil.copytree(toy_bundle_dir / "sonar", tmp_path / "sonar")
    spec = SonarSpec.load(toy_bundle_dir / "sonar.json")
    local = SonarSpec(*(str(sonar / os.path.basename(getattr(spec, f))) for f in ("tokenizer", "encoder", "decoder")))
    monkeypatch.setattr(bundle_module, "COPY_LIMIT", 0)
    save_bundle(tmp_path / "model", SonarLLM.from_pretrained(toy_bundle_dir), local)
    assert not (tmp_path / "model" / "sonar").exists()
    load_bundle(tmp_path / "model", kernel_impl="torch")
    overwrite_1k(local.decoder)
    with pytest.raises(BundleError, match=f"SONAR decoder {local.decoder} .* is not the file the model was trained with"):
        load_bundle(tmp_path / "model", kernel_impl="torch")
    load_bundle(tmp_path / "model", kernel_impl="torch", decoder=False)  # not used: not checked
    load_bundle(tmp_path / "model", kernel_impl="torch", verify=False)


def test_a_bundle_of_an_older_sonarllm_without_bundle_json_loads(model_copy):
    (model_copy / "bundle.json").unlink()
    assert load_bundle(model_copy, kernel_impl="torch").model is not None


def test_a_binary_prompts_file_is_named(capsys, toy_bundle_dir, tmp_path):
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"\x00\xff\xfe\x80 binary")
    code, _, err = run(capsys, "generate", "--model", str(toy_bundle_dir), "--prompts-file", str(prompts))
    assert code == 1
    one_line(err, f"--prompts-file {prompts} is not UTF-8 text")


def test_evaluate_json_never_replaces_an_input_or_a_foreign_file(capsys, model_copy, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text("The cat sat. A dog ran.\n\nTom had a ball. She was happy.\n")
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    before = {p: p.read_bytes() for p in [data, foreign, *model_copy.rglob("*")] if p.is_file()}
    for target, why in ((data, "is an input of this command"), (model_copy / "config.json", "is in an input"),
                        (model_copy / "new.json", "is in an input"), (foreign, "is an existing file this command did not write"),
                        (tmp_path, "is a directory")):  # fmt: skip
        code, out, err = run(capsys, "evaluate", "--model", str(model_copy), "--data", str(data), "--no-nlg",
                             "--json", str(target))  # fmt: skip
        assert code == 2, (target, err)
        one_line(err, f"--json {target} {why}")
    assert {p: p.read_bytes() for p in before} == before
    assert not (model_copy / "new.json").exists()
    results = tmp_path / "results.json"
    for _ in range(2):  # a new file, then the earlier results replaced
        code, _, err = run(capsys, "evaluate", "--model", str(model_copy), "--data", str(data), "--no-nlg",
                           "--json", str(results))  # fmt: skip
        assert code == 0, err
    assert json.loads(results.read_text())["documents"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
