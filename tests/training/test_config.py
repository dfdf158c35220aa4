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
        ("optim.lr", "inf", "optim.lr must be a finite number, got inf"),
        ("optim.eps", "nan", "optim.eps must be a finite number, got nan"),
        ("optim.grad_clip", "-inf", "optim.grad_clip must be a finite number"),
        ("run.seed", str(2**63), r"run.seed must be in \[0, 2\*\*63 - 1\]"),
        ("run.seed", "-1", r"run.seed must be in \[0, 2\*\*63 - 1\]"),
        ("model.overrides.objective", "mse", "model.overrides.objective is not used: .*set model.objective instead"),
        ("model.overrides.kernel_impl", "torch", "model.overrides.kernel_impl is not used: .*set model.kernel_impl"),
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


def test_non_finite_numbers_in_a_config_file_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = inf\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number, got inf"):
        load_config(path)


def test_the_largest_seed_trains(prepared):
    """2**63 - 1 passes validation, and the data order it seeds can be drawn (no overflow)."""
    from training.data import StepSchedule
    from training.shards import ShardedDocuments

    cfg = load_config(None, {"run.seed": str(2**63 - 1)})
    docs = ShardedDocuments(prepared, "train", verify=False)
    schedule = StepSchedule(docs, micro=4, accum=1, world=1, seed=cfg.run.seed, duplicate_eos=True)
    for step in (0, schedule.steps_per_epoch):  # epochs 0 and 1
        ids = schedule.step_documents(step)
        assert len(ids) == 4 and len(set(ids)) == 4


@pytest.mark.parametrize("kind", ["dangling", "loop", "dangling parent"])
def test_an_output_dir_through_a_broken_symlink_is_named(tmp_path, capsys, kind):
    from training.train import main

    link = tmp_path / "link"
    if kind == "loop":
        link.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(link)
    else:
        link.symlink_to(tmp_path / "missing")
    out = link / "run" if kind == "dangling parent" else link
    why = "a symbolic link in a loop of links" if kind == "loop" else f"a symbolic link to {tmp_path / 'missing'}, which does not exist"
    with pytest.raises(ConfigError, match=f"run.output_dir {out}: {link} is {why}"):
        load_config(None, {"run.output_dir": str(out)})
    assert main(["--run.output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{link} is " in err and "File exists" not in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "content,match",
    [
        ("[1, 2]", "must hold a JSON object .*got a list"),
        ('{"zero_optimization": 3}', '"zero_optimization" must be a JSON object .*got 3'),
        ('{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}',
         '"zero_optimization.offload_optimizer" must be a JSON object'),
        ('{"zero_optimization": {"stage": "2"}}', '"zero_optimization.stage" must be an integer'),
        ('{"bf16": true}', '"bf16" must be a JSON object'),
    ],
)
def test_a_deepspeed_config_of_another_shape_is_refused_at_start_up(tmp_path, capsys, content, match):
    from training.train import main

    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"system.deepspeed_config {path}.*{match}"):
        load_config(None, {"system.deepspeed_config": str(path)})
    assert main(["--system.deepspeed_config", str(path), "--run.output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: system.deepspeed_config")
    assert not (tmp_path / "run").exists()
