"""fairseq2 -> sonarllm: configs (dataclasses or dicts) and loaded models (decoder and encoder,
wrapped without copying), against the real fairseq2 outputs of the fixtures, on a stand-in for
fairseq2's layout (fairseq2_mimic.py) in CI and on the real thing when sonar is importable."""

import copy
import dataclasses
import json

import pytest
import torch

import sonarllm
from sonarllm.sonar import (
    CheckpointError,
    SonarTextConfig,
    decoder_from_fairseq2,
    encoder_from_fairseq2,
    from_fairseq2_config,
)
from tests.sonarllm import fairseq2_mimic as fs2
from tests.sonarllm.sonar_fixtures import FIXTURES, live_only, load, packed, reference, unpadded

# The fixture models' configurations as the fixture README states them (not computed by our code).
DECODER = SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=307, max_seq_len=64,
                          legacy_pad_idx=1, dropout_p=0.0)  # fmt: skip
ENCODER = DECODER  # same sizes; its table covers 64 + 2 = 66 tokens


def _with_pad(config: dict, pad_idx: int) -> dict:
    return config | {"vocab_info": config["vocab_info"] | {"pad_idx": pad_idx}}


def test_mimic_configs_have_sonar_s_field_names():
    real = json.loads((FIXTURES / "real_configs.json").read_text())
    for cls, name in ((fs2.SonarTextDecoderConfig, "text_sonar_basic_decoder"), (fs2.SonarTextEncoderConfig, "text_sonar_basic_encoder")):
        assert {f.name for f in dataclasses.fields(cls)} == set(real[name])
        assert {f.name for f in dataclasses.fields(fs2.VocabularyInfo)} == set(real[name]["vocab_info"])


def test_from_fairseq2_config_takes_config_dataclasses_and_dicts():
    assert sonarllm.sonar.from_fairseq2_config is from_fairseq2_config
    for kind, cls, want in (("decoder", fs2.SonarTextDecoderConfig, DECODER), ("encoder", fs2.SonarTextEncoderConfig, ENCODER)):
        values = load(kind)["config"]
        assert from_fairseq2_config(values, kind) == want
        assert from_fairseq2_config(fs2.config_from_dict(values, cls), kind) == want
    real = json.loads((FIXTURES / "real_configs.json").read_text())
    basic = sonarllm.sonar.SONAR_CONFIGS["basic"]
    assert from_fairseq2_config(real["text_sonar_basic_decoder"], "decoder") == basic
    assert from_fairseq2_config(real["text_sonar_basic_encoder"], "encoder") == basic


