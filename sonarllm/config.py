"""Configuration of the concept transformer (``sonarllm.SonarLLM``) and its named sizes.

One frozen dataclass, ``SonarLLMConfig``, whose fields are documented where they are declared,
and a registry of named flavours, ``SONARLLM_CONFIGS``, read through
``SonarLLMConfig.from_name(name, **overrides)``. The flavours reproduce the backbones of the
SONAR-LLM paper (docs/sonar-llm.md §1.2): HF ``LlamaConfig`` fields, plain multi-head attention
(no GQA), no biases, RMSNorm, SwiGLU, RoPE with theta 500000 and llama3 frequency scaling. The
sizes are named after the equivalent *token* LLM (which would include a 128k-vocabulary
embedding matrix); SONAR-LLM has no token embedding, so its trainable parameter count (core +
the two E <-> D projections) is much smaller:

    name   model_dim  ffn_dim  layers  heads  head_dim  trainable (ours)  paper "trainable"
    toy         64      160       2      4      16        0.10M            (tests only)
    39M        256     1024      10      8      32       11.02M            11M   (ours, see below)
    100M       512     2048       8     16      32       34.61M            34M
    300M      1024     4096      10     16      64      169.89M           170M
    600M      1280     5120      16     26      64      453.55M           450M   (q/k/v width 1664)
    900M      1536     6144      17     32      64      698.41M           700M
    1.3B      2048     8192      16     32      64     1078.01M          1100M   (layout unconfirmed)

* 39M: the paper's configuration is unpublished. 256 / 1024 / 10 layers / 8 heads is OUR choice:
  it is the 100M recipe scaled down and gives 11.0M trainable parameters, the paper's figure.
* 1.3B: only the hidden size 2048 is confirmed (by a third-party loader of the released
  checkpoint); 8192 / 16 layers / 32 heads is UNCONFIRMED, chosen because it reproduces the
  1.34B total and 1.1B trainable parameters (1.078B is 2.0% below the paper's rounded 1.1B).
* 600M and 900M: the q/k/v width num_heads x head_dim (26 x 64 = 1664, 32 x 64 = 2048) is wider
  than model_dim (1280, 1536), as in the reference JSONs (they rely on HF's explicit
  ``head_dim``); hence ``head_dim`` is a field of its own.

``toy`` (sonar_dim 64, matching the toy SONAR decoder of sonarllm/sonar/config.py) is for tests
and the embedded example.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sonarllm_kernels._dispatch import check_impl_name

OBJECTIVES = ("sonar", "mse", "sonar+mse")
ROPE_SCALING_KEYS = (
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def llama3_rope_scaling() -> dict[str, Any]:
    """The llama3 RoPE scaling of every SONAR-LLM backbone (Llama-3.2's values)."""
    return {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SonarLLMConfig:
    """Architecture and objective of one concept transformer (defaults: the 100M flavour)."""

    sonar_dim: int = 1024
    """E: width of the sentence embeddings the model reads and predicts (SONAR: 1024)."""
    model_dim: int = 512
    """D: width of the residual stream (HF ``hidden_size``)."""
    num_layers: int = 8
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads (query = key = value heads: plain multi-head attention, no GQA)."""
    head_dim: int | None = None
    """K: width of one head; None means model_dim // num_heads (resolved in __post_init__).
    num_heads * head_dim may differ from model_dim (the 600M flavour: 26 x 64 = 1664 != 1280).
    Must be even (RoPE rotates pairs of channels)."""
    ffn_dim: int = 2048
    """Hidden width of the SwiGLU feed-forward block (HF ``intermediate_size``)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 500000.0
    """RoPE base wavelength."""
    rope_scaling: dict[str, Any] | None = field(default_factory=llama3_rope_scaling)
    """llama3 frequency scaling (HF ``rope_scaling``): keys ``rope_type`` ("llama3"), ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``. None means
    plain RoPE. It only rescales the low frequencies, which barely rotate over documents of
    <= 33 sentences, but the released checkpoints were trained with it, so it is reproduced
    exactly."""
    max_seq_len: int = 4096
    """Longest document, in sentences (positions), the model accepts; also the largest KV cache."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of the transformer's linear weights (HF
    ``initializer_range``). The E <-> D projections keep PyTorch's nn.Linear initialisation."""
    use_normalizer: bool = False
    """Wrap the model in a SONAR normalizer (LCM): inputs are normalized before the input
    projection and predictions denormalized after the output projection, with per-dimension
    ``center``/``scale`` stored in the checkpoint (set them with ``SonarLLM.set_normalizer``).
    SONAR-LLM itself uses none; the MSE-LCM baseline does."""
    objective: str = "sonar"
    """Training objective, read by the trainer (the network is the same): "sonar" = token
    cross-entropy of the next sentence through the frozen SONAR decoder (sonarllm/loss.py);
    "mse" = the LCM baseline's next-embedding MSE (sonarllm/mse_loss.py); "sonar+mse" = their
    weighted sum (LCM's decoder backprop idea; sonarllm.loss.SonarMSELoss)."""
    kernel_impl: str = "auto"
    """``impl`` passed to every kernel call (attention, projections): "auto", "triton", "torch"
    or "reference" (see sonarllm_kernels/_dispatch.py)."""
    add_begin: bool = False
    """Generation puts the sentence "Begin of text." (``sonarllm.text.BEGIN_SENTENCE``) before
    every prompt, as the paper's ``generate.py --add_begin_text`` and the Hugging Face
    checkpoints' ``add_begin`` do; it is context only (never emitted, not counted in
    ``max_sentences``). Set by ``SonarLLM.from_official`` from the checkpoint's config; the
    trainer does not add the sentence to training documents."""

    def __post_init__(self) -> None:
        for name in ("sonar_dim", "model_dim", "num_layers", "num_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SonarLLMConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.model_dim % self.num_heads:
                raise ValueError(
                    f"SonarLLMConfig.head_dim is None, so model_dim ({self.model_dim}) must be divisible by "
                    f"num_heads ({self.num_heads}); otherwise give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.model_dim // self.num_heads)
        if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"SonarLLMConfig.head_dim must be None or a positive even int, got {self.head_dim!r}"
            )
        for name in ("rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise ValueError(
                    f"SonarLLMConfig.{name} must be a finite number > 0, got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "rope_scaling", self._checked_rope_scaling(self.rope_scaling))
        if not isinstance(self.use_normalizer, bool):
            raise ValueError(
                f"SonarLLMConfig.use_normalizer must be a bool, got {self.use_normalizer!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"SonarLLMConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        check_impl_name(self.kernel_impl, source="SonarLLMConfig.kernel_impl")
        if not isinstance(self.add_begin, bool):
            raise ValueError(f"SonarLLMConfig.add_begin must be a bool, got {self.add_begin!r}")

    @staticmethod
    def _checked_rope_scaling(value: Any) -> dict[str, Any] | None:
        """A validated copy of ``rope_scaling`` (``rope_type`` defaults to "llama3")."""
        if value is None:
            return None
        where = "SonarLLMConfig.rope_scaling"
        if not isinstance(value, dict):
            raise ValueError(
                f"{where} must be None or a dict with keys {ROPE_SCALING_KEYS}, got {value!r}"
            )
        unknown = sorted(set(value) - set(ROPE_SCALING_KEYS))
        missing = sorted(set(ROPE_SCALING_KEYS[1:]) - set(value))
        if unknown or missing:
            raise ValueError(
                f"{where} has unknown keys {unknown} / missing keys {missing}; expected {ROPE_SCALING_KEYS}"
            )
        out = {"rope_type": value.get("rope_type", "llama3")}
        if out["rope_type"] != "llama3":
            raise ValueError(
                f"{where}['rope_type'] must be 'llama3' (or use rope_scaling=None), got {out['rope_type']!r}"
            )
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if not _is_real(value[key]) or value[key] <= 0:
                raise ValueError(
                    f"{where}['{key}'] must be a finite number > 0, got {value[key]!r}"
                )
            out[key] = float(value[key])
        if out["factor"] < 1:
            raise ValueError(f"{where}['factor'] must be >= 1, got {out['factor']}")
        if out["low_freq_factor"] >= out["high_freq_factor"]:
            raise ValueError(
                f"{where}['low_freq_factor'] ({out['low_freq_factor']}) must be smaller than "
                f"['high_freq_factor'] ({out['high_freq_factor']})"
            )
        n = value["original_max_position_embeddings"]
        if not _is_int(n) or n < 1:
            raise ValueError(
                f"{where}['original_max_position_embeddings'] must be a positive int, got {n!r}"
            )
        out["original_max_position_embeddings"] = n
        return out

    @property
    def attn_dim(self) -> int:
        """num_heads * head_dim: the width of the query, key and value projections."""
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (head_dim resolved); ``from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SonarLLMConfig:
        """Build from ``to_dict``'s output; unknown keys raise ValueError (missing ones take defaults)."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown SonarLLMConfig keys {unknown}; known keys are {sorted(known)}"
            )
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SonarLLMConfig:
        """The named flavour (see SONARLLM_CONFIGS) with ``overrides`` applied before validation.

        A preset without an explicit head_dim keeps head_dim = model_dim // num_heads under
        overrides of model_dim or num_heads.
        """
        if name not in SONARLLM_CONFIGS:
            raise ValueError(
                f"unknown SonarLLM config name {name!r}; known: {list(SONARLLM_CONFIGS)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown SonarLLMConfig overrides {unknown}; known keys are {sorted(known)}"
            )
        return cls(**{**SONARLLM_CONFIGS[name], **overrides})

    def replace(self, **changes: Any) -> SonarLLMConfig:
        """A validated copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


# Named flavours as constructor arguments (not instances), so that from_name's overrides of
# model_dim / num_heads re-derive head_dim. See the module docstring for the parameter counts.
SONARLLM_CONFIGS: dict[str, dict[str, Any]] = {
    "toy": dict(
        sonar_dim=64, model_dim=64, num_layers=2, num_heads=4, ffn_dim=160, max_seq_len=128
    ),
    "39M": dict(model_dim=256, ffn_dim=1024, num_layers=10, num_heads=8),
    "100M": dict(model_dim=512, ffn_dim=2048, num_layers=8, num_heads=16),
    "300M": dict(model_dim=1024, ffn_dim=4096, num_layers=10, num_heads=16),
    "600M": dict(model_dim=1280, ffn_dim=5120, num_layers=16, num_heads=26, head_dim=64),
    "900M": dict(model_dim=1536, ffn_dim=6144, num_layers=17, num_heads=32, head_dim=64),
    "1.3B": dict(model_dim=2048, ffn_dim=8192, num_layers=16, num_heads=32),
}

# The paper's "trainable parameters" (docs/sonar-llm.md §1.2, Table 1 of arXiv 2508.05305).
PAPER_TRAINABLE_PARAMS: dict[str, int] = {
    "39M": 11_000_000,
    "100M": 34_000_000,
    "300M": 170_000_000,
    "600M": 450_000_000,
    "900M": 700_000_000,
    "1.3B": 1_100_000_000,
}
