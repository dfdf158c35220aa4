"""The CUDA suite in one short run (``bash bench/gpu_suite.sh`` calls this): parity tests, every
benchmark at the "full" size beside its peers, the embedded example trained on CUDA, one report.

Stages run one after another, each under its own time limit and all under one deadline (6
minutes by default, from a cold Triton cache on one H200); each writes its results to files in
the work directory as they come (a stage cut short keeps what it measured), and after every
stage the report (report.md) and a tarball of the work directory are refreshed in $OUT, so a
run killed from outside loses at most the stage in progress. Every process logs its Triton
compilations (SONARLLM_COMPILE_LOG), so the report gives each stage's wall time and the part of
it spent compiling.

    bash bench/gpu_suite.sh                       # everything but the ZeRO probe, <= 6 minutes
    bash bench/gpu_suite.sh --only attention      # one kernel: its parity tests + its benchmark
    bash bench/gpu_suite.sh --only train,zero     # the example run, then the ZeRO-2/3 probe
    bash bench/gpu_suite.sh --only sweep          # retune the fused cross-entropy (~3 minutes)
    bash bench/gpu_suite.sh --only compile        # the training step eager vs torch.compile'd (minutes)
    bash bench/gpu_suite.sh --full                # the whole parity matrix (no time target)
    python -m bench.gpu_suite --dry-run [...]     # the plan, without running anything

Size: about 460 lines, one script (the suite's stages, limits and report); a GPU-only tool,
not reshaped until it has run on one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEADLINE_S = 360  # the target: the whole suite within 6 minutes
EXAMPLE = ["--config", "training/configs/example.toml", "--system.precision", "bf16"]
EXAMPLE_STAGES = ("train", "compile")  # the stages that run the example (they wait for its data)
TEST_FILES = {
    "flce": "tests/sonarllm_kernels/test_fused_linear_cross_entropy.py",
    "attention": "tests/sonarllm_kernels/test_attention.py",
    "projection": "tests/sonarllm_kernels/test_fused_embedding_projection.py",
}
BENCH_FILES = {
    "flce": "bench/bench_fused_linear_cross_entropy.py",
    "attention": "bench/bench_attention.py",
    "projection": "bench/bench_fused_embedding_projection.py",
    "sonar_loss": "bench/bench_sonar_loss.py",
    "train_step": "bench/bench_train_step.py",
    "encoder": "bench/bench_sonar_encoder.py",
    "compile": "bench/bench_compile.py",
}


@dataclass
class Stage:
    """One step of the suite: commands run in order under one time limit (seconds)."""

    name: str
    limit: int
    what: str
    commands: list[list[str]] = field(default_factory=list)


def plan(only: set[str] | None, full: bool, work: Path) -> list[Stage]:
    """The stages to run, in order (setup always comes first and is not listed here)."""
    wanted = lambda name: only is None or name in only  # noqa: E731
    stages = []
    if wanted("warmup"):
        stages.append(Stage("warmup", 25, "compile the 300M + basic training step's kernels in parallel", [
            [PY, "-m", "training.warmup", "--preset", "300M", "--decoder", "basic", "--dtype", "bf16",
             "--documents", "64", "--sentences", "32", "--report", str(work / "warmup.json")]]))  # fmt: skip
    groups = list(TEST_FILES) if only is None or "tests" in only else [g for g in TEST_FILES if g in only]
    if groups:
        files = [TEST_FILES[g] for g in groups]
        cmd = [PY, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider",
               "--outcomes-jsonl", str(work / "tests.jsonl")] + ([] if full else ["--smoke"])  # fmt: skip
        if _has_xdist():
            cmd += ["-n", "8"]
        limit = 900 if full else (70 if len(groups) == len(TEST_FILES) else 50)
        what = "CUDA parity, " + ("the full matrix" if full else "smoke matrix (pytest --smoke)") + " of " + ", ".join(groups)
        stages.append(Stage("tests", limit, what, [cmd]))
    if wanted("train"):  # eager: inductor's compile time would not fit the stage (--only compile runs it compiled)
        stages.append(Stage("train", 95, "deepspeed training/train.py (embedded example, bf16, system.compile false) "
                                         "to completion; includes waiting for its data preparation (started at the "
                                         "beginning)", [example_command(work, "train-run", compile_=False)]))  # fmt: skip
    limits = {"attention": 35, "projection": 20, "sonar_loss": 20, "train_step": 30, "flce": 20, "encoder": 15}
    for name in ("attention", "projection", "sonar_loss", "train_step", "flce", "encoder"):
        if wanted(name):
            jsonl = work / f"bench-{name}.jsonl"
            stages.append(Stage(name, limits[name], f"{BENCH_FILES[name]} --bench-size full", [
                [PY, "-m", "pytest", BENCH_FILES[name], "-q", "-p", "no:cacheprovider", "--benchmark",
                 "--bench-size", "full", "--bench-jsonl", str(jsonl)]]))  # fmt: skip
    if wanted("profile"):
        stages.append(Stage("profile", 15, "torch.profiler top kernels of the 300M + basic training step", [
            [PY, "-m", "bench.profile_step", "--out", str(work / "profile.md")]]))  # fmt: skip
    if only is not None and "sweep" in only:  # opt-in: about 3 minutes
        stages.append(Stage("sweep", 200, "retune and compare the fused cross-entropy (bench/sweep_flce.py); the "
                                          "winning tile table is sweep_tiles.json", [
            [PY, "bench/sweep_flce.py", "--time-limit", "185", "--table-out", str(work / "sweep_tiles.json"),
             "--json", str(work / "sweep_flce.json")]]))  # fmt: skip
    if only is not None and "compile" in only:  # opt-in: torch.compile of the 300M + basic step takes minutes
        stages.append(Stage("compile", 420, f"the embedded example with system.compile true, then "
                                            f"{BENCH_FILES['compile']} --bench-size full (eager vs system.compile)", [
            example_command(work, "train-run-compiled", compile_=True),
            [PY, "-m", "pytest", BENCH_FILES["compile"], "-q", "-p", "no:cacheprovider", "--benchmark",
             "--bench-size", "full", "--bench-jsonl", str(work / "bench-compile.jsonl")]]))  # fmt: skip
    if only is not None and "zero" in only:  # opt-in: several minutes
        stages.append(Stage("zero", 330, "largest concept model with ZeRO-2 / ZeRO-3 (bench/zero_probe.py)", [
            [PY, "-m", "bench.zero_probe", "--out", str(work / "zero")]]))  # fmt: skip
    return stages


STAGE_NAMES = ("warmup", "tests", "train", "attention", "projection", "sonar_loss", "train_step", "flce",
               "encoder", "profile", "sweep", "zero", "compile")  # fmt: skip


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def example_command(work: Path, run_name: str, compile_: bool) -> list[str]:
    """The README's main job on the embedded example, bf16, into ``work/run_name``."""
    return ["deepspeed", "--num_gpus", "1", "training/train.py", *EXAMPLE, "--data.prepared_dir",
            str(work / "example-data"), "--run.output_dir", str(work / run_name), "--run.resume", "never",
            "--system.progress", "false", "--system.compile", "true" if compile_ else "false"]  # fmt: skip