def test_encoder_config_changed_in_place_by_fairseq2s_factory():
    cfg = fs2.config_from_dict(load("encoder")["config"] | {"max_seq_len": 48}, fs2.SonarTextEncoderConfig)
    assert from_fairseq2_config(cfg, "encoder").max_seq_len == 48
    model = fs2.SonarTextEncoderFactory(cfg).create_model()
    assert cfg.max_seq_len == 50  # fairseq2 added pad_idx + 1 to it
    assert from_fairseq2_config(cfg, "encoder", after_factory=True).max_seq_len == 48
    ours = encoder_from_fairseq2(model)
    assert ours.config.max_seq_len == 48 and ours.max_len == model.encoder_frontend.pos_encoder.max_seq_len == 50
    plain = fs2.config_from_dict(load("encoder")["config"] | {"_from_fairseq": False}, fs2.SonarTextEncoderConfig)
    assert from_fairseq2_config(plain, "encoder").max_seq_len == 62  # 64 positions in all


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
def test_wrapped_fairseq2_decoder_gives_fairseq2s_logits_and_shares_its_weights(generation):
    fx = load("decoder")
    model = fs2.build("decoder", fx["config"], fx["state_dict"], generation)
    ours = decoder_from_fairseq2(model, kernel_impl="torch")
    assert ours.config == DECODER
    assert ours.output_weight.data_ptr() == model.decoder_frontend.embed.weight.data_ptr()
    h = ours.hidden_states(fx["embeddings"], packed(fx["tokens"], fx["seq_lens"]))
    torch.testing.assert_close(ours.logits(h), torch.cat(unpadded(fx["logits"], fx["seq_lens"])), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_wrapped_model_reads_the_pad_index_off_the_fairseq2_model(kind, generation):
    """With pad index 0 fairseq2's positions start at step 1; assuming 1 put the logits off by 0.78."""
    fx = load(kind)
    config = _with_pad(fx["config"], 0)
    model = fs2.build(kind, config, fx["state_dict"], generation)
    ours = (decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2)(model, kernel_impl="torch")
    assert ours.config == dataclasses.replace(DECODER, legacy_pad_idx=0) == from_fairseq2_config(config, kind)
    frontend = getattr(ours, f"{kind}_frontend")
    tokens = fx["tokens"][:, : frontend.positions.shape[0]]
    want = getattr(model, f"{kind}_frontend")(tokens)  # fairseq2's embedding + positions
    torch.testing.assert_close(frontend(tokens, torch.arange(tokens.shape[1]).expand_as(tokens)), want)


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
def test_wrapped_fairseq2_encoder_gives_fairseq2s_embeddings_and_shares_its_weights(generation):
    fx = load("encoder")
    cfg = fs2.config_from_dict(fx["config"], fs2.SonarTextEncoderConfig)
    model = fs2.build("encoder", cfg, fx["state_dict"], generation)
    ours = encoder_from_fairseq2(model, kernel_impl="torch")
    assert ours.config == ENCODER and ours.max_len == fx["effective_max_seq_len"] == 66
    assert ours.encoder_frontend.embed.weight.data_ptr() == model.encoder_frontend.embed.weight.data_ptr()
    emb, _ = ours(packed(fx["tokens"], fx["seq_lens"]))
    torch.testing.assert_close(emb, fx["sentence_embeddings"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_the_two_fairseq2_generations_name_the_position_offset_differently(kind):
    """fairseq2 0.3/0.4 (the official SONAR-LLM code, LCM) keep it in ``_sin_offset``; >= 0.5 in
    ``sin_offset``. Both wrap to the same model."""
    fx = load(kind)
    old, new = (fs2.build(kind, fx["config"], fx["state_dict"], g) for g in ("0.4", "0.5"))
    old_pos, new_pos = old.get_submodule(f"{kind}_frontend.pos_encoder"), new.get_submodule(f"{kind}_frontend.pos_encoder")
    assert not hasattr(old_pos, "sin_offset") and old_pos._sin_offset == 2
    assert not hasattr(new_pos, "_sin_offset") and new_pos.sin_offset == 2
    wrap = decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2
    assert wrap(old).config == wrap(new).config == DECODER


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_dropout_is_the_attention_dropout_from_a_model_as_from_a_config(kind, generation):
    """SONAR's released configs set every rate to 0.1; when they differ, a wrapped model and its
    config both take attention_dropout_p (not the embedding dropout)."""
    fx = load(kind)
    config = fx["config"] | {"emb_dropout_p": 0.3, "attention_dropout_p": 0.1, "activation_dropout_p": 0.2}
    model = fs2.build(kind, config, fx["state_dict"], generation)
    assert model.get_submodule(f"{kind}_frontend").dropout.p == 0.3  # the embedding dropout is there
    wrap = decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2
    assert wrap(model).config.dropout_p == 0.1 == from_fairseq2_config(config, kind).dropout_p


def test_a_config_of_the_other_kind_is_refused():
    """A decoder config read as an encoder's (or the reverse) would give the wrong max_seq_len."""
    dec, enc = load("decoder")["config"], load("encoder")["config"]
    with pytest.raises(ValueError, match="got a fairseq2 decoder config.*'pooling'.*kind='decoder'"):
        from_fairseq2_config(dec, "encoder")
    with pytest.raises(ValueError, match="got a fairseq2 encoder config.*'pooling'.*kind='encoder'"):
        from_fairseq2_config(enc, "decoder")
    with pytest.raises(ValueError, match="got a fairseq2 decoder config \\(a SonarTextDecoderConfig\\)"):
        from_fairseq2_config(fs2.config_from_dict(dec, fs2.SonarTextDecoderConfig), "encoder")
    with pytest.raises(ValueError, match="got a fairseq2 encoder config \\(a SonarTextEncoderConfig\\)"):
        from_fairseq2_config(fs2.config_from_dict(enc, fs2.SonarTextEncoderConfig), "decoder")


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
def test_the_wrong_model_raises_a_type_error_naming_what_was_expected(generation):
    dec = fs2.build("decoder", load("decoder")["config"], generation=generation)
    enc = fs2.build("encoder", load("encoder")["config"], generation=generation)
    with pytest.raises(TypeError, match="ConditionalTransformerDecoderModel.*SonarTextTransformerEncoderModel.*use encoder_from_fairseq2"):
        decoder_from_fairseq2(enc)
    with pytest.raises(TypeError, match="SonarTextTransformerEncoderModel.*ConditionalTransformerDecoderModel.*use decoder_from_fairseq2"):
        encoder_from_fairseq2(dec)
    for wrong in (torch.nn.Linear(2, 2), "text_sonar_basic_decoder", None):
        with pytest.raises(TypeError, match="model must be a loaded fairseq2/sonar ConditionalTransformerDecoderModel"):
            decoder_from_fairseq2(wrong)


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_a_model_without_a_pad_index_is_refused_naming_the_pad_index(kind, generation):
    config = _with_pad(load(kind)["config"], 3)  # = eos: VocabularyInfo drops it, as fairseq2's does
    if kind == "encoder":
        config["_from_fairseq"] = False  # sonar's factory asserts a pad index when it is set
    model = fs2.build(kind, config, generation=generation)
    wrap = decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2
    with pytest.raises(CheckpointError, match=r"no pad index \(vocab_info.pad_idx None"):
        wrap(model)


def test_what_sonarllm_does_not_implement_is_refused():
    dec, enc = load("decoder")["config"], load("encoder")["config"]
    for values, kind, field in ((dec | {"no_scale_embedding": True}, "decoder", "no_scale_embedding"),
                                (dec | {"activation_fn": "GELU"}, "decoder", "activation_fn"),
                                (dec | {"input_dim": 32}, "decoder", "input_dim"),
                                (enc | {"pooling": "last"}, "encoder", "pooling"),
                                (fs2.config_from_dict(_with_pad(enc, 3), fs2.SonarTextEncoderConfig), "encoder", "pad_idx")):  # fmt: skip
        # (a VocabularyInfo whose pad is its eos, 3, has no pad index)
        with pytest.raises(ValueError, match=field):
            from_fairseq2_config(values, kind)
        if kind == "decoder" or field == "pooling":
            with pytest.raises(CheckpointError, match="does not implement|shapes do not match"):
                (decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2)(fs2.build(kind, values))
    model = fs2.build("decoder", dec)
    model.normalize_emb = True
    with pytest.raises(CheckpointError, match="normalize_emb"):
        decoder_from_fairseq2(model)
    with pytest.raises(ValueError, match="kind must be 'decoder' or 'encoder'"):
        from_fairseq2_config(dec, "decoders")


# --- live: the real sonar-space / fairseq2 (reference environment only) -------------------------


@live_only
@pytest.mark.parametrize("pad_idx", [1, 0])
def test_live_fairseq2_models_convert_exactly(pad_idx):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(4, 300, (3, 9), generator=g)
    lens = [9, 4, 6]
    for kind in ("decoder", "encoder"):
        fx = load(kind)
        config = _with_pad(fx["config"], pad_idx)
        real = reference.build_decoder(config, fx["state_dict"]) if kind == "decoder" else reference.build_encoder(config, fx["state_dict"])
        ours = (decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2)(real, kernel_impl="torch")
        assert ours.config == from_fairseq2_config(config, kind) == dataclasses.replace(DECODER, legacy_pad_idx=pad_idx)
        if kind == "decoder":
            emb = torch.randn(3, 64, generator=g)
            want = torch.cat(unpadded(reference.decoder_forward(real, emb, tokens, lens)[1], lens))
            got = ours.logits(ours.hidden_states(emb, packed(tokens, lens)))
        else:
            want, got = reference.encoder_forward(real, tokens, lens)[0], ours(packed(tokens, lens))[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        mimic = fs2.build(kind, config, fx["state_dict"])  # the stand-in reads the same
        for path in ("embed.pad_idx", "pos_encoder.max_seq_len", "pos_encoder.sin_offset", "scale"):
            obj_real, obj_mimic = getattr(real, f"{kind}_frontend"), getattr(mimic, f"{kind}_frontend")
            for part in path.split("."):
                obj_real, obj_mimic = getattr(obj_real, part), getattr(obj_mimic, part)
            assert obj_real == obj_mimic, path
        assert real.state_dict().keys() == mimic.state_dict().keys()


@live_only
def test_live_fairseq2_config_objects_and_factory():
    from sonar.models.sonar_text import SonarTextEncoderFactory

    dec = reference.decoder_config_from_dict(load("decoder")["config"])
    assert from_fairseq2_config(dec, "decoder") == DECODER
    enc = reference.encoder_config_from_dict(load("encoder")["config"] | {"max_seq_len": 48})
    SonarTextEncoderFactory(enc)
    assert enc.max_seq_len == 50
    assert from_fairseq2_config(enc, "encoder", after_factory=True).max_seq_len == 48
    assert from_fairseq2_config(copy.deepcopy(load("encoder")["config"]), "encoder") == ENCODER

