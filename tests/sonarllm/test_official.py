"""SonarLLM.from_official: the paper's released checkpoints (GitHub-release torch file with the
official JSON config; Hugging Face directory), predictions equal to the official formulation
computed by transformers, and the refusals (GQA, unknown keys, a config that does not fit)."""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
import torch
from transformers import LlamaConfig

from sonarllm.model import SonarLLM
from sonarllm.official import official_to_config
from sonarllm.sonar.checkpoint import CheckpointError
from tests.sonarllm.official_checkpoints import official_llama_config, random_wrapper, save_hf, save_release

pytestmark = pytest.mark.usefixtures("one_thread")
TORCH = {"kernel_impl": "torch"}  # the plain path: the Triton interpreter is slow and tested elsewhere


def _case(seed: int, **changes):
    rng = random.Random(seed)
    llama = official_llama_config(rng, **changes)
    embed_dim = rng.choice([16, 20, 28])
    return llama, embed_dim, random_wrapper(llama, embed_dim, seed)


def _documents(embed_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 21, embed_dim, generator=g) * 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_file_predicts_like_the_official_formulation(tmp_path, seed):
    llama, embed_dim, wrapper = _case(seed)
    path = save_release(wrapper, tmp_path / "checkpoint_step_16480.pt")
    config_path = tmp_path / "SonarLLM_custom.json"
    config_path.write_text(json.dumps({"pretrained_model_name_or_path": "meta-llama/Llama-3.2-1B",
                                       "llama_config": llama, "embed_dim": embed_dim}))  # fmt: skip
    model = SonarLLM.from_official(path, config_path, **TORCH)
    assert not model.training and model.config.add_begin is False
    assert model.config.num_heads * model.config.head_dim != model.config.model_dim
    e = _documents(embed_dim, seed)
    want = wrapper.predict(e)
    with torch.no_grad():
        got = model(e)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # the llama3 scaling is exercised: plain RoPE gives other predictions
    plain = SonarLLM.from_official(path, config_path, rope_scaling=None, **TORCH)
    with torch.no_grad():
        assert (plain(e) - want).abs().max() > 1e-3


@pytest.mark.parametrize("nested", [False, True])
def test_hugging_face_directory_reads_its_config_and_predicts_like_the_official_formulation(tmp_path, nested):
    llama, embed_dim, wrapper = _case(10 + nested)
    directory = save_hf(wrapper, tmp_path / "sonar-llm-1.3b", llama, embed_dim, add_begin=True, nested=nested)
    model = SonarLLM.from_official(directory, **TORCH)
    assert model.config.add_begin is True and model.config.sonar_dim == embed_dim
    e = _documents(embed_dim, 5).double()
    model, wrapper = model.double(), wrapper.double()
    with torch.no_grad():
        torch.testing.assert_close(model(e), wrapper.predict(e), atol=1e-12, rtol=1e-12)
        # packed documents and the KV cache give the same predictions
        cu = torch.tensor([0, 21, 42], dtype=torch.int32)
        torch.testing.assert_close(model(e[:2].reshape(42, -1), cu_seqlens=cu).view(2, 21, -1), model(e[:2]))


def test_weights_are_assigned_exactly_and_ignored_tensors_are_logged_once(tmp_path, caplog):
    llama, embed_dim, wrapper = _case(3)
    path = save_release(wrapper, tmp_path / "ckpt.pt")
    with caplog.at_level(logging.INFO, logger="sonarllm.official"):
        model = SonarLLM.from_official(path, {"llama_config": llama, "embed_dim": embed_dim}, **TORCH)
    lines = [r.getMessage() for r in caplog.records if r.name == "sonarllm.official"]
    assert len(lines) == 1
    for part in ("sonar_decoder.* (3 tensors)", "llama_model.lm_head.weight", "llama_model.model.embed_tokens.weight"):
        assert part in lines[0]
    src = wrapper.llama_model.model
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, src.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.norm.weight, src.norm.weight)
    assert torch.equal(model.input_proj.bias, wrapper.forward_proj.linear.bias)
    assert torch.equal(model.output_proj.weight, wrapper.reverse_proj.linear.weight)


