"""``sonarllm convert --official PATH --out DIR``: the paper's released checkpoints as one of our
model directories, written in a staging directory and renamed into place; ``--out`` must be new,
empty or an earlier conversion (never lose a user's files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sonarllm.cli.args import UsageError

CONVERTED_MARK = "converted.json"
CONVERT_OUTPUTS = {"bundle.json", "config.json", "model.safetensors", "sonar.json", "sonar", CONVERTED_MARK}  # save_bundle + the mark


def _check_convert_out(out: Path) -> None:
    """--out must be new, empty, or an earlier conversion holding nothing else (never lose files)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    if entries and (CONVERTED_MARK not in entries or entries - CONVERT_OUTPUTS):
        foreign = sorted(entries - CONVERT_OUTPUTS) if CONVERTED_MARK in entries else sorted(entries)
        raise UsageError(
            f"--out {out} is not empty and not an earlier 'sonarllm convert' output (it holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}); give a new or empty directory"
        )


def _publish_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an earlier conversion at ``out`` is moved aside first and
    deleted only after the new one is in place."""
    import secrets
    import shutil

    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_convert(args) -> int:
    import secrets
    import shutil

    from sonarllm.bundle import save_bundle
    from sonarllm.model import SonarLLM
    from sonarllm.sonar.pipeline import SonarSpec

    official, out = Path(args.official), Path(args.out)
    if official.is_file() and args.config is None:
        raise UsageError(
            f"--official {official} is a release file, which records no configuration: give --config "
            "SonarLLM_{100M,300M,600M,900M}.json (the one it was trained with)"
        )
    if not official.exists():
        raise FileNotFoundError(f"--official {official} not found")
    _check_convert_out(out)
    model = SonarLLM.from_official(official, args.config, trust=args.trust)
    spec = SonarSpec(args.sonar_tokenizer, args.sonar_encoder, args.sonar_decoder, lang=args.lang)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.convert-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        save_bundle(staging, model, spec)
        mark = {"official": str(official.resolve()), "config": None if args.config is None else str(Path(args.config).resolve()),
                "add_begin": model.config.add_begin}  # fmt: skip
        (staging / CONVERTED_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        _publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cfg = model.config
    print(f"converted {official} -> {out}: {cfg.num_layers} layers, model_dim {cfg.model_dim}, "
          f"{model.num_trainable_parameters():,} parameters, add_begin {str(cfg.add_begin).lower()}")  # fmt: skip
    return 0
