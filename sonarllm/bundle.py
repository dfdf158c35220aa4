"""A trained SONAR-LLM ready for generation and evaluation: the concept transformer plus a
description of its SONAR space, in one directory.

    <dir>/config.json, <dir>/model.safetensors   the SonarLLM (SonarLLM.save_pretrained)
    <dir>/sonar.json                             the SonarSpec (tokenizer, encoder, decoder, lang)
    <dir>/sonar/                                 copies of small local SONAR files (the toy SONAR)

SONAR files larger than ``COPY_LIMIT`` (the real 3 GB checkpoints) are referenced by absolute
path or asset name instead of copied.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sonarllm.model import SonarLLM
from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec

COPY_LIMIT = 100 * 2**20
SPEC_NAME = "sonar.json"


@dataclass
class Bundle:
    model: SonarLLM
    pipeline: SonarPipeline
    spec: SonarSpec


def save_bundle(directory: str | os.PathLike, model: SonarLLM, spec: SonarSpec) -> Path:
    """Write ``model`` and ``spec`` (copying small local SONAR files) into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory)
    files = {}
    for field in ("tokenizer", "encoder", "decoder"):
        value = getattr(spec, field)
        if value is not None and os.path.isfile(value) and os.path.getsize(value) <= COPY_LIMIT:
            target = directory / "sonar" / f"{field}-{Path(value).name}"  # unique per field
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(value).resolve() != target.resolve():
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(value, tmp)
                os.replace(tmp, target)
            value = f"sonar/{target.name}"
        elif value is not None and os.path.exists(value):
            value = str(Path(value).resolve())
        files[field] = value
    dataclasses.replace(spec, **files).save(directory / SPEC_NAME)  # configs and lang kept
    return directory


def load_bundle(directory: str | os.PathLike, *, device=None, dtype=None, kernel_impl: str | None = None,
                encoder: bool = True, decoder: bool = True) -> Bundle:  # fmt: skip
    """Load a bundle; raises FileNotFoundError/ValueError naming what is missing or incompatible."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    overrides = {} if kernel_impl is None else {"kernel_impl": kernel_impl}
    model = SonarLLM.from_pretrained(directory, device=device, dtype=dtype, **overrides)
    spec = SonarSpec.load(directory / SPEC_NAME)
    pipeline = SonarPipeline.from_spec(spec, encoder=encoder, decoder=decoder, device=device,
                                       kernel_impl=kernel_impl or "auto")  # fmt: skip
    for name, part in (("encoder", pipeline.encoder), ("decoder", pipeline.decoder)):
        if part is not None and part.config.model_dim != model.config.sonar_dim:
            raise ValueError(
                f"incompatible checkpoint: the model works in {model.config.sonar_dim}-d SONAR space but the "
                f"SONAR {name} in {directory / SPEC_NAME} is {part.config.model_dim}-d"
            )
    return Bundle(model, pipeline, spec)
