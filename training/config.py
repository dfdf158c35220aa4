"""Training configuration: sectioned dataclasses, a TOML file, and ``--section.key value`` overrides.

    deepspeed training/train.py                                   # the embedded example (defaults)
    deepspeed training/train.py --config training/configs/example.toml --optim.lr 3e-4 --system.zero_stage 3

Every value is validated at start-up; a bad one fails with a message naming its key. The
resolved configuration is written to the run directory (``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OVERRIDES = "model.overrides"
SEED_LIMIT = 2**63
"""run.seed is in [0, SEED_LIMIT): a non-negative 64-bit integer, which torch's generators take."""
MODEL_KEYS = {"objective": "model.objective", "kernel_impl": "model.kernel_impl"}
"""SonarLLMConfig fields the trainer sets from these keys, not from model.overrides."""
EXAMPLE_CORPUS = str(Path(__file__).resolve().parent / "example" / "stories.jsonl.gz")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


@dataclass
class RunConfig:
    output_dir: str = "runs/example"
    """Run directory: checkpoints, metrics.jsonl, loss.png, the exported model (``final/``)."""
    seed: int = 0
    resume: str = "auto"
    """"auto": continue from the newest complete checkpoint in output_dir if there is one;
    "never": start fresh (refuses a directory that already holds checkpoints); or a checkpoint path."""
    resume_universal: bool = True
    """Resume a checkpoint written by another number of processes or ZeRO stage (1-3) through
    DeepSpeed's universal checkpoint conversion, kept in its ``universal/`` folder (one line says
    so); false refuses it."""
    stop_after: int = 0
    """Stop after this many steps of this invocation, with a checkpoint (for time-limited jobs;
    the next invocation resumes). 0 runs to loop.max_steps."""


@dataclass
class DataConfig:
    prepared_dir: str = "data/example"
    """Prepared shards (training/prepare_data.py). Prepared from ``source`` first when incomplete;
    a complete preparation is used as it is: the data options below that the config file or the
    command line set must agree with its manifest (defaults are not compared, nor used)."""
    source: str = ""
    """The corpus; empty means the embedded example stories."""
    sonar: str = "toy"
    """SONAR for preparation: "toy", "basic" (the released files) or a path to a sonar.json."""
    lang: str = "eng_Latn"
    max_sentences: int = 32
    eval_documents: int = 100
    duplicate_eos: bool = True
    """Labels [lang, tokens, </s>, </s>] as the paper's code (True) or without the extra </s>."""
    verify_checksums: bool = True
    """Check every shard's SHA-256 against the prepared manifest at start-up."""
    verify_sonar: bool = True
    """Check the SONAR tokenizer, encoder and decoder files against the SHA-256 the prepared
    manifest recorded, at start-up and on resume (false: use changed SONAR files anyway)."""


@dataclass
class ModelConfig:
    preset: str = "toy"
    """A SonarLLMConfig preset: toy, 39M, 100M, 300M, 600M, 900M, 1.3B."""
    overrides: dict = field(default_factory=dict)
    """SonarLLMConfig fields to change, e.g. {"num_layers": 4}; on the command line either
    ``--model.overrides '{"num_layers": 4}'`` or one field at a time, ``--model.overrides.num_layers 4``."""
    objective: str = "sonar"
    """"sonar" (token cross-entropy through the frozen decoder), "mse" (the LCM baseline) or
    "sonar+mse" (the token cross-entropy plus mse_weight x the MSE: LCM's decoder backprop)."""
    mse_weight: float = 1.0
    """Weight of the MSE term of objective "sonar+mse" (unused by the others)."""
    normalizer: str = ""
    """A SONAR normalizer file (LCM's format or a bare center/scale state dict, docs/lcm.md) to use
    instead of fitting one on the training data; implies a normalizer (use_normalizer). Its width
    must be the model's sonar_dim; clipping bounds are refused (the fused projections do not clip).
    Read at the start of a fresh run only: a resumed run keeps the checkpoint's normalizer."""
    kernel_impl: str = "auto"
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-5
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at max_steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""


