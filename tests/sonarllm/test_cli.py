"""The ``sonarllm`` command line (sonarllm.cli): exit codes 0 / 1 / 2, one-line error messages,
and the generate / evaluate commands on the session's toy bundle (from test_generate).

``main(argv)`` runs in-process; one test runs ``python -m sonarllm.cli`` to check the real
process exit status and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sonarllm import metrics
from sonarllm.bundle import save_bundle
from sonarllm.cli import main
from sonarllm.config import SonarLLMConfig
from sonarllm.model import SonarLLM
from sonarllm.sonar.pipeline import SonarSpec

pytestmark = pytest.mark.usefixtures("one_thread")


REPO = Path(__file__).resolve().parents[2]
FAST = ["--beam-size", "2", "--max-tokens", "6", "--max-sentences", "4"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sonarllm "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


# ---------------------------------------------------------------------------------------------
# Help and usage errors (exit 0 / 2)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["evaluate", "--help"]])
def test_help_exits_0(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith("usage: sonarllm")


def test_top_level_help_lists_every_command(capsys):
    _, out, _ = run(capsys, "--help")
    for command in ("generate", "evaluate", "prepare", "train"):
        assert command in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage:" in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--beam-size", "0"], "--beam-size"),
        (["--eos-threshold", "2"], "--eos-threshold"),
        (["--temperature", "-1"], "--temperature"),
        (["--repeat-noise", "-1"], "argument --repeat-noise: expected a finite number > 0, got '-1'"),
        (["--device", "gpu0"], "--device"),
        (["--max-sentences", "x"], "--max-sentences"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_option_value_exits_2(capsys, toy_bundle_dir, args, fragment):
    code, _, err = run(
        capsys, "generate", "--model", str(toy_bundle_dir), "--prompt", "A cat.", *args
    )
    assert code == 2 and fragment in err


@pytest.mark.parametrize("args", [["--repeat-threshold", "0.9"], ["--repeat-retries", "1", "--repeat-noise", "0.5"]])
def test_repeat_options_without_the_repetition_control_exit_2(capsys, toy_bundle_dir, args):
    code, out, err = run(capsys, "generate", "--model", str(toy_bundle_dir), "--prompt", "A cat.", *args)
    assert code == 2 and out == ""
    assert_one_line_error(err, f"{', '.join(a for a in args if a.startswith('--'))}: appl")
    assert "only with --no-repeat-sentences K > 0" in err


def test_missing_required_option_exits_2(capsys):
    code, _, err = run(capsys, "evaluate", "--data", "x.txt")
    assert code == 2 and "--model" in err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_exits_2_with_a_message(capsys, toy_bundle_dir, prompt):
    code, out, err = run(
        capsys, "generate", "--model", str(toy_bundle_dir), "--prompt", "A cat.", "--prompt", prompt
    )
    assert code == 2 and out == ""
    assert_one_line_error(err, "prompt #2 is empty")


def test_no_prompt_exits_2(capsys, toy_bundle_dir):
    code, _, err = run(capsys, "generate", "--model", str(toy_bundle_dir))
    assert code == 2
    assert_one_line_error(err, "no prompt given")


# ---------------------------------------------------------------------------------------------
# Runtime errors (exit 1, one line, no traceback)


def test_missing_model_directory_exits_1(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "A cat.")
    assert code == 1
    assert_one_line_error(err, "model directory not found", "nope")


@pytest.fixture
def model_copy(toy_bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(toy_bundle_dir, tmp_path / "model"))


def test_corrupted_checkpoint_exits_1(capsys, model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    code, _, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.")
    assert code == 1
    assert_one_line_error(err, "model.safetensors", "corrupted")


def test_missing_checkpoint_file_exits_1(capsys, model_copy):
    (model_copy / "config.json").unlink()
    code, _, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.")
    assert code == 1
    assert_one_line_error(err, "config.json", "missing")


def test_model_with_nan_weights_exits_1(capsys, toy_bundle_dir, tmp_path):
    model = SonarLLM.from_pretrained(toy_bundle_dir)
    with torch.no_grad():
        model.output_proj.weight[0, 0] = float("nan")
    save_bundle(tmp_path / "nan", model, SonarSpec.load(toy_bundle_dir / "sonar.json"))
    (tmp_path / "held_out.txt").write_text("The cat sat. A dog ran.\n")
    for command in (["generate", "--prompt", "A cat."], ["evaluate", "--data", str(tmp_path / "held_out.txt")]):
        code, _, err = run(capsys, command[0], "--model", str(tmp_path / "nan"), *command[1:])
        assert code == 1
        assert_one_line_error(err, str(tmp_path / "nan"), "non-finite weights", "output_proj.weight")


def test_incompatible_checkpoint_exits_1(capsys, toy_bundle_dir, tmp_path):
    """A model of another SONAR width (32) than the bundle's toy SONAR (64)."""
    narrow = SonarLLM(SonarLLMConfig.from_name("toy", sonar_dim=32))
    spec = SonarSpec.load(toy_bundle_dir / "sonar.json")
    save_bundle(tmp_path / "narrow", narrow, spec)
    code, _, err = run(
        capsys, "generate", "--model", str(tmp_path / "narrow"), "--prompt", "A cat."
    )
    assert code == 1
    assert_one_line_error(err, "incompatible checkpoint", "32")


