"""The concept transformer (``SonarLLM``): a Llama-style decoder over SONAR sentence embeddings.

``transformer`` (the model), ``blocks`` (its layers), ``rope`` (positions), ``kv_cache``
(incremental generation), ``io`` (checkpoints: ours, and the paper's released ones).
"""

from sonarllm.model.io import CONFIG_NAME, WEIGHTS_NAME
from sonarllm.model.kv_cache import KVCache
from sonarllm.model.rope import apply_rope, rope_inv_freq, rope_tables
from sonarllm.model.transformer import SonarLLM

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "KVCache", "SonarLLM", "apply_rope", "rope_inv_freq", "rope_tables"]
