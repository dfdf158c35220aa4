"""Random checkpoints in the SONAR-LLM paper's two released layouts, built the way the official
code builds its model (FusionBrainLab/SONAR-LLM ``generate.py`` / ``train_sonarllm_fast.py``):
an HF ``LlamaForCausalLM(LlamaConfig(**llama_config))`` fed through ``inputs_embeds``, wrapped
with ``forward_proj.linear`` / ``reverse_proj.linear`` and a frozen ``sonar_decoder``.

The reference prediction is the official formulation, computed by transformers:
``reverse_proj(llama(inputs_embeds=forward_proj(e), output_hidden_states=True).hidden_states[-1])``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class Projector(nn.Module):
    """The official ``Projector``: one ``nn.Linear`` named ``linear``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.linear(x)


class OfficialWrapper(nn.Module):
    """The official wrapper's module tree (``llama_model``, ``forward_proj``, ``reverse_proj``,
    ``sonar_decoder``), with its prediction."""

    def __init__(self, llama_config: dict, embed_dim: int, vocab_size: int = 37):
        super().__init__()
        values = copy.deepcopy(llama_config)  # LlamaConfig(**d) writes rope_theta into d's rope dict
        values.update(vocab_size=vocab_size, pad_token_id=1, bos_token_id=0, eos_token_id=1)
        self.llama_model = LlamaForCausalLM(LlamaConfig(**values))
        hidden = self.llama_model.config.hidden_size
        self.forward_proj = Projector(embed_dim, hidden)
        self.reverse_proj = Projector(hidden, embed_dim)
        self.sonar_decoder = nn.Sequential(nn.Embedding(11, embed_dim), nn.Linear(embed_dim, embed_dim))

    @torch.no_grad()
    def predict(self, e_BSE: torch.Tensor) -> torch.Tensor:
        out = self.llama_model(inputs_embeds=self.forward_proj(e_BSE), output_hidden_states=True)
        return self.reverse_proj(out.hidden_states[-1])


def official_llama_config(rng: random.Random, **changes) -> dict:
    """A random small llama_config with the official JSONs' fields (llama3 RoPE, theta 500,000,
    tied embeddings, explicit head_dim with heads x head_dim != hidden). ``original_max_position
    _embeddings`` is small so that the llama3 scaling changes the angles of short documents."""
    heads = rng.randint(2, 5)
    head_dim = rng.choice([6, 8, 10, 12])
    # transformers 5 requires hidden_size % heads == 0 even with an explicit head_dim (so the
    # paper's 600M config, 1280 / 26 heads, no longer builds there); the width still differs
    hidden = heads * rng.choice([k for k in (6, 8, 10, 12, 14) if k != head_dim])
    config = {
        "hidden_size": hidden,
        "intermediate_size": rng.choice([40, 72, 96]),
        "num_hidden_layers": rng.randint(1, 3),
        "num_attention_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": rng.choice([8, 16]),
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "head_dim": head_dim,
    }
    config.update(changes)
    return config


def random_wrapper(llama_config: dict, embed_dim: int, seed: int) -> OfficialWrapper:
    """The wrapper with every weight random and O(1) (HF's 0.02 init would hide mistakes)."""
    torch.manual_seed(seed)
    wrapper = OfficialWrapper(llama_config, embed_dim)
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return wrapper.eval()


def save_release(wrapper: OfficialWrapper, path: Path) -> Path:
    """The GitHub-release layout: ``save_full_checkpoint``'s dict (optimizer, scheduler and the
    RNG states, NumPy's included, beside ``model_state_dict``)."""
    params = [p for n, p in wrapper.named_parameters() if not n.startswith("sonar_decoder.")]
    opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    torch.save(
        {
            "model_state_dict": wrapper.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": sched.state_dict(),
            "epoch": 3,
            "step_in_epoch": 10,
            "global_step": 16480,
            "random_rng_state": random.getstate(),
            "numpy_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state_all": [],
        },
        path,
    )
    return path


def save_hf(wrapper: OfficialWrapper, directory: Path, llama_config: dict, embed_dim: int, *,
            add_begin: bool = True, nested: bool = False) -> Path:  # fmt: skip
    """The Hugging Face layout of raxtemur/sonar-llm-*: config.json + pytorch_model.bin (the
    state dict bare, or under ``model_state_dict`` with ``nested``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"llama_config": llama_config, "embed_dim": embed_dim, "add_begin": add_begin}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = wrapper.state_dict()
    torch.save({"model_state_dict": state} if nested else state, directory / "pytorch_model.bin")
    return directory
