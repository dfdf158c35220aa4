"""The kernel launches of a SONAR-LLM training run, for ``python -m sonarllm_kernels.warmup``.

:func:`training_workload` is what sonarllm_kernels.warmup records and compiles ahead of a run; it lives
here because the ``sonarllm_kernels`` package never imports ``sonarllm``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


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
