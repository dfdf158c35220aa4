"""Loading SONAR weights from every layout: fairseq2, fairseq1 (sonar's converter, fixture
fs1_*.pt), Hugging Face M2M100 ports (checked against transformers), and the error cases."""

import pytest
import torch

from sonarllm.sonar import (
    CheckpointError,
    SonarDecoder,
    decoder_from_fairseq2,
    load_sonar_decoder,
    load_sonar_encoder,
)
from sonarllm.sonar.checkpoint import FS1_TO_FS2, to_fairseq2_state_dict
from sonarllm.sonar.config import from_fairseq2_config
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


def test_fairseq2_layout_round_trip_and_config_inference(tmp_path):
    fx = load("decoder")
    path = tmp_path / "dec.pt"
    torch.save({"model": dict(fx["state_dict"])}, path)
    dec = load_sonar_decoder(path, kernel_impl="torch")  # sizes read off the weights
    assert (dec.config.model_dim, dec.config.num_layers, dec.config.ffn_dim, dec.config.vocab_size) == (64, 2, 128, 307)
    assert dec.config.num_heads == 1  # 64 / SONAR's head size 64: pass a config for other layouts
    dec = load_sonar_decoder(path, config=from_fairseq2_config(fx["config"], "decoder"), kernel_impl="torch")
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


def test_wrapping_a_fairseq2_model_shares_its_weights():
    """decoder_from_fairseq2 takes any module with fairseq2's decoder names (ours has them)."""
    fs2_like = decoder()
    wrapped = decoder_from_fairseq2(fs2_like, kernel_impl="torch")
    assert wrapped.output_weight.data_ptr() == fs2_like.output_weight.data_ptr()
    assert wrapped.config.num_heads == 4


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
