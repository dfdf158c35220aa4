"""Distributed preparation and memory measurements (issue 23), on whatever machine runs it.

    python -m bench.prepare_scaling scaling --work /tmp/prep-bench   # 1 vs 2 processes
    python -m bench.prepare_scaling memory --work /tmp/prep-bench    # peak RSS, corpus 1x vs 10x

``scaling`` prepares one corpus with a given SONAR (so no toy training is timed) by one process
and then by ``torchrun --nproc_per_node 2``, for the toy SONAR and for a random encoder of
dim 512 / 6 layers, and prints sentences/s (whole command, wall clock) and the ratio.
``memory`` prepares ``--stories`` example stories (3,000) and the same stories ten times with
the toy SONAR, trains a few steps on each, and prints each command's peak RSS (the maximum over
the command's processes, from ``getrusage(RUSAGE_CHILDREN)`` in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "training" / "prepare_data.py"
TRAIN = REPO / "training" / "train.py"
STORIES = REPO / "training" / "example" / "stories.jsonl.gz"


def _corpus(path: Path, copies: int, limit: int | None = None) -> Path:
    with gzip.open(STORIES, "rt") as f:
        lines = f.readlines()[:limit]
    with open(path, "w") as out:
        for _ in range(copies):
            out.writelines(lines)
    return path


def _peak(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB, wall s, output) of ``cmd`` run from a fresh interpreter."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:], capture_output=True, "
             "text=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t); "
             "sys.stderr.write(r.stdout[-2000:] + r.stderr[-2000:]); sys.exit(r.returncode)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {"DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    kib, wall = r.stdout.split()
    return int(kib) / 1024, float(wall), r.stderr


def _sonar(work: Path, corpus: Path, dim: int, layers: int) -> Path:
    """A sonar.json of the toy SONAR of ``corpus`` with an encoder of ``dim``/``layers`` (random)."""
    sys.path.insert(0, str(REPO))
    from sonarllm.sonar.config import sonar_config
    from sonarllm.sonar.pipeline import SonarSpec
    from sonarllm.sonar.tokenizer import SonarTokenizer
    from sonarllm.sonar.toy import build_toy_sonar, train_toy_tokenizer

    folder = work / f"sonar-{dim}x{layers}"
    if (folder / "sonar.json").is_file():
        return folder / "sonar.json"
    with open(corpus) as f:
        sentences = [s for line in f for s in json.loads(line)["text"].split(". ")][:20_000]
    tok = SonarTokenizer(train_toy_tokenizer(sentences, folder / "spm.model", vocab_size=1000))
    cfg = sonar_config("toy")  # d 64, 2 layers
    if (dim, layers) != (cfg.model_dim, cfg.num_layers):
        cfg = dataclasses.replace(cfg, model_dim=dim, num_layers=layers, num_heads=8, ffn_dim=4 * dim)
    enc, dec = build_toy_sonar(tok, folder, config=cfg)
    SonarSpec("spm.model", enc.name, dec.name).save(folder / "sonar.json")
    return folder / "sonar.json"


def scaling(work: Path) -> None:
    for name, dim, layers, stories in (("toy SONAR (d 64, 2 layers)", 64, 2, 1000),
                                       ("random encoder d 512, 6 layers", 512, 6, 300)):  # fmt: skip
        corpus = _corpus(work / f"scaling-{stories}.jsonl", 1, stories)
        sonar = _sonar(work, corpus, dim, layers)
        rates = {}
        for nproc in (1, 2):
            out = work / f"scaling-{dim}-{nproc}"
            launcher = [sys.executable, str(PREPARE)] if nproc == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PREPARE)]
            cmd = [*launcher, "--source", str(corpus), "--out", str(out), "--sonar", str(sonar), "--quiet",
                   "--eval-documents", "20", "--shard-documents", "50"]  # fmt: skip
            _, wall, log = _peak(cmd)
            sentences = sum(json.loads((out / "manifest.json").read_text())["totals"][s]["sentences"] for s in ("train", "eval"))
            rates[nproc] = sentences / wall
            print(f"{name}: {nproc} process(es): {sentences} sentences in {wall:.1f} s = {rates[nproc]:.0f} sentences/s "
                  f"({rates[nproc] / nproc:.0f} per process)", flush=True)  # fmt: skip
        print(f"{name}: scaling 1 -> 2 processes: {rates[2] / rates[1]:.2f}x", flush=True)


def memory(work: Path, stories: int) -> None:
    for copies in (1, 10):
        corpus = _corpus(work / f"memory-{copies}x.jsonl", copies, stories)
        out = work / f"memory-{copies}x"
        prep = [sys.executable, str(PREPARE), "--source", str(corpus), "--out", str(out), "--quiet", "--toy-train-steps", "20"]
        rss, wall, _ = _peak(prep)
        print(f"corpus {copies}x ({stories * copies} stories): preparation peak RSS {rss:.0f} MiB ({wall:.0f} s)", flush=True)
        train = [sys.executable, str(TRAIN), "--data.prepared_dir", str(out), "--run.output_dir", str(work / f"run-{copies}x"),
                 "--system.progress", "false", "--model.kernel_impl", "torch", "--loop.max_steps", "5",
                 "--loop.eval_every", "1000", "--loop.checkpoint_every", "1000", "--loop.eval_max_documents", "8"]  # fmt: skip
        rss, wall, _ = _peak(train)
        print(f"corpus {copies}x ({stories * copies} stories): training (5 steps) peak RSS {rss:.0f} MiB ({wall:.0f} s)", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("scaling", "memory"))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--stories", type=int, default=3000, help="memory: stories of the 1x corpus (example stories, repeated)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    scaling(a.work) if a.what == "scaling" else memory(a.work, a.stories)