def test_the_callers_config_is_never_modified_and_both_rope_forms_are_accepted(tmp_path):
    llama, embed_dim, wrapper = _case(4)
    given = {"llama_config": copy.deepcopy(llama), "embed_dim": embed_dim}
    before = copy.deepcopy(given)
    want = official_to_config(given)
    assert given == before
    assert "rope_theta" not in given["llama_config"]["rope_scaling"]
    # transformers 5's LlamaConfig(**d) inserts rope_theta into d's rope_scaling dict ...
    hf_form = copy.deepcopy(llama)
    LlamaConfig(**hf_form)
    assert hf_form["rope_scaling"]["rope_theta"] == 500000.0
    assert official_to_config({"llama_config": hf_form, "embed_dim": embed_dim}) == want
    # ... and its to_dict() writes rope_parameters; a LlamaConfig object is accepted too
    hf_config = LlamaConfig(**copy.deepcopy(llama))
    assert "rope_parameters" in hf_config.to_dict()
    assert official_to_config(hf_config, sonar_dim=embed_dim) == want
    assert want.rope_theta == 500000.0 and want.rope_scaling["factor"] == 32.0
    assert want.max_seq_len == 4096 and want.head_dim == llama["head_dim"]


def test_grouped_query_attention_is_refused(tmp_path):
    heads = 4
    llama, embed_dim, wrapper = _case(5, num_attention_heads=heads, num_key_value_heads=2, head_dim=8)
    path = save_release(wrapper, tmp_path / "gqa.pt")
    with pytest.raises(CheckpointError, match=r"num_key_value_heads = 2 != num_attention_heads = 4.*grouped-query"):
        SonarLLM.from_official(path, {"llama_config": llama, "embed_dim": embed_dim})


def test_unknown_keys_are_refused_and_named(tmp_path):
    llama, embed_dim, wrapper = _case(6)
    state = wrapper.state_dict()
    state["value_head.weight"] = torch.zeros(2, 2)
    torch.save({"model_state_dict": state}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"not part of a SONAR-LLM model: \['value_head.weight'\]"):
        SonarLLM.from_official(tmp_path / "extra.pt", {"llama_config": llama, "embed_dim": embed_dim})


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"hidden_size": 64}, "shape mismatches"),
        ({"num_hidden_layers": 4}, "num_hidden_layers = 4 but the weights have layers"),
        ({"intermediate_size": 12}, "mlp.gate_proj.weight"),
        ({"head_dim": 2}, "self_attn.q_proj.weight"),
    ],
)
def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path, change, fragment):
    llama, embed_dim, wrapper = _case(7, num_hidden_layers=2)
    path = save_release(wrapper, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="the config does not fit the weights") as info:
        SonarLLM.from_official(path, {"llama_config": {**llama, **change}, "embed_dim": embed_dim})
    assert fragment in str(info.value)
    with pytest.raises(CheckpointError, match=r"input_proj.weight: \(\d+, \d+\) in the file, \(\d+, 1024\) for the config"):
        SonarLLM.from_official(path, {"llama_config": llama})  # embed_dim defaults to 1024, as in the official code


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"attention_bias": True}, "attention_bias = true"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not implemented"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "missing keys"),
        ({"rope_theta": 10000.0, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
         "different rope_theta"),
    ],
)
def test_what_the_model_does_not_implement_is_refused(change, fragment):
    llama = official_llama_config(random.Random(8), **change)
    with pytest.raises(CheckpointError) as info:
        official_to_config({"llama_config": llama})
    assert fragment in str(info.value)


def test_missing_config_missing_files_and_our_own_directories_are_named(tmp_path):
    llama, embed_dim, wrapper = _case(9)
    path = save_release(wrapper, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"records no configuration: pass config="):
        SonarLLM.from_official(path)
    with pytest.raises(CheckpointError, match="not found"):
        SonarLLM.from_official(tmp_path / "nope.pt", {"llama_config": llama})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"none of \['pytorch_model.bin', 'model.safetensors'\]"):
        SonarLLM.from_official(tmp_path / "empty")
    ours = SonarLLM.from_official(path, {"llama_config": llama, "embed_dim": embed_dim}).save_pretrained(tmp_path / "ours")
    torch.save({}, ours / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="SonarLLM.from_pretrained"):
        SonarLLM.from_official(ours)


def test_a_file_pickling_other_objects_needs_trust(tmp_path):
    llama, embed_dim, wrapper = _case(11)
    torch.save({"model_state_dict": wrapper.state_dict(), "args": _Args()}, tmp_path / "ckpt.pt")
    config = {"llama_config": llama, "embed_dim": embed_dim}
    with pytest.raises(CheckpointError, match="trust=True"):
        SonarLLM.from_official(tmp_path / "ckpt.pt", config)
    assert SonarLLM.from_official(tmp_path / "ckpt.pt", config, trust=True).config.sonar_dim == embed_dim