def prepare_example_command(work: Path) -> list[str]:
    """The example's data preparation, started in the background at the beginning (the train
    stage waits for it): the arguments train.py would prepare it with."""
    from training.config import EXAMPLE_CORPUS, load_config

    d = load_config(REPO / EXAMPLE[1], {}).data
    return [PY, "training/prepare_data.py", "--source", EXAMPLE_CORPUS, "--out", str(work / "example-data"),
            "--sonar", d.sonar, "--max-sentences", str(d.max_sentences), "--eval-documents", str(d.eval_documents),
            "--device", "cuda", "--quiet"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running


def _run(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` (its own process group) with output to ``log``; (exit status or None if it
    ran out of time, seconds). Without DeepSpeed's launcher, a ``deepspeed`` command runs its
    script with plain Python (a world of one)."""
    if cmd[0] == "deepspeed" and shutil.which("deepspeed", path=env.get("PATH")) is None:
        cmd = [PY] + cmd[cmd.index("--num_gpus") + 2 :]
    tic = time.monotonic()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = None
    return status, time.monotonic() - tic


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def compile_seconds(path: Path) -> tuple[float, int]:
    """(seconds in Triton compilations, how many) from a SONARLLM_COMPILE_LOG file."""
    if not path.is_file():
        return 0.0, 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return round(sum(x["seconds"] for x in lines), 1), len(lines)


def setup(work: Path, env: dict) -> dict:
    """Install .whl/ (if any) into /tmp/site, then describe the machine: GPU, versions, the
    optional peers, and the measured dense bf16 matmul rate (the MFU denominator)."""
    info = {}
    wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
    if wheels:
        out = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels],
                             capture_output=True, text=True)  # fmt: skip
        info["wheels"] = f"{len(wheels)} installed into /tmp/site" if out.returncode == 0 else f"install failed: {out.stderr[-500:]}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), "/tmp/site", env.get("PYTHONPATH", "")]))
        env["PATH"] = "/tmp/site/bin" + os.pathsep + env.get("PATH", "")
    probe = subprocess.run([PY, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return info | {"error": (probe.stdout + probe.stderr)[-2000:]}
    info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    if info.get("peak_bf16_tflops"):
        env["SONARLLM_PEAK_TFLOPS"] = str(info["peak_bf16_tflops"])
    return info


_PROBE = r"""
import importlib.util, json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
try:
    import triton; info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"unavailable ({exc})"
for name in ("deepspeed", "liger_kernel", "cut_cross_entropy", "flash_attn", "xdist"):
    info[name] = importlib.util.find_spec(name) is not None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(13):
        start.record(); a @ b; end.record(); torch.cuda.synchronize()
        if i >= 3: times.append(start.elapsed_time(end) / 1e3)
    info["peak_bf16_tflops"] = round(2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12, 1)
print(json.dumps(info))
"""


# ---------------------------------------------------------------------------------------------
# The report


def _tests_section(work: Path) -> list[str]:
    path = work / "tests.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = ["## CUDA parity", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    by_case: dict[str, list[int]] = {}
    for r in rows:
        kernel = r["nodeid"].split("::")[0].rsplit("/", 1)[-1].removeprefix("test_").removesuffix(".py")
        case = next((c for c in r["nodeid"].split("[")[-1].rstrip("]").split("-") if c in ("torch", "triton", "flash")), "-")
        dtype = next((d for d in ("fp32", "bf16", "fp16") if d in r["nodeid"]), "-")
        ok = by_case.setdefault(f"| {kernel} | {case} | {dtype} |", [0, 0])
        ok[0 if r["outcome"] == "passed" else 1] += r["outcome"] != "skipped"
    lines += ["", "| kernel | path | dtype | passed | failed |", "|---|---|---|---|---|"]
    lines += [f"{key} {p} | {f} |" for key, (p, f) in sorted(by_case.items())]
    failed = [r for r in rows if r["outcome"] == "failed"]
    for r in failed[:15]:
        lines.append(f"\nFAILED {r['nodeid']}\n```\n{r.get('message', '')[-600:]}\n```")
    return lines + [""]


def _train_section(work: Path, run_name: str = "train-run", stage: str = "train") -> list[str]:
    path = work / run_name / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    first = next((r for r in rows if "first_step_s" in r), {})
    rates = sorted(r["tokens_per_s"] for r in losses[1:]) or [r["tokens_per_s"] for r in losses]
    compiled = "true" if stage == "compile" else "false"
    lines = [f"## Main job on CUDA (`deepspeed training/train.py --system.precision bf16 --system.compile {compiled}`, "
             "embedded example)", ""]
    if losses:
        lines.append(f"- steps logged: {losses[-1]['step']}; training loss {losses[0]['loss']:.3f} (first window) -> "
                     f"{losses[-1]['loss']:.3f} (last)")  # fmt: skip
    if evals:
        lines.append("- held-out loss: " + ", ".join(f"{v:.3f} (step {s})" for s, v in evals))
    if rates:
        lines.append(f"- target tokens/s: {rates[len(rates) // 2]:,.0f} (median of the logged windows after the first)")
    if first:
        mem = f", peak memory {first['peak_memory_gib']} GiB" if "peak_memory_gib" in first else ""
        lines.append(f"- first optimizer step done {first['first_step_s']} s after train.py started (kernel compilation included){mem}")
    log = work / f"{stage}.log"
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.startswith(("kernels:", "done:", "system.compile:")) or "error" in line.lower()[:20]:
                lines.append(f"- `{line.strip()[:200]}`")
    return lines + [""]


def render(work: Path, stages: list[dict], setup_info: dict) -> str:
    from bench.report import dispatch_proposals, format_table, load

    lines = ["# CUDA suite report", ""]
    lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in setup_info.items() if k != "error"))
    if "error" in setup_info:
        lines.append(f"setup failed: {setup_info['error']}")
    lines += ["", "| stage | status | wall s | limit s | compiling s (compilations) | what |", "|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s['limit']} | "
                     f"{s.get('compile_s', '')} ({s.get('compiles', '')}) | {s['what']} |")  # fmt: skip
    lines += [""] + _tests_section(work) + _train_section(work)
    lines += _train_section(work, "train-run-compiled", "compile")
    merged, skipped, _ = load(sorted(str(p) for p in work.glob("bench-*.jsonl")))
    if merged["benchmarks"] or skipped:
        lines += ["## Benchmarks (CUDA, --bench-size full)", "", format_table(merged), ""]
        if skipped:
            lines += ["skipped:"] + [f"- {s['name']}: {s['skipped']}" for s in skipped] + [""]
        proposals = dispatch_proposals(merged["benchmarks"])
        if proposals:
            lines += ["## auto dispatch on CUDA, as these measurements set it", "", "```", *proposals, "```", ""]
    for name, title in (("warmup.json", "Warm-up"), ("profile.md", "Profile"), ("zero/results.json", "ZeRO probe")):
        path = work / name
        if not path.is_file():
            continue
        lines += [f"## {title}", ""]
        if name == "warmup.json":
            w = json.loads(path.read_text())
            secs = [v.get("seconds", 0) for v in w["variants"]]
            lines.append(f"{len(secs)} variants in {w['wall_seconds']} s wall ({sum(secs):.1f} s of compiling, longest {max(secs, default=0):.1f} s)")
        elif name == "profile.md":
            lines.append(path.read_text())
        else:
            lines += ["```", *(json.dumps({k: v for k, v in r.items() if k != "log_tail"}) for r in json.loads(path.read_text())), "```"]
        lines.append("")
    return "\n".join(lines)


def publish(work: Path, out: Path | None, text: str) -> None:
    """report.md into the work directory and, with $OUT, report.md + suite.tar.gz there (logs,
    results; no datasets, checkpoints or models), each replaced atomically."""
    targets = [work] + ([out] if out else [])
    for folder in targets:
        tmp = folder / "report.md.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, folder / "report.md")
    if out:
        tmp = out / "suite.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                rel = path.relative_to(work)
                if path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".md") and rel.parts[0] not in ("example-data",) \
                        and "checkpoints" not in rel.parts and "final" not in rel.parts and path.stat().st_size < 4 << 20:
                    tar.add(path, arcname=str(rel))
        os.replace(tmp, out / "suite.tar.gz")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated stages: {', '.join(STAGE_NAMES)} (flce, attention, projection "
                                  "also run their parity tests; sweep, zero and compile run only when named)")  # fmt: skip
    p.add_argument("--full", action="store_true", help="the whole parity matrix instead of the smoke subset (no 6-minute target)")
    p.add_argument("--work", default=os.environ.get("SONARLLM_SUITE_DIR", "/tmp/sonarllm-gpu"), help="work directory")
    p.add_argument("--deadline", type=int, default=None, help=f"seconds for everything (default {DEADLINE_S}; --full: the sum of the limits)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = only - set(STAGE_NAMES)
        if unknown:
            p.error(f"--only: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGE_NAMES)}")
    work = Path(args.work).resolve()
    stages = plan(only, args.full, work)
    opt_in = only is not None and bool(only & {"sweep", "zero", "compile"})
    deadline_s = args.deadline or (sum(s.limit for s in stages) + 30 if args.full or opt_in else DEADLINE_S)
    if args.dry_run:
        print(f"deadline {deadline_s} s; setup first (wheels from .whl/, versions, bf16 matmul rate)")
        for s in stages:
            print(f"{s.name:<11} {s.limit:>4} s  {s.what}")
            for cmd in s.commands:
                print("             $ " + " ".join(cmd))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_suite: error: no CUDA device here (torch {torch.__version__} sees none); this suite measures the "
              "CUDA side. On a CPU run `pytest bench --benchmark` and `pytest tests`; `python -m training.warmup "
              "--target sm_90` compiles the GPU kernels without a GPU. Plan: python -m bench.gpu_suite --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    clear_previous(work, stages)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
               PYTHONUNBUFFERED="1")  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    setup_info = setup(work, env)
    records = [{"name": "setup", "status": "ok" if "error" not in setup_info else "failed", "limit": 15,
                "seconds": round(time.monotonic() - start, 1), "what": "wheels, versions, bf16 matmul rate"}]  # fmt: skip
    publish(work, out, render(work, records, setup_info))
    background = None
    if any(s.name in EXAMPLE_STAGES for s in stages):  # the example's data, prepared while other stages run
        with open(work / "prepare.log", "w") as log:
            background = subprocess.Popen(prepare_example_command(work), cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    status = execute(stages, records, work, env, out, start + deadline_s, setup_info, background)
    text = render(work, records, setup_info)
    publish(work, out, text)
    print(text)
    print(f"\ntotal {time.monotonic() - start:.0f} s (deadline {deadline_s} s); work directory {work}")
    return status


def clear_previous(work: Path, stages: list[Stage]) -> None:
    """Remove what an earlier run of these stages left in the work directory (results are
    appended as they come; the example run refuses a directory with checkpoints). The prepared
    example data stays: preparation reuses it."""
    names = [s.name for s in stages]
    doomed = [work / f"{n}.log" for n in names + ["setup", "prepare"]] + [work / f"compile-{n}.jsonl" for n in names]
    doomed += [work / f"bench-{n}.jsonl" for n in names] + [work / "stages.json", work / "report.md"]
    doomed += [work / f for n, f in (("tests", "tests.jsonl"), ("warmup", "warmup.json"), ("profile", "profile.md"),
                                     ("sweep", "sweep_flce.json"), ("sweep", "sweep_tiles.json")) if n in names]
    for path in doomed:
        path.unlink(missing_ok=True)
    for n, folder in (("train", "train-run"), ("compile", "train-run-compiled"), ("zero", "zero")):
        if n in names:
            shutil.rmtree(work / folder, ignore_errors=True)


def execute(stages: list[Stage], records: list[dict], work: Path, env: dict, out: Path | None, deadline: float,
            setup_info: dict, background: subprocess.Popen | None = None) -> int:  # fmt: skip
    """Run the stages in order, each under min(its limit, the time left before ``deadline``, a
    time.monotonic() value), appending one record per stage to ``records`` and publishing the
    report after each. Returns 0 when every stage ended well, else 1."""
    status = 0
    for stage in stages:
        left = deadline - time.monotonic()
        record = {"name": stage.name, "limit": stage.limit, "what": stage.what}
        if left < 10:
            records.append(record | {"status": "skipped (deadline)"})
            status = 1
            continue
        stage_env = dict(env, SONARLLM_COMPILE_LOG=str(work / f"compile-{stage.name}.jsonl"))
        budget, code = min(stage.limit, left), 0
        tic = time.monotonic()
        if stage.name in EXAMPLE_STAGES and background is not None:  # its data preparation first
            try:
                background.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                _stop(background)
        for cmd in stage.commands:
            code, _ = _run(cmd, work / f"{stage.name}.log", stage_env, budget - (time.monotonic() - tic))
            if code != 0:
                break
        spent = time.monotonic() - tic
        comp, n = compile_seconds(work / f"compile-{stage.name}.jsonl")
        outcome = "ok" if code == 0 else ("time limit" if code is None else f"exit {code}")
        records.append(record | {"status": outcome, "seconds": round(spent, 1), "compile_s": comp, "compiles": n})
        status = status or int(code != 0)
        tmp = work / "stages.json.tmp"
        tmp.write_text(json.dumps({"setup": setup_info, "stages": records}, indent=1))
        os.replace(tmp, work / "stages.json")
        publish(work, out, render(work, records, setup_info))
        print(f"{stage.name}: {outcome} in {spent:.0f} s ({comp} s compiling)", flush=True)
    if background is not None and background.poll() is None:
        _stop(background)
    return status


if __name__ == "__main__":
    sys.exit(main())
