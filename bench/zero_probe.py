"""The largest concept model that trains on this GPU with ZeRO-2 and with ZeRO-3: short
``deepspeed training/train.py`` runs (bf16, a ``basic``-shaped SONAR decoder, 64 documents per
micro-batch, no accumulation) over growing model sizes, per ZeRO stage until one fails.

Each run is stopped once its first optimizer step is logged (the trainer writes the peak memory
then: weights, gradients, AdamW states and the step's activations all exist by that point) or
when it fails (out of memory). The data: the embedded example stories, prepared with a SONAR of
the ``basic`` shape (1024-d, 24 layers) and random weights, its vocabulary the toy tokenizer's
(~1,000 pieces, not 256,206: nothing can be downloaded on the GPU machine; the real vocabulary
would add ~0.5 GiB of frozen weights and chunked-logit buffers, small next to the model).

    python -m bench.zero_probe [--stages 2,3] [--sizes 1.3B,2.7B,6.7B] [--out DIR] [--limit 240]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Model sizes beyond the presets: (preset to start from, overrides), about 2.7B and 6.7B parameters.
SIZES = {
    "300M": ("300M", {}),
    "1.3B": ("1.3B", {}),
    "2.7B": ("1.3B", {"model_dim": 2560, "ffn_dim": 10240, "num_layers": 32, "num_heads": 40}),
    "6.7B": ("1.3B", {"model_dim": 4096, "ffn_dim": 16384, "num_layers": 32, "num_heads": 64}),
}


def probe_sonar(root: Path) -> Path:
    """A sonar.json naming the example's toy tokenizer and basic-shaped random encoder/decoder."""
    from sonarllm.sonar.pipeline import SonarSpec
    from sonarllm.sonar.tokenizer import SonarTokenizer
    from sonarllm.sonar.toy import build_toy_sonar, train_toy_tokenizer
    from training.config import EXAMPLE_CORPUS
    from training.prepare_data import load_documents

    spec_path = root / "sonar.json"
    if spec_path.is_file():
        return spec_path
    folder = root / "sonar"
    folder.mkdir(parents=True, exist_ok=True)
    sentences = [s for doc in load_documents(Path(EXAMPLE_CORPUS), 32, None) for s in doc]
    spm = train_toy_tokenizer(sentences, folder / "spm.model", vocab_size=1000)
    build_toy_sonar(SonarTokenizer(spm), folder, config="basic")
    SonarSpec("sonar/spm.model", "sonar/toy_encoder.pt", "sonar/toy_decoder.pt").save(spec_path)
    return spec_path


def prepare(root: Path, device: str) -> Path:
    data = root / "data"
    if not (data / "manifest.json").is_file():
        spec = probe_sonar(root)
        subprocess.run([sys.executable, "training/prepare_data.py", "--out", str(data), "--sonar", str(spec),
                        "--device", device, "--quiet"], cwd=REPO, check=True)  # fmt: skip
    return data


def train_command(data: Path, run_dir: Path, size: str, stage: int, documents: int) -> list[str]:
    preset, overrides = SIZES[size]
    launcher = ["deepspeed", "--num_gpus", "1"] if _has_deepspeed_launcher() else [sys.executable]
    return launcher + [
        "training/train.py", "--data.prepared_dir", str(data), "--model.preset", preset,
        "--model.overrides", json.dumps(overrides), "--system.precision", "bf16", "--system.zero_stage", str(stage),
        "--loop.micro_batch_documents", str(documents), "--loop.grad_accum_steps", "1", "--loop.max_steps", "2",
        "--loop.eval_every", "1000", "--loop.checkpoint_every", "1000", "--run.output_dir", str(run_dir),
        "--run.resume", "never", "--system.progress", "false",
    ]  # fmt: skip


def _has_deepspeed_launcher() -> bool:
    from shutil import which

    return which("deepspeed") is not None


def first_step_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "first_step_s" in record:
                return record
    return None


def run_one(cmd: list[str], run_dir: Path, log: Path, limit: float) -> dict:
    """Run until the first step is logged (then stop it), the process fails, or ``limit`` s pass."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a record of an earlier probe is no answer
    run_dir.mkdir(parents=True)
    tic = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        record = None
        while proc.poll() is None and time.time() - tic < limit:
            record = first_step_record(run_dir)
            if record is not None:
                break
            time.sleep(1.0)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # no checkpoint: a multi-GB write would only cost time
            proc.wait()
    record = record or first_step_record(run_dir)
    tail = log.read_text()[-4000:]
    result = {"seconds": round(time.time() - tic, 1)}
    if record is not None:
        return result | {"ok": True, "peak_memory_gib": record.get("peak_memory_gib"), "first_step_s": record["first_step_s"]}
    reason = "out of memory" if "out of memory" in tail.lower() or "OutOfMemoryError" in tail else (
        "time limit" if time.time() - tic >= limit else "failed")  # fmt: skip
    return result | {"ok": False, "reason": reason, "log_tail": tail[-600:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.zero_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="2,3")
    p.add_argument("--sizes", default="1.3B,2.7B,6.7B", help=f"ascending, from {list(SIZES)}")
    p.add_argument("--documents", type=int, default=64)
    p.add_argument("--out", default="runs/zero_probe")
    p.add_argument("--limit", type=float, default=240.0, help="seconds per run")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
    root = Path(args.out)
    data = prepare(root, args.device)
    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for size in sizes:
            run_dir = root / f"zero{stage}-{size}"
            cmd = train_command(data, run_dir, size, stage, args.documents)
            result = {"stage": stage, "size": size} | run_one(cmd, run_dir, root / f"zero{stage}-{size}.log", args.limit)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
            tmp = root / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, root / "results.json")
            if not result["ok"]:
                break
    for stage in sorted({r["stage"] for r in results}):
        ok = [r for r in results if r["stage"] == stage and r["ok"]]
        best = f"{ok[-1]['size']} (peak {ok[-1]['peak_memory_gib']} GiB)" if ok else "none of the sizes tried"
        print(f"ZeRO-{stage}: largest that trains: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