@dataclass
class LoopConfig:
    max_steps: int = 1000
    micro_batch_documents: int = 8
    """Documents per micro-batch and process."""
    grad_accum_steps: int = 2
    eval_every: int = 250
    eval_max_documents: int = 100
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class SystemConfig:
    precision: str = "fp32"
    """fp32, bf16 or fp16 (the concept transformer's DeepSpeed precision; the frozen SONAR decoder
    runs in the same dtype)."""
    zero_stage: int = 2
    deepspeed_config: str = ""
    """A DeepSpeed JSON with ZeRO settings (default: training/configs/zero{zero_stage}.json);
    batch sizes, precision and clipping are always filled in from this configuration."""
    device: str = "auto"
    progress: bool = True
    compile: str = "auto"
    """torch.compile the concept transformer and the SONAR token loss (training/compile.py): true,
    false, or auto (true on CUDA; false on CPU, where it showed no consistent gain: bench/RESULTS.md)."""


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set(cfg: TrainConfig, key: str, value, *, from_text: bool) -> None:
    if key.startswith(OVERRIDES + "."):  # one field of model.overrides: --model.overrides.sonar_dim 32
        field_name = key[len(OVERRIDES) + 1 :]
        if from_text:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a bare string
        cfg.model.overrides = {**cfg.model.overrides, field_name: value}
        return
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in fields(TrainConfig)} else None
    if section is None or not name or name not in {f.name for f in fields(section)}:
        raise ConfigError(f"unknown configuration key {key!r}; known keys: {', '.join(known_keys())}")
    current = getattr(section, name)
    if from_text:
        value = _parse(key, value, type(current))
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, str) and isinstance(value, bool):  # a switch with an "auto" default
        value = "true" if value else "false"
    if type(value) is not type(current):
        raise ConfigError(f"{key} must be {_kind(type(current))}, got {value!r}")
    setattr(section, name, value)


def _parse(key: str, text: str, kind: type):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key} must be {_kind(kind)}, got {text!r}") from None


def _kind(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}[kind]