class _Args:
    """A pickled object other than tensors (as an argparse Namespace would be)."""


# ---------------------------------------------------------------------------------------------
# add_begin: generation puts "Begin of text." before every prompt (context only)


def _with_begin(model: SonarLLM, add_begin: bool) -> SonarLLM:
    twin = SonarLLM(model.config.replace(add_begin=add_begin)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_generation_puts_the_begin_sentence_before_every_prompt(toy, monkeypatch):
    import sonarllm.generate as gen_mod
    from sonarllm.generate import GenerationOptions, generate

    model = _with_begin(toy.model, True)
    seen = []
    real_prefill = gen_mod.prefill
    monkeypatch.setattr(gen_mod, "prefill", lambda m, embeds, cap: seen.append((list(embeds), cap)) or real_prefill(m, embeds, cap))
    prompts = ["The cat sat on the mat. A dog ran in the park.", "Tom had a red ball."]
    options = GenerationOptions(beam_size=2, max_tokens=6, max_sentences=4, eos_threshold=None)
    results = generate(model, toy.pipeline, prompts, options)
    (contexts, capacity), = seen
    begin = toy.pipeline.encode(["Begin of text."])[0]
    assert capacity == options.max_sentences  # one more than max_sentences - 1: the begin sentence
    for context, result in zip(contexts, results, strict=True):
        torch.testing.assert_close(context[0], begin)
        torch.testing.assert_close(context[1:], toy.pipeline.encode(result.prompt_sentences))
        assert "Begin of text." not in result.prompt_sentences and "Begin of text." not in result.sentences
        assert len(result.prompt_sentences) + len(result.sentences) == options.max_sentences


def test_add_begin_generates_what_the_plain_model_generates_after_the_begin_sentence(toy):
    from sonarllm.generate import GenerationOptions, generate

    prompt = "The cat sat on the mat. A dog ran in the park."
    fast = dict(beam_size=2, max_tokens=6, eos_threshold=None, recompute=True)
    with_begin = generate(_with_begin(toy.model, True), toy.pipeline, [prompt], GenerationOptions(max_sentences=5, **fast))
    by_hand = generate(_with_begin(toy.model, False), toy.pipeline, ["Begin of text. " + prompt],
                       GenerationOptions(max_sentences=6, **fast))  # fmt: skip
    assert by_hand[0].prompt_sentences[0] == "Begin of text."
    assert with_begin[0].sentences == by_hand[0].sentences
    assert with_begin[0].prompt_sentences == by_hand[0].prompt_sentences[1:]


# ---------------------------------------------------------------------------------------------
# sonarllm convert, then sonarllm generate on the converted directory


def _cli(capsys, *argv):
    from sonarllm.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _toy_official(tmp_path, toy, add_begin: bool):
    """An official-layout model in the toy SONAR's space (embed_dim = the toy SONAR's width)."""
    rng = random.Random(21)
    llama = official_llama_config(rng)
    embed_dim = toy.model.config.sonar_dim
    wrapper = random_wrapper(llama, embed_dim, 21)
    sonar = ["--sonar-tokenizer", toy.spec.tokenizer, "--sonar-encoder", toy.spec.encoder, "--sonar-decoder", toy.spec.decoder]
    return llama, embed_dim, wrapper, sonar


def test_convert_writes_a_model_directory_that_generate_and_load_bundle_accept(tmp_path, toy, capsys):
    from sonarllm.bundle import load_bundle

    llama, embed_dim, wrapper, sonar = _toy_official(tmp_path, toy, add_begin=True)
    hf = save_hf(wrapper, tmp_path / "hf", llama, embed_dim, add_begin=True)
    out = tmp_path / "converted"
    code, stdout, err = _cli(capsys, "convert", "--official", str(hf), "--out", str(out), *sonar)
    assert code == 0, err
    assert "add_begin true" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "config.json", "converted.json", "model.safetensors", "sonar", "sonar.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left
    bundle = load_bundle(out, kernel_impl="torch")
    assert bundle.model.config.add_begin is True
    e = _documents(embed_dim, 3)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(e), wrapper.predict(e), atol=2e-6, rtol=1e-5)
    code, stdout, err = _cli(capsys, "generate", "--model", str(out), "--prompt", "The cat sat on the mat.",
                             "--beam-size", "2", "--max-tokens", "6", "--max-sentences", "3", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert result["prompt_sentences"] == ["The cat sat on the mat."] and len(result["sentences"]) <= 2
    # converting again replaces the earlier conversion
    code, _, err = _cli(capsys, "convert", "--official", str(hf), "--out", str(out), *sonar)
    assert code == 0, err


def test_convert_of_a_release_file_needs_its_config_and_never_overwrites_foreign_files(tmp_path, toy, capsys):
    llama, embed_dim, wrapper, sonar = _toy_official(tmp_path, toy, add_begin=False)
    release = save_release(wrapper, tmp_path / "checkpoint.pt")
    config = tmp_path / "SonarLLM_toy.json"
    config.write_text(json.dumps({"llama_config": llama, "embed_dim": embed_dim}))
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "convert", "--official", str(release), "--out", str(out), *sonar)
    assert code == 2 and "give --config" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "convert", "--official", str(release), "--config", str(config), "--out", str(out), *sonar)
    assert code == 2 and "not empty and not an earlier 'sonarllm convert' output" in err and "notes.txt" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # a misfit config is a runtime error in one line; nothing is written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"llama_config": {**llama, "num_hidden_layers": 7}, "embed_dim": embed_dim}))
    code, _, err = _cli(capsys, "convert", "--official", str(release), "--config", str(bad), "--out", str(tmp_path / "o2"), *sonar)
    assert code == 1 and "the config does not fit the weights" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    code, _, err = _cli(capsys, "convert", "--official", str(release), "--config", str(config), "--out", str(tmp_path / "o3"), *sonar)
    assert code == 0, err
    assert json.loads((tmp_path / "o3" / "converted.json").read_text())["official"] == str(release.resolve())


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("100M", dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16)),
        ("300M", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=10, num_attention_heads=16)),
        ("600M", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=16, num_attention_heads=26, head_dim=64)),
        ("900M", dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=17, num_attention_heads=32, head_dim=64)),
    ],
)
def test_the_official_jsons_map_onto_our_named_sizes(name, sizes):
    """The sizes of SonarLLM_{100M,300M,600M,900M}.json (docs/sonar-llm.md §1.2) with the fields
    common to all four; the 600M one (1280 / 26 heads) no longer builds in transformers 5."""
    from sonarllm.config import SonarLLMConfig

    common = official_llama_config(random.Random(0))
    common["rope_scaling"]["original_max_position_embeddings"] = 8192
    del common["head_dim"]
    official = {"pretrained_model_name_or_path": "meta-llama/Llama-3.2-1B", "llama_config": {**common, **sizes}}
    assert official_to_config(official) == SonarLLMConfig.from_name(name)


