"""Training configuration: files, overrides, validation messages, the DeepSpeed JSON."""

import json

import pytest

from training.config import EXAMPLE_CORPUS, ConfigError, TrainConfig, load_config, parse_cli
from training.engine import CONFIG_DIR, build_ds_config, lr_lambda


def test_defaults_run_the_embedded_example():
    cfg = load_config()
    assert cfg.model.preset == "toy" and cfg.data.sonar == "toy" and cfg.data.source == ""  # = the example stories


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlr = 3e-4\n[loop]\nmax_steps = 7\n[model]\noverrides = {num_layers = 3}\n')
    cfg = load_config(path, {"loop.max_steps": "9", "system.precision": "bf16", "data.duplicate_eos": "false"})
    assert cfg.optim.lr == 3e-4 and cfg.loop.max_steps == 9 and cfg.system.precision == "bf16"
    assert cfg.model.overrides == {"num_layers": 3} and cfg.data.duplicate_eos is False


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("optim.lr", "-1", "optim.lr must be > 0"),
        ("optim.lr", "fast", "optim.lr must be a number"),
        ("loop.max_steps", "0", "loop.max_steps must be >= 1"),
        ("loop.micro_batch_documents", "2.5", "loop.micro_batch_documents must be an integer"),
        ("system.precision", "fp8", "system.precision must be fp32, bf16 or fp16"),
        ("system.zero_stage", "4", "system.zero_stage must be 0, 1, 2 or 3"),
        ("model.preset", "7B", "model.preset must be one of"),
        ("model.objective", "diffusion", r"model.objective must be 'sonar', 'mse' or 'sonar\+mse'"),
        ("model.mse_weight", "-1", "model.mse_weight must be a finite number >= 0"),
        ("model.normalizer", "/nonexistent/norm.pt", "model.normalizer must be empty or the path of a normalizer file"),
        ("model.overrides", '{"num_layers": -1}', "model.overrides"),
        ("run.resume", "/nonexistent/ckpt", "run.resume must be"),
        ("optim.beta2", "1.0", r"optim.beta2 must be in \[0, 1\)"),
        ("system.deepspeed_config", "/nonexistent.json", "system.deepspeed_config must name an existing file"),
        ("optim.learning_rate", "1", "unknown configuration key 'optim.learning_rate'"),
        ("data.verify_checksums", "maybe", "data.verify_checksums must be true or false"),
        ("data.source", "/nonexistent/corpus.jsonl", "data.source must be an existing file"),
        ("data.sonar", "basci", "data.sonar must be 'toy', 'basic' or the path of a sonar.json"),
        ("data.lang", "english", "data.lang must be a SONAR language code"),
        ("data.max_sentences", "200", "data.max_sentences plus the end sentence must fit"),
    ],
)
def test_bad_values_name_their_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {key: value})


def test_bad_toml_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('[loop]\nmax_steps = "ten"\n')
    with pytest.raises(ConfigError, match="loop.max_steps must be an integer"):
        load_config(wrong_type)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_command_line_parsing():
    path, overrides = parse_cli(["--local_rank=1", "--config", "x.toml", "--optim.lr=0.1", "--loop.max_steps", "3"])
    assert path == "x.toml" and overrides == {"optim.lr": "0.1", "loop.max_steps": "3"}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_cli(["--optim.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_cli(["positional"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_complete(stage):
    cfg = load_config(None, {"system.zero_stage": str(stage), "system.precision": "bf16"})
    ds = build_ds_config(cfg, world_size=4)
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == cfg.loop.micro_batch_documents * cfg.loop.grad_accum_steps * 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    for template in CONFIG_DIR.glob("zero*.json"):
        assert "auto" not in template.read_text(), template


def test_deepspeed_template_with_auto_or_wrong_stage_is_refused(tmp_path):
    auto = tmp_path / "auto.json"
    auto.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}')
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size as \"auto\""):
        build_ds_config(load_config(None, {"system.deepspeed_config": str(auto)}), 1)
    stage3 = tmp_path / "z3.json"
    stage3.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="system.zero_stage is 2 but .* sets stage 3"):
        build_ds_config(load_config(None, {"system.deepspeed_config": str(stage3)}), 1)


