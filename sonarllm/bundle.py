"""A trained SONAR-LLM ready for generation and evaluation: the concept transformer plus a
description of its SONAR space, in one directory.

    <dir>/config.json, <dir>/model.safetensors   the SonarLLM (SonarLLM.save_pretrained)
    <dir>/sonar.json                             the SonarSpec (tokenizer, encoder, decoder, lang)
    <dir>/sonar/                                 copies of small local SONAR files (the toy SONAR)
    <dir>/bundle.json                            checksums and the SONAR the model was trained with

SONAR files larger than ``COPY_LIMIT`` (the real 3 GB checkpoints) are referenced by absolute
path or asset name instead of copied. ``bundle.json`` (written last) holds the SHA-256 and size
of every file of the bundle (``files``, as a checkpoint's ``checkpoint.json``) and the identity
of its SONAR (``sonar``: for the tokenizer, encoder and decoder, the file or asset it came from
and its SHA-256), so that loading verifies the model and the SONAR files it uses, referenced
ones included, and refuses a changed or corrupted one (``verify=False`` skips it). Each file is
hashed once per process. A bundle without ``bundle.json`` (written by an older sonarllm) loads
unverified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sonarllm.files import cached_sha256, file_entry, table_problem, write_json_atomic
from sonarllm.model import CONFIG_NAME, WEIGHTS_NAME, SonarLLM
from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec

COPY_LIMIT = 100 * 2**20
SPEC_NAME = "sonar.json"
MANIFEST_NAME = "bundle.json"
FORMAT_VERSION = 1
SONAR_FIELDS = ("tokenizer", "encoder", "decoder")


class BundleError(ValueError):
    """A bundle whose files do not match its bundle.json; the message names the file."""


@dataclass
class Bundle:
    model: SonarLLM
    pipeline: SonarPipeline
    spec: SonarSpec


def save_bundle(directory: str | os.PathLike, model: SonarLLM, spec: SonarSpec) -> Path:
    """Write ``model`` and ``spec`` (copying small local SONAR files) into ``directory``, and
    ``bundle.json`` last: the checksums of the bundle's files and its SONAR's identity."""
    directory = Path(directory)
    model.save_pretrained(directory)
    files, identity, copied = {}, {}, []
    for field in SONAR_FIELDS:
        value = getattr(spec, field)
        local = value is not None and os.path.isfile(value)
        identity[field] = {"source": value, "sha256": cached_sha256(value) if local else None}
        if local and os.path.getsize(value) <= COPY_LIMIT:
            target = directory / "sonar" / f"{field}-{Path(value).name}"  # unique per field
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(value).resolve() != target.resolve():
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(value, tmp)
                os.replace(tmp, target)
            value = f"sonar/{target.name}"
            copied.append(value)
        elif value is not None and os.path.exists(value):
            value = str(Path(value).resolve())
        files[field] = value
    dataclasses.replace(spec, **files).save(directory / SPEC_NAME)  # configs and lang kept
    names = [CONFIG_NAME, WEIGHTS_NAME, SPEC_NAME, *copied]
    manifest = {"format_version": FORMAT_VERSION, "files": {name: file_entry(directory / name) for name in names},
                "sonar": identity}  # fmt: skip
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return directory


def verify_bundle(directory: str | os.PathLike, fields=SONAR_FIELDS) -> bool:
    """Check a bundle's files and the SONAR files its sonar.json names (of ``fields``: those
    used; copies inside the bundle are always checked) against its bundle.json (sizes, then
    SHA-256, each file hashed once per process); False when there is no bundle.json
    (an older sonarllm's bundle: nothing to check against). Raises BundleError naming the first
    file that does not match, with the remedy."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
        files, identity = manifest["files"], manifest["sonar"]
        problem = table_problem(directory, files)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is unreadable or damaged ({type(exc).__name__}: {exc}); export the model again "
                          "(re-run the training command of its run: it exports final/ again from the last checkpoint)"
                          ) from None  # fmt: skip
    override = "or load it unverified with --no-verify"
    if problem:
        raise BundleError(f"{directory}: {problem} against {MANIFEST_NAME} (the file changed or is corrupted since the "
                          "model was exported); export it again (re-run the training command of its run: it exports "
                          f"final/ again from the last checkpoint), {override}")  # fmt: skip
    spec = SonarSpec.load(directory / SPEC_NAME)
    for field in fields:  # the referenced (not copied) SONAR files: the bundle's copies were checked above
        want, value = (identity.get(field) or {}).get("sha256"), getattr(spec, field)
        if want is None or value is None or not os.path.isfile(value) or Path(value).is_relative_to(directory.resolve()):
            continue
        if cached_sha256(value) != want:
            raise BundleError(f"SONAR {field} {value} (named in {directory / SPEC_NAME}) is not the file the model was "
                              f"trained with (its SHA-256 differs from the one in {path}); put the original back, "
                              f"{override}")  # fmt: skip
    return True


def _check_finite(model: SonarLLM, directory: Path) -> None:
    """A model with NaN or infinite weights predicts nothing usable: name the first such tensor."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(f"{directory} holds non-finite weights (NaN or inf in {bad[0]}{more}); the model is unusable, "
                         "export it again from a checkpoint taken before training diverged")  # fmt: skip


def load_bundle(directory: str | os.PathLike, *, device=None, dtype=None, kernel_impl: str | None = None,
                encoder: bool = True, decoder: bool = True, verify: bool = True) -> Bundle:  # fmt: skip
    """Load a bundle, first verified against its bundle.json (``verify``, see ``verify_bundle``);
    raises FileNotFoundError/ValueError (BundleError) naming what is missing, changed or
    incompatible."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if verify:
        used = ("tokenizer",) + ("encoder",) * encoder + ("decoder",) * decoder
        verify_bundle(directory, fields=used)
    overrides = {} if kernel_impl is None else {"kernel_impl": kernel_impl}
    model = SonarLLM.from_pretrained(directory, device=device, dtype=dtype, **overrides)
    _check_finite(model, directory)
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
