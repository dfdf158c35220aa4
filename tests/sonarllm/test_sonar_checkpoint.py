"""Loading SONAR weights from every layout: fairseq2, fairseq1 (sonar's converter, fixture
fs1_*.pt), Hugging Face M2M100 ports (checked against transformers), and the error cases."""

import json

import pytest
import torch

from sonarllm.sonar import (
    SONAR_CONFIGS,
    CheckpointError,
    PackedBatch,
    SonarDecoder,
    SonarEncoder,
    SonarTextConfig,
    load_sonar_decoder,
    load_sonar_encoder,
)
from sonarllm.sonar.checkpoint import FS1_TO_FS2, infer_config, to_fairseq2_state_dict
from sonarllm.sonar.config import from_fairseq2_config
from sonarllm.sonar.pipeline import SonarPipeline, SonarSpec
from tests.sonarllm.sonar_fixtures import FIXTURES, decoder, load, packed, unpadded


def _fs1_decoder_logits(dec):
    fx = load("fs1_load")
    h = dec.hidden_states(fx["decoder_embeddings"], packed(fx["decoder_tokens"], fx["decoder_seq_lens"]))
    return dec.logits(h), torch.cat(unpadded(fx["reference_decoder_logits"], fx["decoder_seq_lens"]))


def test_fairseq1_decoder_file_gives_fairseq2_logits():
    """The real-format (fairseq1 layout) file written by the fixture script, loaded by path."""
    cfg = from_fairseq2_config(load("fs1_load")["decoder_config"], "decoder")
    dec = load_sonar_decoder(FIXTURES / "fs1_decoder.pt", config=cfg, kernel_impl="torch")
    got, want = _fs1_decoder_logits(dec)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fairseq1_conversion_equals_fairseq2_converter_key_by_key():
    fx = load("fs1_load")
    ours = to_fairseq2_state_dict(torch.load(FIXTURES / "fs1_decoder.pt", weights_only=True), "decoder")
    theirs = {k: v for k, v in fx["decoder_state_dict_after_conversion"].items() if k != "final_proj.weight"}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_fairseq1_encoder_file_gives_the_encoder_fairseq2_saved():
    fx = load("fs1_load")
    cfg = from_fairseq2_config(fx["encoder_config"], "encoder")
    enc = load_sonar_encoder(FIXTURES / "fs1_encoder.pt", config=cfg, kernel_impl="torch")
    for key, value in fx["encoder_state_dict_fs2"].items():
        assert torch.equal(enc.state_dict()[key], value), key
    emb, _ = enc(packed(fx["encoder_tokens"], fx["encoder_seq_lens"]))
    torch.testing.assert_close(emb, fx["reference_sentence_embeddings"], atol=1e-5, rtol=1e-5)


def test_fairseq2_layout_round_trip_and_config_completion(tmp_path):
    fx = load("decoder")
    path = tmp_path / "dec.pt"
    torch.save({"model": dict(fx["state_dict"])}, path)
    with pytest.raises(CheckpointError, match=r"so its num_heads, max_seq_len, legacy_pad_idx cannot be known"):
        load_sonar_decoder(path)  # fairseq2 files record no config, and 64-d is no released architecture
    dec = load_sonar_decoder(path, config={"num_heads": 4, "max_seq_len": 64, "legacy_pad_idx": 1}, kernel_impl="torch")
    assert (dec.config.model_dim, dec.config.num_layers, dec.config.ffn_dim, dec.config.vocab_size) == (64, 2, 128, 307)
    h = dec.hidden_states(fx["embeddings"], packed(fx["tokens"], fx["seq_lens"]))
    torch.testing.assert_close(h, torch.cat(unpadded(fx["hidden"], fx["seq_lens"])), atol=1e-5, rtol=1e-5)