def test_learning_rate_schedule():
    cfg = TrainConfig()
    cfg.optim.warmup_steps, cfg.loop.max_steps, cfg.optim.min_lr_ratio = 10, 110, 0.1
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_shipped_run_configs_are_valid():
    files = sorted(CONFIG_DIR.glob("*.toml"))
    assert files, "training/configs should ship example run configurations"
    for path in files:  # the corpus of a real-data config is the user's to supply
        cfg = load_config(path, {"data.source": EXAMPLE_CORPUS})
        assert "auto" not in json.dumps(build_ds_config(cfg, world_size=8)), path


def test_model_overrides_one_field_at_a_time_from_the_command_line():
    """The error about a SONAR width mismatch tells users to set model.overrides.sonar_dim."""
    _, overrides = parse_cli(["--model.overrides.sonar_dim", "32", "--model.overrides.num_layers=3"])
    cfg = load_config(None, overrides)
    assert cfg.model.overrides == {"sonar_dim": 32, "num_layers": 3}
    path_cfg = load_config(None, {"model.overrides": '{"num_heads": 2}', "model.overrides.num_layers": "1"})
    assert path_cfg.model.overrides == {"num_heads": 2, "num_layers": 1}
    with pytest.raises(ConfigError, match="model.overrides .* are invalid: .*sonar_dimm"):
        load_config(None, {"model.overrides.sonar_dimm": "32"})


def test_an_output_dir_that_is_a_file_is_a_configuration_error(tmp_path, capsys):
    from training.train import main

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match="run.output_dir must be a directory .* but it is a file"):
        load_config(None, {"run.output_dir": str(tmp_path / "taken")})
    assert main(["--run.output_dir", str(tmp_path / "taken")]) == 2  # before any process group starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.output_dir must be a directory" in err and str(tmp_path / "taken") in err


def test_model_normalizer_conflicting_with_use_normalizer_false_is_refused(tmp_path):
    path = tmp_path / "norm.pt"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="model.normalizer is set but model.overrides.use_normalizer is false"):
        load_config(None, {"model.normalizer": str(path), "model.overrides.use_normalizer": "false"})
    assert load_config(None, {"model.normalizer": str(path), "model.objective": "sonar+mse"}).model.normalizer == str(path)


def test_the_trainer_reads_model_normalizer_checking_width_and_clipping(tmp_path):
    """Trainer._normalizer on its own (no run): the file's values, or a ConfigError naming the key."""
    from types import SimpleNamespace

    import torch

    from sonarllm.normalizer import SonarNormalizer
    from training.train import Trainer

    def read(path, dim):
        cfg = load_config(None, {"model.normalizer": str(path)})
        return Trainer._normalizer(SimpleNamespace(cfg=cfg, train_docs=None), dim)

    center, scale = torch.randn(16) * 1e-3, torch.rand(16) * 0.01 + 1e-3
    torch.save({"model": {"center": center, "scale": scale}, "dataset_mixture": ["a:1"]}, tmp_path / "lcm.pt")
    norm = read(tmp_path / "lcm.pt", 16)
    assert torch.equal(norm.center, center) and torch.equal(norm.scale, scale)
    with pytest.raises(ConfigError, match=r"model.normalizer .*lcm\.pt is 16-d but the model works in 32-d"):
        read(tmp_path / "lcm.pt", 32)
    SonarNormalizer(16).fit(torch.randn(100, 16), clip_proba=0.01).save(tmp_path / "clip.pt")
    with pytest.raises(ConfigError, match="has clip_min/clip_max"):
        read(tmp_path / "clip.pt", 16)
    (tmp_path / "bad.pt").write_text("x")
    with pytest.raises(ConfigError, match=r"model.normalizer: .*bad\.pt is not a readable torch normalizer file"):
        read(tmp_path / "bad.pt", 16)
