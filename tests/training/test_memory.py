"""The start-up memory estimate (training/memory.py): the parameter count matches the model's,
ZeRO sharding divides what each stage shards, and a run that cannot fit is refused naming it."""

import pytest
import torch

from sonarllm.config import SonarLLMConfig
from sonarllm.model import SonarLLM
from training.config import ConfigError, load_config
from training.memory import check_fits, model_state_bytes, trainable_parameters


@pytest.mark.parametrize("preset,overrides", [
    ("toy", {}), ("39M", {}), ("600M", {}), ("toy", {"num_heads": 2, "head_dim": 48, "ffn_dim": 100, "sonar_dim": 32}),
])  # fmt: skip
def test_the_parameter_count_is_the_models(preset, overrides):
    mcfg = SonarLLMConfig.from_name(preset, **overrides)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = SonarLLM(mcfg)
    assert trainable_parameters(mcfg) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero_stages_shard_optimizer_states_then_gradients_then_weights():
    n = 1000  # fp32: weight 4, gradient 4, AdamW 8 bytes; bf16: 2, 2, 12
    assert model_state_bytes(n, "fp32", 0, 4).per_process == 16_000
    assert model_state_bytes(n, "fp32", 1, 4).per_process == 4000 + 4000 + 2000
    assert model_state_bytes(n, "fp32", 2, 4).per_process == 4000 + 1000 + 2000
    assert model_state_bytes(n, "fp32", 3, 4).per_process == 1000 + 1000 + 2000
    assert model_state_bytes(n, "bf16", 3, 4).per_process == 500 + 500 + 3000
    assert model_state_bytes(n, "bf16", 2, 1).per_process == 16_000  # one process: nothing to shard
    assert "sharded" not in model_state_bytes(n, "bf16", 2, 1).how


def test_a_run_that_cannot_fit_is_refused_naming_its_size():
    cfg = load_config(None, {"model.preset": "39M"})  # 11,016,704 parameters: 176,267,264 bytes in fp32
    mcfg = SonarLLMConfig.from_name("39M")
    cpu = torch.device("cpu")
    assert check_fits(mcfg, cfg, world=1, local_world=1, device=cpu, available=176_267_264).per_process == 176_267_264
    with pytest.raises(ConfigError, match="model.preset '39M'.* 11,016,704 trainable parameters; training it needs at "
                                          "least 0.2 GiB .*one process; 16 bytes per parameter in fp32"):
        check_fits(mcfg, cfg, world=1, local_world=1, device=cpu, available=176_267_263)
    # two processes on one CPU host each hold their own (stage 2: gradients and AdamW states halved)
    per_process = 44_066_816 + 22_033_408 + 44_066_816
    with pytest.raises(ConfigError, match="2 processes x 0.1 GiB; .*sharded over 2 processes by ZeRO stage 2"):
        check_fits(mcfg, cfg, world=2, local_world=2, device=cpu, available=2 * per_process - 1)
    check_fits(mcfg, cfg, world=2, local_world=2, device=cpu, available=2 * per_process)


def test_on_cuda_each_process_has_its_devices_free_memory(monkeypatch):
    """(No GPU here: torch.cuda's answers are stubbed; what is tested is how they are used.)"""
    cfg = load_config(None, {"model.preset": "39M"})
    mcfg = SonarLLMConfig.from_name("39M")
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (asked.append(device), (176_267_263, 2**40))[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stub GPU")
    cuda1 = torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"one process; .* but 0.2 GiB is free on cuda:1 \(Stub GPU\)"):
        check_fits(mcfg, cfg, world=1, local_world=8, device=cuda1)  # a device is not shared with the node's others
    assert asked == [cuda1]