def test_hf_m2m100_port_matches_transformers():
    """A random transformers M2M100Decoder (HF/fairseq1 token order) loads and agrees with it."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Decoder

    cfg = transformers.M2M100Config(
        vocab_size=307, d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
        max_position_embeddings=64, scale_embedding=True, activation_function="relu", dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
    )
    torch.manual_seed(0)
    hf = M2M100Decoder(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(3)
    hf_tokens = torch.randint(4, 300, (3, 10), generator=g)
    hf_tokens[:, 0] = 2  # </s> in HF order (bos 0, pad 1, eos 2, unk 3)
    emb = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        want = hf(input_ids=hf_tokens, encoder_hidden_states=emb[:, None]).last_hidden_state
    sd = {f"model.decoder.{k}": v for k, v in hf.state_dict().items()}
    from sonarllm.sonar import SonarTextConfig

    ours = load_sonar_decoder(sd, config=SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128,
                                                        vocab_size=307, max_seq_len=64), kernel_impl="torch")
    fs2_tokens = hf_tokens.clone()
    fs2_tokens[hf_tokens == 2] = 3  # the same token in fairseq2 order
    got = ours.hidden_states(emb, packed(fs2_tokens, [10, 10, 10]))
    torch.testing.assert_close(got, want.reshape(-1, 64), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.output_weight[3], hf.embed_tokens.weight[2])  # eos row moved
    assert FS1_TO_FS2 == [1, 3, 0, 2]


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    fx = load("decoder")
    cfg = from_fairseq2_config(fx["config"], "decoder")
    sd = dict(fx["state_dict"])
    missing = {k: v for k, v in sd.items() if "layers.1.ffn" not in k}
    with pytest.raises(CheckpointError, match=r"missing \['decoder.layers.1.ffn"):
        load_sonar_decoder(missing, config=cfg)
    extra = sd | {"decoder.layers.0.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected \['decoder.layers.0.extra.weight'\]"):
        load_sonar_decoder(extra, config=cfg)
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_sonar_decoder(sd, config=from_fairseq2_config(fx["config"] | {"ffn_inner_dim": 256}, "decoder"))
    with pytest.raises(CheckpointError, match="SONAR encoder checkpoint, not a decoder"):
        load_sonar_decoder(load("encoder")["state_dict"])
    with pytest.raises(CheckpointError, match="unrecognised decoder checkpoint layout"):
        load_sonar_decoder({"foo": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_sonar_decoder(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save({"model": sd}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_sonar_decoder(truncated, config=cfg)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_sonar_decoder(garbage, config=cfg)
    untied = sd | {"final_proj.weight": sd["decoder_frontend.embed.weight"] + 1}
    with pytest.raises(CheckpointError, match="SONAR ties them"):
        load_sonar_decoder(untied, config=cfg)


def test_asset_names_resolve_to_the_right_kind():
    with pytest.raises(CheckpointError, match="is a SONAR encoder, not a decoder"):
        load_sonar_decoder("text_sonar_basic_encoder")
    assert isinstance(decoder(), SonarDecoder)


def test_full_hf_m2m100_port_loads_as_decoder_and_as_encoder():
    """A whole M2M100ForConditionalGeneration state dict (e.g. raxtemur/SONAR_200_text_decoder):
    each kind takes its half."""
    transformers = pytest.importorskip("transformers")
    from sonarllm.sonar import SonarTextConfig

    cfg = transformers.M2M100Config(
        vocab_size=307, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        scale_embedding=True, activation_function="relu", pad_token_id=1,
    )  # fmt: skip
    sd = transformers.M2M100ForConditionalGeneration(cfg).state_dict()
    ours = SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=307, max_seq_len=64)
    dec = load_sonar_decoder(sd, config=ours)
    enc = load_sonar_encoder(sd, config=ours)
    hf_embed = sd["model.decoder.embed_tokens.weight"]
    assert torch.equal(dec.output_weight[4:], hf_embed[4:]) and torch.equal(dec.output_weight[3], hf_embed[2])
    assert torch.equal(enc.encoder.layers[1].ffn.inner_proj.weight, sd["model.encoder.layers.1.fc1.weight"])


# --- checkpoints without a recorded configuration (fairseq2 files record none) ------------------

# Head dim 32 (not SONAR's 64), 40 positions, pad index 0: a model the weights alone do not describe
# (its vocabulary is the tiny SentencePiece model's with the 202 NLLB languages).
OTHER = SonarTextConfig(model_dim=64, num_layers=2, num_heads=2, ffn_dim=96, vocab_size=506, max_seq_len=40, legacy_pad_idx=0)
UNKNOWN = {"num_heads": 2, "max_seq_len": 40, "legacy_pad_idx": 0}


def _outputs(model, kind):
    g = torch.Generator().manual_seed(5)
    tokens = [torch.randint(4, 50, (n,), generator=g) for n in (40 if kind == "decoder" else 41, 7)]  # every position
    if kind == "decoder":
        return model.hidden_states(torch.randn(2, 64, generator=g), PackedBatch.from_sequences(tokens))
    return model(PackedBatch.from_sequences(tokens))[0]


def _other_checkpoint(tmp_path, kind):
    """A random model of OTHER's shape saved as fairseq2 saves one ({"model": state_dict}, no config)."""
    torch.manual_seed(0)
    model = (SonarDecoder if kind == "decoder" else SonarEncoder)(OTHER, kernel_impl="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / f"{kind}.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, _outputs(model, kind)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_checkpoint_of_another_shape_needs_its_config(tmp_path, kind):
    """Without a config the head count, length and pad index were guessed (64-d heads, 512, 1):
    outputs off by 0.2-0.3 with no warning. Now: an error naming them, or the right model."""
    load = load_sonar_decoder if kind == "decoder" else load_sonar_encoder
    path, want = _other_checkpoint(tmp_path, kind)
    with pytest.raises(CheckpointError) as err:
        load(path, kernel_impl="torch")
    message = str(err.value)
    assert "num_heads, max_seq_len, legacy_pad_idx cannot be known" in message
    assert "model_dim=64, num_layers=2, ffn_dim=96, vocab_size=506" in message and "sonar.json" in message
    with pytest.raises(ValueError, match="legacy_pad_idx must be a token id"):  # -1 would pad with the last row
        SonarTextConfig(legacy_pad_idx=-1)
    for config in (OTHER, UNKNOWN):  # a full config, or the fields the weights cannot give
        model = load(path, config=config, kernel_impl="torch")
        assert model.config == OTHER
        torch.testing.assert_close(_outputs(model, kind), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_sonar_json_beside_the_checkpoint_gives_its_config(tmp_path, kind):
    load = load_sonar_decoder if kind == "decoder" else load_sonar_encoder
    path, want = _other_checkpoint(tmp_path, kind)
    spec = {"tokenizer": "sonar_tokenizer", kind: "elsewhere.pt", f"{kind}_config": UNKNOWN}
    (tmp_path / "sonar.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="cannot be known"):  # it describes another file
        load(path)
    (tmp_path / "sonar.json").write_text(json.dumps(spec | {kind: path.name}))
    torch.testing.assert_close(_outputs(load(path, kernel_impl="torch"), kind), want, atol=1e-5, rtol=1e-5)
    elsewhere = tmp_path / "elsewhere" / "sonar.json"  # a spec kept elsewhere carries the config too
    elsewhere.parent.mkdir()
    SonarSpec(str(FIXTURES / "tiny_spm.model"), **{kind: str(path), f"{kind}_config": UNKNOWN}).save(elsewhere)
    pipe = SonarPipeline.from_spec(SonarSpec.load(elsewhere), kernel_impl="torch")
    torch.testing.assert_close(_outputs(getattr(pipe, kind), kind), want, atol=1e-5, rtol=1e-5)
    (tmp_path / "sonar.json").write_text(json.dumps(spec | {kind: path.name, f"{kind}_config": {"heads": 2}}))
    with pytest.raises(CheckpointError, match=f"{kind}_config must be an object of SonarTextConfig fields"):
        load(path)


def test_released_architecture_is_recognised_by_its_exact_sizes():
    basic = SONAR_CONFIGS["basic"]
    for kind in ("decoder", "encoder"):
        with torch.device("meta"):
            sd = {f"{kind}_frontend.embed.weight": torch.empty(256_206, 1024)}
            sd |= {f"{kind}.layers.{i}.ffn.inner_proj.weight": torch.empty(8192, 1024) for i in range(24)}
        assert infer_config(sd, kind) == basic
        with pytest.raises(CheckpointError, match="num_heads, max_seq_len, legacy_pad_idx cannot be known"):
            infer_config({k: v for k, v in sd.items() if ".23." not in k}, kind)  # 23 layers: not released


def test_fairseq1_and_hf_files_give_the_pad_index_and_a_stored_position_table_the_length():
    """fairseq's dictionary fixes pad = 1; a stored sinusoidal table (older transformers saved
    M2M100's) gives the length; a table of other values (learned positions) is refused."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    cfg = transformers.M2M100Config(vocab_size=307, d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                    decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    sd = transformers.M2M100ForConditionalGeneration(cfg).state_dict()
    with pytest.raises(CheckpointError, match=r"legacy_pad_idx=1\), so its num_heads, max_seq_len cannot"):
        load_sonar_decoder(sd)
    table = M2M100SinusoidalPositionalEmbedding.get_embedding(64 + 2, 64, 1)  # transformers' own table
    with_table = sd | {"model.decoder.embed_positions.weights": table, "model.encoder.embed_positions.weights": table}
    with pytest.raises(CheckpointError, match=r"max_seq_len=64\), so its num_heads cannot"):
        load_sonar_decoder(with_table)
    assert load_sonar_decoder(with_table, config={"num_heads": 4}).config.max_seq_len == 64
    assert load_sonar_encoder(with_table, config={"num_heads": 4}).max_len == 64  # the same 64 tokens
    learned = sd | {"model.decoder.embed_positions.weights": torch.randn(66, 64)}
    with pytest.raises(CheckpointError, match="not SONAR's sinusoidal position table"):
        load_sonar_decoder(learned, config={"num_heads": 4})
