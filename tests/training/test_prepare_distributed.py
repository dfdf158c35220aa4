"""Distributed preparation through torchrun (gloo on CPU): the shards and the manifest are byte
for byte those of one process, and a preparation whose rank died resumes to the same result."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import tiny_corpus
from training import prepare_data
from training.shards import MANIFEST, ShardedDocuments, sha256_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "prepare_data.py"
OPTIONS = ["--eval-documents", "4", "--shard-documents", "3", "--toy-vocab-size", "200", "--toy-train-steps", "2",
           "--quiet"]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, corpus, out, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(script), "--source", str(corpus), "--out", str(out), *OPTIONS]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _files(directory: Path) -> dict[str, str]:
    """Digest of every file a preparation leaves (the lock file aside: it holds its holder's pid)."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != prepare_data.LOCK_NAME}  # fmt: skip


def _single(corpus, out):
    """The files one process prepares into ``out`` (which is then removed: the manifest names the
    directory in its rebuild command, so the runs compared must use the same one)."""
    assert prepare_data.main(["--source", str(corpus), "--out", str(out), *OPTIONS]) == 0
    files = _files(out)
    shutil.rmtree(out)
    return files


def test_two_processes_prepare_byte_identical_data(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 22)  # 18 train documents in 6 shards, 4 eval in 2
    out = tmp_path / "data"
    single = _single(corpus, out)
    run = _torchrun(SCRIPT, corpus, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("prepared ") == 1  # rank 0 reports
    files = _files(out)
    assert files == single
    assert sum(name.endswith(".safetensors") for name in files) == 8 and MANIFEST in files
    assert not (out / prepare_data.PROGRESS).exists()
    ShardedDocuments(out, "train")  # verifies


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from training import prepare_data
write_shard = prepare_data.write_shard
written = []

def write_then_die(path, *args):
    digest = write_shard(path, *args)
    written.append(path.name)
    if os.environ["RANK"] == "1" and len(written) == 2:  # rank 1 dies after its second shard
        os.kill(os.getpid(), signal.SIGKILL)
    return digest

prepare_data.write_shard = write_then_die
sys.exit(prepare_data.main())
"""


def test_a_killed_rank_resumes_to_the_same_result(tmp_path):
    corpus = tiny_corpus(tmp_path / "c.jsonl", 22)
    out = tmp_path / "data"
    single = _single(corpus, out)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))
    died = _torchrun(killer, corpus, out)
    assert died.returncode != 0
    assert not (out / MANIFEST).is_file() or not prepare_data.read_manifest(out)["complete"]
    records = sorted(p.name for p in (out / prepare_data.PROGRESS).glob("*.json"))
    assert "train-00001.safetensors.json" in records  # rank 1's first shard; it died after writing its second
    assert (out / "train-00003.safetensors").is_file() and "train-00003.safetensors.json" not in records
    kept = {name[: -len(".json")]: (out / name[: -len(".json")]).stat().st_mtime_ns for name in records}
    resumed = _torchrun(SCRIPT, corpus, out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _files(out) == single
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # written before the kill, kept