def known_keys() -> list[str]:
    cfg = TrainConfig()
    keys = [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]
    return keys + [OVERRIDES + ".<field>"]


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file's values, then the command-line overrides; validated."""
    cfg = TrainConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        for section, entries in values.items():
            if not isinstance(entries, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for name, value in entries.items():
                _set(cfg, f"{section}.{name}", value, from_text=False)
    for key, text in (overrides or {}).items():
        _set(cfg, key, text, from_text=True)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first invalid value."""
    from sonarllm.config import SONARLLM_CONFIGS

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{key} {what}, got {_get(cfg, key)!r}")

    for section in fields(cfg):  # inf or nan is never a usable setting
        for f in fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            need(not isinstance(_get(cfg, key), float) or math.isfinite(_get(cfg, key)), key, "must be a finite number")
    need(cfg.run.resume in ("auto", "never") or os.path.exists(cfg.run.resume), "run.resume",
         "must be 'auto', 'never' or an existing checkpoint directory")  # fmt: skip
    need(0 <= cfg.run.seed < SEED_LIMIT, "run.seed", f"must be in [0, 2**63 - 1] (at most {SEED_LIMIT - 1})")
    need(bool(cfg.run.output_dir), "run.output_dir", "must not be empty")
    _check_no_broken_link(cfg.run.output_dir)
    need(not os.path.exists(cfg.run.output_dir) or os.path.isdir(cfg.run.output_dir), "run.output_dir",
         "must be a directory (or a path to create), but it is a file")  # fmt: skip
    need(cfg.run.stop_after >= 0, "run.stop_after", "must be >= 0")
    need(cfg.data.max_sentences >= 1, "data.max_sentences", "must be >= 1")
    need(not cfg.data.source or os.path.exists(cfg.data.source), "data.source", "must be an existing file or directory")
    need(cfg.data.sonar in ("toy", "basic") or os.path.isfile(cfg.data.sonar), "data.sonar",
         "must be 'toy', 'basic' or the path of a sonar.json")  # fmt: skip
    from sonarllm.sonar.langs import NLLB_LANGS

    need(cfg.data.lang in NLLB_LANGS, "data.lang", "must be a SONAR language code such as eng_Latn")
    need(cfg.data.eval_documents >= 1, "data.eval_documents", "must be >= 1")
    need(cfg.model.preset in SONARLLM_CONFIGS, "model.preset", f"must be one of {sorted(SONARLLM_CONFIGS)}")
    need(cfg.model.objective in ("sonar", "mse", "sonar+mse"), "model.objective", "must be 'sonar', 'mse' or 'sonar+mse'")
    need(0 <= cfg.model.mse_weight < float("inf"), "model.mse_weight", "must be a finite number >= 0")
    need(not cfg.model.normalizer or os.path.isfile(cfg.model.normalizer), "model.normalizer",
         "must be empty or the path of a normalizer file")  # fmt: skip
    need(not cfg.model.normalizer or cfg.model.overrides.get("use_normalizer", True) is not False, "model.normalizer",
         "is set but model.overrides.use_normalizer is false; drop one of them")  # fmt: skip
    need(cfg.model.kernel_impl in ("auto", "triton", "torch", "reference"), "model.kernel_impl",
         "must be auto, triton, torch or reference")  # fmt: skip
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= cfg.optim.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    need(0 <= cfg.optim.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    need(cfg.optim.eps > 0, "optim.eps", "must be > 0")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    for name in ("max_steps", "micro_batch_documents", "grad_accum_steps", "eval_every", "eval_max_documents",
                 "checkpoint_every", "keep_checkpoints", "log_every"):  # fmt: skip
        need(getattr(cfg.loop, name) >= 1, f"loop.{name}", "must be >= 1")
    need(cfg.system.precision in ("fp32", "bf16", "fp16"), "system.precision", "must be fp32, bf16 or fp16")
    need(cfg.system.zero_stage in (0, 1, 2, 3), "system.zero_stage", "must be 0, 1, 2 or 3")
    need(not cfg.system.deepspeed_config or os.path.isfile(cfg.system.deepspeed_config), "system.deepspeed_config",
         "must name an existing file")  # fmt: skip
    if cfg.system.deepspeed_config:
        from training.engine import load_ds_template

        load_ds_template(cfg)  # its shape, at start-up (DeepSpeed reads it only after preparation)
    need(cfg.system.device in ("auto", "cpu", "cuda"), "system.device", "must be auto, cpu or cuda")
    need(cfg.system.compile in ("auto", "true", "false"), "system.compile", "must be true, false or auto")
    for name, key in MODEL_KEYS.items():
        if name in cfg.model.overrides:
            raise ConfigError(f"model.overrides.{name} is not used: the trainer sets it from {key}; set {key} instead")
    try:
        from sonarllm.config import SonarLLMConfig

        mcfg = SonarLLMConfig.from_name(cfg.model.preset, **cfg.model.overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides {cfg.model.overrides!r} are invalid: {exc}") from exc
    need(cfg.data.max_sentences + 1 <= mcfg.max_seq_len, "data.max_sentences",
         f"plus the end sentence must fit the model's max_seq_len ({mcfg.max_seq_len})")  # fmt: skip


def _check_no_broken_link(path: str) -> None:
    """Refuse a run.output_dir that is, or lies under, a symbolic link to nowhere (a missing
    target, or a loop of links), naming the link, instead of mkdir's "File exists"."""
    for link in (Path(path), *Path(path).parents):
        if not os.path.islink(link) or os.path.exists(link):
            continue
        try:
            os.stat(link)
        except OSError as exc:
            import errno

            if exc.errno == errno.ELOOP:
                raise ConfigError(f"run.output_dir {path}: {link} is a symbolic link in a loop of links; "
                                  "remove it or choose another run.output_dir") from None  # fmt: skip
        raise ConfigError(f"run.output_dir {path}: {link} is a symbolic link to {os.readlink(link)}, which does not "
                          "exist; create its target, remove the link, or choose another run.output_dir")  # fmt: skip


def _get(cfg: TrainConfig, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--config FILE`` and ``--section.key value`` (or ``=value``) pairs; ``--local_rank`` (added
    by the DeepSpeed launcher) is accepted and ignored."""
    config, overrides = None, {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"{arg} needs a value")
            value = args.pop(0)
        if key in ("local_rank", "local-rank"):
            continue
        if key == "config":
            config = value
        elif key == "deepspeed_config":
            overrides["system.deepspeed_config"] = value
        else:
            overrides[key.replace("-", "_")] = value
    return config, overrides