def test_missing_sonar_file_exits_1(capsys, model_copy):
    spec = json.loads((model_copy / "sonar.json").read_text())
    (model_copy / spec["decoder"]).unlink()
    code, _, err = run(capsys, "generate", "--model", str(model_copy), "--prompt", "A cat.")
    assert code == 1
    assert_one_line_error(err, "SONAR decoder file not found", spec["decoder"])


def test_missing_eval_dependency_exits_1(capsys, toy_bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.translate.bleu_score", None)
    metrics._bleu_parts.cache_clear()
    try:
        code, _, err = run(
            capsys, "evaluate", "--model", str(toy_bundle_dir), "--data", str(tmp_path)
        )
    finally:
        metrics._bleu_parts.cache_clear()
    assert code == 1
    assert_one_line_error(err, "nltk", "pip install 'sonarllm[eval]'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_exits_1(capsys, toy_bundle_dir):
    code, _, err = run(
        capsys, "generate", "--model", str(toy_bundle_dir), "--prompt", "A cat.", "--device", "cuda"
    )
    assert code == 1
    assert_one_line_error(err, "CUDA is not available")


def test_process_exit_status_and_message_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sonarllm.cli",
            "generate",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "A cat.",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc.stderr, "model directory not found")


# ---------------------------------------------------------------------------------------------
# Commands that work (exit 0)


def test_generate_prints_one_text_per_prompt(capsys, toy_bundle_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom had a red ball.\n\nThe cat sat on the mat. A dog ran.\n")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(toy_bundle_dir),
        "--prompt",
        "She was happy.",
        "--prompts-file",
        str(prompts),
        "--device",
        "auto",
        *FAST,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("She was happy.") and lines[2].startswith("The cat sat on the mat.")


def test_generate_json_and_stream_agree(capsys, toy_bundle_dir):
    base = [
        "generate",
        "--model",
        str(toy_bundle_dir),
        "--prompt",
        "Tom had a red ball.",
        "--prompt",
        "The cat sat on the mat. A dog ran.",
        "--device",
        "cpu",
        *FAST,
    ]
    code, out, err = run(capsys, *base, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert [len(r["sentences"]) for r in records] == [3, 2]
    assert all(r["stop_reason"] in ("eos", "max_sentences") for r in records)
    code, out, _ = run(capsys, *base, "--json", "--stream")
    assert code == 0
    streamed = [json.loads(line) for line in out.splitlines()]
    for r in records:
        assert [s["sentence"] for s in streamed if s["index"] == r["index"]] == r["sentences"]
    code, out, _ = run(capsys, *base, "--stream")
    assert code == 0 and out.splitlines()[0].startswith("[0] ")


def test_evaluate_prints_a_table_and_writes_json(capsys, toy_bundle_dir, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in [
                "The cat sat on the mat. A dog ran in the park. Tom had a red ball.",
                "She was very happy today. They played all day long.",
            ]
        )
    )
    out_json = tmp_path / "res" / "eval.json"
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(toy_bundle_dir),
        "--data",
        str(data),
        "--json",
        str(out_json),
        "--beam-size",
        "2",
        "--max-tokens",
        "6",
    )
    assert code == 0, err
    assert "token cross-entropy" in out and "ROUGE-L" in out
    results = json.loads(out_json.read_text())
    assert results["documents"] == 2 and results["short"]["documents"] == 1
    code, out, _ = run(
        capsys,
        "evaluate",
        "--model",
        str(toy_bundle_dir),
        "--data",
        str(data),
        "--json",
        "-",
        "--no-nlg",
        "--max-docs",
        "1",
    )
    assert code == 0
    assert json.loads(out)["documents"] == 1


def test_evaluate_empty_or_undecodable_data(capsys, toy_bundle_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, out, err = run(capsys, "evaluate", "--model", str(toy_bundle_dir), "--data", str(empty), "--no-nlg")
    assert code == 2 and out == ""
    assert_one_line_error(err, f"--data {empty} holds no documents")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9. Deux.".encode("latin-1"))
    code, _, err = run(capsys, "evaluate", "--model", str(toy_bundle_dir), "--data", str(latin1), "--no-nlg")
    assert code == 1
    assert_one_line_error(err, f"{latin1} is not UTF-8 text")


def test_evaluate_missing_data_exits_1(capsys, toy_bundle_dir, tmp_path):
    code, _, err = run(
        capsys, "evaluate", "--model", str(toy_bundle_dir), "--data", str(tmp_path / "x.jsonl")
    )
    assert code == 1
    assert_one_line_error(err, "evaluation data not found")


# ---------------------------------------------------------------------------------------------
# Delegation to the training entry points (stand-in modules: training is tested elsewhere)


@pytest.mark.parametrize(
    "command, module", [("prepare", "training.prepare_data"), ("train", "training.train")]
)
def test_prepare_and_train_delegate_their_arguments(monkeypatch, command, module):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 3, __file__=str(REPO / "training" / "x.py"))
    monkeypatch.setitem(sys.modules, module, fake)
    assert main([command, "--config", "x.toml", "--help"]) == 3
    assert seen == [["--config", "x.toml", "--help"]]
    fake.main = lambda argv: None
    assert main([command]) == 0
