"""Compile, ahead of a run, the Triton kernels a SONAR-LLM training run launches.

:func:`training_workload` is the workload that ``sonarllm_kernels.warmup`` (the recording and
compiling machinery) records and compiles: a synthetic SONAR-LLM training step at a run's shapes
(concept transformer forward + backward, frozen SONAR decoder, fused cross-entropy), a second step
at a small odd-sized batch, and an evaluation forward, i.e. the launches of a whole run, since
batch sizes and token counts are runtime ints of the kernels (not specialised). It lives in
``training/`` because the kernels package never imports ``sonarllm``. The command:

    python -m training.warmup --config training/configs/example.toml --system.precision bf16
    python -m training.warmup --preset 300M --decoder basic --dtype bf16 [--jobs 16]
    python -m training.warmup --preset 300M --decoder basic --target sm_90 --report r.json   # no GPU:
        # count the variants and time their sm_90 compilation (with ptxas -v registers/spills)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages, not training/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def training_workload(model_cfg, decoder_cfg, dtype, device, *, documents: int = 8, sentences: int = 32,
                      seed: int = 0) -> Callable[[], None]:  # fmt: skip
    """One synthetic training run's launches: a step of ``documents`` documents of ``sentences``
    sentences (+ the end-of-text sentence), a step of 3 short documents of odd sizes, and an
    evaluation forward. Objective "sonar": through a random frozen SONAR decoder of
    ``decoder_cfg`` with the fused cross-entropy; "mse": the MSE head. Random weights and one
    layer of each model: the variants depend on shapes, dtypes and options only, and every
    layer launches the same ones."""
    import dataclasses

    import torch

    from sonarllm.loss import SonarTargets, SonarTokenLoss
    from sonarllm.model import SonarLLM
    from sonarllm.mse_loss import NextSentenceMSELoss
    from sonarllm.sonar import SonarDecoder

    device = torch.device(device)

    def run() -> None:
        torch.manual_seed(seed)
        model = SonarLLM(model_cfg.replace(num_layers=1)).to(device, dtype)
        mse = model_cfg.objective == "mse"
        loss_fn = NextSentenceMSELoss.for_model(model) if mse else None
        if not mse:
            one_layer = dataclasses.replace(decoder_cfg, num_layers=1)
            decoder = SonarDecoder(one_layer, kernel_impl=model_cfg.kernel_impl).to(device, dtype)
            loss_fn = SonarTokenLoss(decoder, kernel_impl=model_cfg.kernel_impl)
        g = torch.Generator().manual_seed(seed)
        for docs, sents, grad in ((documents, sentences + 1, True), (3, 5, True), (documents, sentences + 1, False)):
            lens = [sents - d % 3 if sents > 3 else sents for d in range(docs)]  # odd and even lengths
            starts = [sum(lens[:d]) for d in range(docs + 1)]
            cu = torch.tensor(starts, dtype=torch.int32, device=device)
            embeds = torch.randn(sum(lens), model_cfg.sonar_dim, generator=g).to(device, dtype)
            pred_index = torch.tensor([starts[d] + k for d in range(docs) for k in range(lens[d] - 1)], device=device)
            with torch.set_grad_enabled(grad):
                pred = model(embeds, cu_seqlens=cu, max_seqlen=max(lens))[pred_index]
                if mse:
                    loss = loss_fn(pred, embeds[pred_index + 1], num_items=len(pred_index))
                else:
                    n = len(pred_index)
                    width = torch.randint(2, min(60, decoder_cfg.max_seq_len) - 2, (n,), generator=g).tolist()
                    seqs = [[3, 5] + torch.randint(4, decoder_cfg.vocab_size, (w,), generator=g).tolist() + [3]
                            for w in width]  # fmt: skip
                    targets = SonarTargets.from_target_sequences(seqs, 3, device=device)
                    loss = loss_fn(pred, targets, num_items=targets.num_tokens)
            if grad:
                loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def workload_from_args(args, device):
    import torch

    from sonarllm.config import SonarLLMConfig
    from sonarllm.sonar.config import sonar_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.config is not None:
        from training.config import load_config

        cfg = load_config(args.config, args.overrides)
        mcfg = SonarLLMConfig.from_name(cfg.model.preset, **cfg.model.overrides)
        mcfg = mcfg.replace(objective=cfg.model.objective, kernel_impl=cfg.model.kernel_impl)
        dcfg = _decoder_config(cfg.data.prepared_dir, cfg.data.sonar)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.system.precision]
        docs, sents = cfg.loop.micro_batch_documents, cfg.data.max_sentences
    else:
        dcfg = sonar_config(args.decoder)
        mcfg = SonarLLMConfig.from_name(args.preset, sonar_dim=dcfg.model_dim)
        docs, sents = args.documents, args.sentences
    return training_workload(mcfg, dcfg, dtype, device, documents=docs, sentences=sents), mcfg, dcfg, dtype


def _decoder_config(prepared_dir: str, sonar: str):
    """The SONAR decoder config of a prepared dataset (exact vocabulary), else of ``sonar``
    ("toy": the toy SONAR at the preparation's default 1,000-piece vocabulary)."""
    import dataclasses

    from sonarllm.sonar.config import sonar_config

    spec_path = Path(prepared_dir) / "sonar.json"
    if spec_path.is_file():
        from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec

        return SonarPipeline.from_spec(SonarSpec.load(spec_path), encoder=False).decoder.config
    if sonar == "toy":
        return dataclasses.replace(sonar_config("toy"), vocab_size=1000)
    if sonar == "basic":
        return sonar_config("basic")
    from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec

    return SonarPipeline.from_spec(SonarSpec.load(sonar), encoder=False).decoder.config


def warm_up_run(model_cfg, decoder_cfg, dtype, device, *, documents: int, sentences: int, local_rank: int) -> dict | None:
    """Compile the Triton kernels a training run launches, in parallel processes, before its first
    step (CUDA only; one process per node does it, into the node's Triton cache, while the other
    ranks wait). SONARLLM_WARMUP=0 turns it off. Returns sonarllm_kernels.warmup.warm_up's summary on the
    process that compiled, else None."""
    import os

    import torch
    import torch.distributed as dist

    from sonarllm_kernels._dispatch import is_interpreter, triton_available

    if device.type != "cuda" or os.environ.get("SONARLLM_WARMUP", "1") == "0" or not triton_available() or is_interpreter():
        return None
    summary = None
    if local_rank == 0:
        from sonarllm_kernels.warmup import warm_up

        summary = warm_up(training_workload(model_cfg, decoder_cfg, dtype, device, documents=documents, sentences=sentences))
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.warmup", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a training TOML (then --section.key value overrides follow, as for train.py)")
    p.add_argument("--preset", default="300M", help="concept-model preset (without --config)")
    p.add_argument("--decoder", default="basic", help="SONAR decoder: 'basic' or 'toy' (without --config)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--documents", type=int, default=8, help="documents per micro-batch")
    p.add_argument("--sentences", type=int, default=32, help="sentences per document")
    p.add_argument("--target", help="compile for this GPU without one, e.g. sm_90 (default: this machine's GPU)")
    p.add_argument("--jobs", type=int, default=None, help="compiling processes (default: one per CPU core)")
    p.add_argument("--usage", action="store_true", help="also report ptxas -v registers and spills per variant")
    p.add_argument("--report", help="write the per-variant records as JSON here")
    args, rest = p.parse_known_args(argv)
    args.overrides = []
    if rest:
        if args.config is None:
            p.error(f"unrecognised arguments: {' '.join(rest)} (--section.key overrides need --config)")
        from training.config import ConfigError, parse_cli

        try:
            _, args.overrides = parse_cli(["--config", args.config, *rest])
        except ConfigError as exc:
            p.error(str(exc))
    from sonarllm_kernels.warmup import _require_compiled_triton, compile_variants, parse_target, record_variants

    try:
        _require_compiled_triton()
    except RuntimeError as exc:
        print(f"warmup: error: {exc}", file=sys.stderr)
        return 1
    if args.target is not None:
        try:
            parse_target(args.target)
        except ValueError as exc:
            print(f"warmup: error: --target: {exc}", file=sys.stderr)
            return 2
    import torch

    if args.target is None and not torch.cuda.is_available():
        print("warmup: error: no CUDA device here; pass --target sm_90 to compile for one without it", file=sys.stderr)
        return 2
    device = "cpu" if args.target else "cuda"
    try:
        workload, mcfg, dcfg, dtype = workload_from_args(args, device)
    except (ValueError, KeyError, OSError) as exc:
        print(f"warmup: error: {exc}", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    variants = record_variants(workload, args.target)
    recorded = time.perf_counter() - tic
    records = compile_variants(variants, target=args.target, jobs=args.jobs, usage=args.usage)
    wall = time.perf_counter() - tic
    total = sum(r.get("seconds", 0.0) for r in records)
    errors = [r for r in records if "error" in r]
    print(f"warmup: {len(variants)} variants ({mcfg.model_dim}-d concept model, {dcfg.model_dim}-d x "
          f"{dcfg.num_layers} decoder, V {dcfg.vocab_size}, {str(dtype).split('.')[-1]}): recorded in "
          f"{recorded:.1f} s, compiled in {wall - recorded:.1f} s wall ({total:.1f} s in compile calls)"
          + (f"; {len(errors)} failed" if errors else ""))  # fmt: skip
    if args.report:
        report = {"target": args.target, "jobs": args.jobs, "wall_seconds": round(wall, 2),
                  "record_seconds": round(recorded, 2), "variants": records,
                  "specializations": [asdict(v) for v in variants]}  # fmt: skip
        tmp = Path(args.report + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, args.report)
    for r in errors:
        print(f"  {r['label']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
