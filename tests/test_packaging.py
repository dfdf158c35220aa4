"""The package lives beside transformers 5 and Hugging Face's `kernels` package (which owns the
import name ``kernels``): the wheel installs only our own import names, every entry point imports
our code, and a process can hold transformers' Llama, HF `kernels` and our fused loss at once."""

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

needs_hf_kernels = pytest.mark.skipif(
    importlib.util.find_spec("kernels") is None,
    reason="Hugging Face's `kernels` is not installed (transformers < 5 does not pull it in)",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"DS_ACCELERATOR": "cpu", "SONARLLM_KERNEL_IMPL": "torch"} | extra


def _wheel_top_level(tmp_path, env) -> set[str]:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("sonarllm", "sonarllm_kernels", "training"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sonarllm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "sonarllm_kernels/fused_linear_cross_entropy/tiles.json" in names
    return {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}


@pytest.mark.slow
@pytest.mark.parametrize("repo_on_pythonpath", [False, True])
def test_wheel_installs_only_our_own_import_names(tmp_path, repo_on_pythonpath):
    """No top-level `kernels` (Hugging Face's) and no `training` (a name research code uses)."""
    env = _env(PYTHONPATH=str(REPO)) if repo_on_pythonpath else _env()
    assert _wheel_top_level(tmp_path, env) == {"sonarllm", "sonarllm_kernels"}


def test_no_kernels_package_in_the_repository_root():
    assert not (REPO / "kernels").exists() and not (REPO / "kernels.py").exists()


_ONE_PROCESS = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import kernels, sonarllm, sonarllm_kernels
from sonarllm_kernels import fused_linear_cross_entropy
from sonarllm.loss import SonarTokenLoss
from sonarllm.sonar.decoder import SonarDecoder

assert "site-packages" in kernels.__file__ and hasattr(kernels, "get_kernel"), kernels.__file__
for module in (sonarllm_kernels, sonarllm):  # this checkout's, through its editable install from elsewhere
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} from {module.__file__}, not {sys.argv[1]} (pip install -e . there)"

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
llama = LlamaForCausalLM(cfg)
ids = torch.randint(0, 50, (2, 7))
hidden = llama.model(input_ids=ids).last_hidden_state
loss = fused_linear_cross_entropy(hidden[:, :-1], llama.lm_head.weight, ids[:, 1:], impl="torch")
expected = torch.nn.functional.cross_entropy(llama(input_ids=ids).logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)
loss.backward()

dec = SonarDecoder("toy", kernel_impl="torch")
token_loss = SonarTokenLoss(dec, kernel_impl="torch")
emb = torch.randn(3, dec.config.model_dim, requires_grad=True)
sequences = [[3, 10, 11, 12, 3], [3, 20, 3], [3, 30, 31, 3]]
value = token_loss(emb, sequences)
value.backward()
assert torch.isfinite(value) and emb.grad is not None
print("ok", float(loss), float(value))
"""


@needs_hf_kernels
@pytest.mark.parametrize("cwd", ["repository", "elsewhere"])
def test_transformers_hf_kernels_and_our_loss_share_a_process(tmp_path, cwd):
    """`python -c` puts the working directory first on sys.path: the repository root, or a user's
    own directory (with a `training` package of their own)."""
    if cwd == "elsewhere":
        (tmp_path / "training").mkdir()
        (tmp_path / "training" / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    where = REPO if cwd == "repository" else tmp_path
    out = subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(REPO)], cwd=where, env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok ")


def _corpus(path: Path, n: int) -> Path:
    with gzip.open(REPO / "training" / "example" / "stories.jsonl.gz", "rt") as src, open(path, "w") as out:
        for i, line in enumerate(src):
            if i >= n:
                break
            out.write(line)
    return path


@pytest.mark.slow
def test_console_script_prepares_trains_and_evaluates_from_another_directory(tmp_path):
    """The installed `sonarllm` script (sys.path[0] = the venv's bin/) from a directory holding a
    `training` package of the user's own: prepare -> train -> evaluate, each exit 0."""
    script = BIN / "sonarllm"
    if not script.exists():
        pytest.skip(f"no installed console script at {script} (pip install -e . into this interpreter's environment)")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    corpus = _corpus(tmp_path / "stories.jsonl", 40)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Tom had a red ball. He played with it.", "Lily was happy. She ran home."]))

    def sonarllm(*args):
        out = subprocess.run([str(script), *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"sonarllm {args[0]}: " + out.stdout[-2000:] + out.stderr[-3000:]
        return out

    sonarllm("prepare", "--source", str(corpus), "--out", "data", "--eval-documents", "8", "--toy-vocab-size", "300",
             "--toy-train-steps", "0", "--quiet")  # fmt: skip
    sonarllm("train", "--data.prepared_dir", "data", "--run.output_dir", "run", "--system.progress", "false",
             "--model.kernel_impl", "torch", "--loop.max_steps", "2", "--loop.micro_batch_documents", "4",
             "--loop.eval_every", "1000", "--loop.eval_max_documents", "4")  # fmt: skip
    assert (tmp_path / "run" / "final").is_dir()
    sonarllm("evaluate", "--model", "run/final", "--data", str(held_out), "--json", "eval.json", "--beam-size", "1",
             "--max-tokens", "4")  # fmt: skip
    assert json.loads((tmp_path / "eval.json").read_text())