def test_a_bare_llama_model_backbone_and_a_ddp_prefix_are_read(tmp_path):
    llama, embed_dim, wrapper = _case(12)
    state = {"module." + k.replace("llama_model.model.", "llama_model."): v for k, v in wrapper.state_dict().items()}
    torch.save({"model_state_dict": state}, tmp_path / "ddp.pt")
    model = SonarLLM.from_official(tmp_path / "ddp.pt", {"llama_config": llama, "embed_dim": embed_dim}, **TORCH)
    e = _documents(embed_dim, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(e), wrapper.predict(e), atol=2e-6, rtol=1e-5)


def test_convert_has_help(capsys):
    code, out, _ = _cli(capsys, "convert", "--help")
    assert code == 0 and out.startswith("usage: sonarllm convert") and "--official" in out


def test_add_begin_is_not_part_of_what_defines_a_training_run():
    """A checkpoint written before the field existed (no add_begin in its model config) resumes."""
    from sonarllm.config import SonarLLMConfig
    from training.config import TrainConfig
    from training.identity import compare, run_identity

    now = SonarLLMConfig.from_name("toy").to_dict()
    before = {k: v for k, v in now.items() if k != "add_begin"}
    cfg = TrainConfig()
    assert compare(run_identity(cfg, {}, before, 1), run_identity(cfg, {}, now, 1)) == ([], [])
    assert compare(run_identity(cfg, {}, now, 1), run_identity(cfg, {}, {**now, "add_begin": True}, 1)) == ([], [])
