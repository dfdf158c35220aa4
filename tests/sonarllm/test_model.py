"""The concept transformer (sonarllm.model) and its configuration (sonarllm.config).

Everything runs on the toy flavour (or a variant with head_dim != model_dim / num_heads), on the
CPU suite's default kernel path ("torch", see conftest.py), except the Llama equivalence test,
which uses the plain "reference" attention in float64 so that the two sides share no kernel.

Shape legend: B documents, S sentences, E SONAR dim, T packed positions.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from sonarllm_kernels._dispatch import is_interpreter, triton_available
from sonarllm.config import PAPER_TRAINABLE_PARAMS, SONARLLM_CONFIGS, SonarLLMConfig
from sonarllm.model import CONFIG_NAME, WEIGHTS_NAME, KVCache, SonarLLM, rope_inv_freq, rope_tables
from sonarllm.normalizer import SonarNormalizer

E = 64  # the toy flavour's sonar_dim


def toy(**overrides) -> SonarLLM:
    return SonarLLM(SonarLLMConfig.from_name("toy", **overrides))


def ragged(lengths, dim=E, dtype=torch.float32):
    """Documents of the given lengths: (padded [B, S, E] with zero padding, packed [T, E], cu)."""
    docs = [torch.randn(n, dim, dtype=dtype) for n in lengths]
    padded = torch.zeros(len(lengths), max(lengths), dim, dtype=dtype)
    for b, d in enumerate(docs):
        padded[b, : len(d)] = d
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return padded, torch.cat(docs), cu


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("name", sorted(PAPER_TRAINABLE_PARAMS))
def test_preset_trainable_parameters_match_the_paper(name):
    cfg = SonarLLMConfig.from_name(name)
    model = SonarLLM(cfg, device="meta")
    n = model.num_trainable_parameters()
    # Independent count: blocks (q/k/v/o, SwiGLU, two norms) + final norm + two projections.
    d, a, f = cfg.model_dim, cfg.attn_dim, cfg.ffn_dim
    blocks = cfg.num_layers * (4 * d * a + 3 * d * f + 2 * d)
    assert n == blocks + d + (cfg.sonar_dim * d + d) + (d * cfg.sonar_dim + cfg.sonar_dim)
    assert abs(n / PAPER_TRAINABLE_PARAMS[name] - 1) <= 0.02, (
        f"{name}: {n:,} vs paper {PAPER_TRAINABLE_PARAMS[name]:,}"
    )


def test_preset_layouts():
    assert SonarLLMConfig.from_name("600M").attn_dim == 26 * 64 != 1280
    assert SonarLLMConfig.from_name("900M").attn_dim == 32 * 64
    assert SonarLLMConfig.from_name("100M").head_dim == 32
    assert set(SONARLLM_CONFIGS) == {"toy", "39M", "100M", "300M", "600M", "900M", "1.3B"}
    assert SonarLLMConfig.from_name("toy").sonar_dim == E
    # head_dim is re-derived when a preset without an explicit one is resized
    assert SonarLLMConfig.from_name("100M", model_dim=1024).head_dim == 64


def test_config_dict_round_trip():
    cfg = SonarLLMConfig.from_name("600M", use_normalizer=True, objective="mse", rope_scaling=None)
    again = SonarLLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown SonarLLMConfig keys.*'hidden_size'"):
        SonarLLMConfig.from_dict({**cfg.to_dict(), "hidden_size": 3})
    with pytest.raises(ValueError, match="unknown SonarLLM config name"):
        SonarLLMConfig.from_name("7B")
    with pytest.raises(ValueError, match="unknown SonarLLMConfig overrides.*'layers'"):
        SonarLLMConfig.from_name("toy", layers=3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("sonar_dim", 0),
        ("model_dim", 63.5),
        ("num_layers", True),
        ("num_heads", -1),
        ("ffn_dim", "big"),
        ("max_seq_len", 0),
        ("head_dim", 15),
        ("rms_norm_eps", 0.0),
        ("rope_theta", float("inf")),
        ("init_std", -0.02),
        ("use_normalizer", 1),
        ("objective", "ce"),
        ("kernel_impl", "cuda"),
        ("rope_scaling", {"factor": 8.0}),
        (
            "rope_scaling",
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        (
            "rope_scaling",
            {
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8,
            },
        ),
        (
            "rope_scaling",
            {
                "factor": 0.5,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SonarLLMConfig.from_name("toy", **{field: value})


def test_config_head_dim_must_divide_without_explicit_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        SonarLLMConfig(model_dim=100, num_heads=3)
    assert SonarLLMConfig(model_dim=100, num_heads=3, head_dim=32).attn_dim == 96


# ---------------------------------------------------------------------------------------------
# RoPE


def test_rope_inv_freq_hand_computed():
    # plain RoPE: theta ** (-2i / K)
    torch.testing.assert_close(
        rope_inv_freq(8, 10000.0, None), torch.tensor([1.0, 0.1, 0.01, 0.001])
    )
    # llama3 with original_max 64, low 1, high 4, factor 8: wavelengths 2*pi*[1, 10, 100, 1000]
    # against 64 / 4 = 16 and 64 / 1 = 64 -> keep, smooth, divide, divide.
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    smooth = (64 / (2 * math.pi * 10) - 1.0) / (4.0 - 1.0)
    want = [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]
    got = rope_inv_freq(8, 10000.0, SonarLLMConfig(rope_scaling=scaling).rope_scaling)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)


def _hf_rope(tf, cfg) -> dict:
    """LlamaConfig RoPE arguments: transformers 5 groups them in rope_parameters, 4.x does not."""
    if int(tf.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("scaled", [True, False])
def test_rope_matches_transformers(head_dim, scaled):
    tf = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = SonarLLMConfig(
        model_dim=4 * head_dim,
        num_heads=4,
        rope_scaling=None if not scaled else SonarLLMConfig().rope_scaling,
    )
    hf_cfg = tf.LlamaConfig(
        hidden_size=cfg.model_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072,
        **_hf_rope(tf, cfg),
    )
    hf = LlamaRotaryEmbedding(hf_cfg)
    inv = rope_inv_freq(head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(inv, hf.inv_freq)
    x = torch.zeros(1, 3, 33, head_dim)
    cos_hf, sin_hf = hf(x, torch.arange(33)[None])
    cos, sin = rope_tables(inv, 33, torch.device("cpu"))
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


# ---------------------------------------------------------------------------------------------
# Numerics: equivalence with transformers' Llama


def test_blocks_equal_transformers_llama_model():
    """Copy the blocks into an HF LlamaModel (inputs_embeds, no token embedding) and compare the
    final hidden states: float64, head_dim != model_dim / num_heads, llama3 RoPE, 40 positions."""
    tf = pytest.importorskip("transformers")
    cfg = SonarLLMConfig.from_name("toy", num_heads=4, head_dim=24, kernel_impl="reference")
    model = SonarLLM(cfg, dtype=torch.float64)
    with torch.no_grad():  # larger weights than the init, so that every sub-layer matters
        for p in model.layers.parameters():
            p.normal_(0, 0.2)
    hf_cfg = tf.LlamaConfig(
        vocab_size=8,
        hidden_size=cfg.model_dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=131072,
        **_hf_rope(tf, cfg),
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    hf = tf.LlamaModel(hf_cfg).to(torch.float64).eval()
    core = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("input_proj.", "output_proj."))
    }
    missing, unexpected = hf.load_state_dict(core, strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []

    x_BSE = torch.randn(2, 40, E, dtype=torch.float64)
    with torch.no_grad():
        want = model.output_proj(hf(inputs_embeds=model.input_proj(x_BSE)).last_hidden_state)
        got = model(x_BSE)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_initialisation():
    model = SonarLLM(SonarLLMConfig.from_name("toy", model_dim=256, ffn_dim=512, init_std=0.05))
    w = torch.cat(
        [p.flatten() for n, p in model.layers.named_parameters() if n.endswith("proj.weight")]
    )
    assert abs(w.std().item() - 0.05) < 0.002 and abs(w.mean().item()) < 0.002
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    for proj in (model.input_proj, model.output_proj):  # nn.Linear's kaiming-uniform init
        bound = 1 / math.sqrt(proj.in_features)
        assert proj.weight.abs().max() <= bound and proj.bias.abs().max() <= bound
        assert proj.weight.std() > bound / 3


# ---------------------------------------------------------------------------------------------
# Causality and layouts


def test_causality_padded_and_packed():
    model = toy()
    x_BSE = torch.randn(2, 9, E)
    base = model(x_BSE)
    for t in (0, 4, 7):
        x2 = x_BSE.clone()
        x2[:, t + 1] += 1.0
        out = model(x2)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"prediction <= {t} changed"
        assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().amax(dim=-1).min() > 0
    # packed: changing document 0 changes nothing in document 1
    _, x_TE, cu = ragged([5, 4])
    base = model(x_TE, cu_seqlens=cu)
    x2 = x_TE.clone()
    x2[3] += 1.0
    out = model(x2, cu_seqlens=cu)
    assert torch.equal(out[:3], base[:3]) and torch.equal(out[5:], base[5:])


def test_packed_equals_padded():
    model = toy()
    lengths = [7, 1, 4, 6]
    x_BSE, x_TE, cu = ragged(lengths)
    pad = model(x_BSE)
    packed = model(x_TE, cu_seqlens=cu)
    packed2 = model(x_TE, cu_seqlens=cu, max_seqlen=7)
    assert torch.equal(packed, packed2)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(packed[cu[b] : cu[b + 1]], pad[b, :n], rtol=1e-5, atol=1e-6)


def test_backward_and_gradient_checkpointing():
    model = toy()
    x_BSE = torch.randn(2, 6, E)
    model(x_BSE).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()
    model(x_BSE).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def test_autocast_forward_backward_and_cache():
    model = toy(use_normalizer=True)
    x_BSE = torch.randn(2, 5, E)
    want = model(x_BSE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x_BSE)
        got.float().square().sum().backward()
        cache = model.new_cache(2, 6)
        pred = model.prefill(x_BSE, cache)
        model.step(x_BSE[:, 0], cache)
    assert got.dtype == torch.bfloat16 and model.input_proj.weight.grad is not None
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    torch.testing.assert_close(pred.float(), want, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Incremental generation


def _full_predictions(model, docs):
    return [model(d[None])[0] for d in docs]


@pytest.mark.parametrize("packed_prompts", [False, True])
def test_kv_cache_matches_full_forward_with_ragged_prompts(packed_prompts):
    model = toy()
    total = [9, 6, 9]
    prompt = [3, 1, 5]
    docs = [torch.randn(n, E) for n in total]
    want = _full_predictions(model, docs)
    cache = model.new_cache(3, 10)
    if packed_prompts:
        cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
        pred = model.prefill(
            torch.cat([d[:p] for d, p in zip(docs, prompt, strict=True)]), cache, cu_seqlens=cu
        )
        got_prompt = [pred[cu[b] : cu[b + 1]] for b in range(3)]
    else:
        x_BSE = torch.zeros(3, 5, E)
        for b, (d, p) in enumerate(zip(docs, prompt, strict=True)):
            x_BSE[b, :p] = d[:p]
        x_BSE[1, 1:] = 123.0  # padding content must not matter
        pred = model.prefill(x_BSE, cache, lengths=torch.tensor(prompt))
        assert torch.all(pred[1, 1:] == 0)
        got_prompt = [pred[b, :p] for b, p in enumerate(prompt)]
    for b, p in enumerate(prompt):
        torch.testing.assert_close(got_prompt[b], want[b][:p], rtol=1e-5, atol=1e-6)
    assert cache.host_lengths == prompt and cache.lengths_B.tolist() == prompt
    pos = list(prompt)
    for _ in range(4):  # each document continues with its own next sentence
        step_in = torch.stack([docs[b][pos[b]] for b in range(3)])
        out = model.step(step_in, cache)
        for b in range(3):
            torch.testing.assert_close(out[b], want[b][pos[b]], rtol=1e-5, atol=1e-6)
        pos = [p + 1 for p in pos]
    assert cache.host_lengths == pos


def test_kv_cache_chunked_prefill_zero_lengths_and_select():
    model = toy()
    docs = [torch.randn(8, E) for _ in range(3)]
    want = _full_predictions(model, docs)
    cache = model.new_cache(3, 8)
    x_BSE = torch.stack([d[:4] for d in docs])
    model.prefill(x_BSE, cache, lengths=[2, 0, 4])  # document 1 receives nothing yet
    pred = model.prefill(
        torch.stack([docs[0][2:5], docs[1][0:3], docs[2][4:7]]), cache
    )  # appends 3 each
    torch.testing.assert_close(pred[0], want[0][2:5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred[1], want[1][0:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred[2], want[2][4:7], rtol=1e-5, atol=1e-6)
    sub = cache.select([2, 0])  # drop document 1, reorder
    assert sub.host_lengths == [7, 5] and sub.batch_size == 2
    out = model.step(torch.stack([docs[2][7], docs[0][5]]), sub)
    torch.testing.assert_close(out, torch.stack([want[2][7], want[0][5]]), rtol=1e-5, atol=1e-6)
    assert cache.host_lengths == [5, 3, 7]  # the original is untouched
    with pytest.raises(ValueError, match="index values must be in"):
        cache.select([3])
    with pytest.raises(ValueError, match="non-empty"):
        cache.select([])


@pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or is_interpreter()),
    reason="needs Triton, on CUDA or under TRITON_INTERPRET=1",
)
def test_triton_kernels_forward_and_ragged_cache():
    """The cache's interleaved document / gap segments (empty query segments) on the Triton
    attention kernel, and the fused normalizer projections, against the reference paths."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = (
        dict(rtol=5e-3, atol=5e-3) if device == "cuda" else dict(rtol=1e-4, atol=1e-5)
    )  # TF32 dots on GPU
    cfg = SonarLLMConfig.from_name("toy", num_layers=1, kernel_impl="triton", use_normalizer=True)
    model = SonarLLM(cfg, device=device)
    model.set_normalizer(SonarNormalizer(E).fit(torch.randn(64, E)))
    ref = SonarLLM(cfg.replace(kernel_impl="reference"), device=device)
    ref.load_state_dict(model.state_dict())
    docs = [torch.randn(n, E, device=device) for n in (6, 3, 5)]
    want = [ref(d[None])[0] for d in docs]
    x_TE, cu = torch.cat(docs), torch.tensor([0, 6, 9, 14], dtype=torch.int32, device=device)
    torch.testing.assert_close(model(x_TE, cu_seqlens=cu), torch.cat(want), **tol)
    cache = model.new_cache(3, 8)
    prompt = [4, 1, 3]
    x_BSE = torch.zeros(3, 4, E, device=device)
    for b, p in enumerate(prompt):
        x_BSE[b, :p] = docs[b][:p]
    pred = model.prefill(x_BSE, cache, lengths=prompt)
    for b, p in enumerate(prompt):
        torch.testing.assert_close(pred[b, :p], want[b][:p], **tol)
    out = model.step(torch.stack([docs[b][p] for b, p in enumerate(prompt)]), cache)
    torch.testing.assert_close(out, torch.stack([want[b][p] for b, p in enumerate(prompt)]), **tol)


def test_kv_cache_errors():
    model = toy()
    cache = model.new_cache(2, 3)
    assert isinstance(cache, KVCache) and cache.capacity == 3 and cache.dtype == torch.float32
    model.prefill(torch.randn(2, 3, E), cache, lengths=[3, 1])
    with pytest.raises(ValueError, match="capacity 3 exceeded: document 0"):
        model.step(torch.randn(2, E), cache)
    assert cache.host_lengths == [3, 1]  # a refused call changes nothing
    with pytest.raises(ValueError, match="cache holds 2 documents"):
        model.step(torch.randn(3, E), cache)
    with pytest.raises(ValueError, match="embeds must have shape"):
        model.step(torch.randn(2, E + 1), cache)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(2, 129)
    with pytest.raises(ValueError, match="batch_size"):
        model.new_cache(0)
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(torch.randn(2, 3, E), model.new_cache(2, 4), lengths=[4, 1])
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.step(torch.randn(2, E), None)
    with pytest.raises(ValueError, match="not made for this model"):
        toy(num_layers=3).step(torch.randn(2, E), cache)


# ---------------------------------------------------------------------------------------------
# Input validation


def test_forward_input_errors():
    model = toy()
    with pytest.raises(
        ValueError, match=r"embeds must have shape \[B, S, E\] with E = sonar_dim = 64"
    ):
        model(torch.randn(2, 3, E + 1))
    with pytest.raises(ValueError, match="packed .* needs cu_seqlens"):
        model(torch.randn(5, E))
    with pytest.raises(TypeError, match="embeds must be a torch.Tensor"):
        model([[0.0] * E])
    with pytest.raises(TypeError, match="embeds dtype torch.float64 must equal the model's dtype"):
        model(torch.randn(1, 2, E, dtype=torch.float64))
    with pytest.raises(ValueError, match="exceeds config.max_seq_len"):
        model(torch.randn(1, 129, E))
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        model(torch.randn(5, E), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to embeds.shape"):
        model(torch.randn(5, E), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen is only used with cu_seqlens"):
        model(torch.randn(1, 5, E), max_seqlen=5)


# ---------------------------------------------------------------------------------------------
# Normalizer inside the model


def test_model_normalizer_is_fused_and_stays_float32():
    model = toy(use_normalizer=True)
    x_BSE = torch.randn(2, 5, E) * 0.01 + 0.003
    identity = model(x_BSE)  # identity normalizer until set
    norm = SonarNormalizer(E).fit(torch.randn(500, E) * 0.006 + 0.002)
    model.set_normalizer(norm)
    got = model(x_BSE)
    assert not torch.allclose(got, identity)
    # the same network without a normalizer, fed normalized inputs, denormalized afterwards
    plain = toy()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.endswith(("center", "scale"))}
    )
    torch.testing.assert_close(
        got, norm.denormalize(plain(norm.normalize(x_BSE))), rtol=1e-4, atol=1e-6
    )
    back = model.get_normalizer()
    assert torch.equal(back.center, norm.center) and torch.equal(back.scale, norm.scale)
    model.to(torch.bfloat16)
    assert model.input_proj.weight.dtype == torch.bfloat16
    assert model.input_proj.scale.dtype == torch.float32 and torch.equal(
        model.output_proj.scale, norm.scale
    )
    assert toy().get_normalizer() is None
    with pytest.raises(ValueError, match="use_normalizer"):
        toy().set_normalizer(norm)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_round_trip(tmp_path):
    model = toy(use_normalizer=True)
    model.set_normalizer(SonarNormalizer(E).fit(torch.randn(100, E)))
    x_BSE = torch.randn(2, 4, E)
    want = model(x_BSE)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        CONFIG_NAME,
        WEIGHTS_NAME,
    ]  # no temp files
    loaded = SonarLLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded(x_BSE), want)
    assert all(p.requires_grad for p in loaded.parameters())
    half = SonarLLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.bfloat16, kernel_impl="reference"
    )
    assert (
        half.input_proj.weight.dtype == torch.bfloat16
        and half.input_proj.center.dtype == torch.float32
    )
    assert half.config.kernel_impl == "reference"
    # saving again over an existing checkpoint replaces it
    toy(use_normalizer=True).save_pretrained(tmp_path / "ckpt")
    assert not torch.equal(SonarLLM.from_pretrained(tmp_path / "ckpt")(x_BSE), want)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from sonarllm.model import io as model_mod

    old = toy()
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(state, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        toy(num_layers=3).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    SonarLLM.from_pretrained(tmp_path)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SonarLLM.from_pretrained(tmp_path / "nope")
    toy().save_pretrained(tmp_path)
    cfg_path, w_path = tmp_path / CONFIG_NAME, tmp_path / WEIGHTS_NAME
    good_cfg, good_w = cfg_path.read_text(), w_path.read_bytes()

    def with_config(**changes):
        cfg_path.write_text(json.dumps({**json.loads(good_cfg), **changes}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # config drift warnings, tested below
        with_config(num_layers=3)
        with pytest.raises(
            ValueError, match=r"does not match the weights.*missing keys \(9: \['layers\.2\."
        ):
            SonarLLM.from_pretrained(tmp_path)
        with_config(num_layers=1)
        with pytest.raises(ValueError, match=r"unexpected keys \(9: \['layers\.1\."):
            SonarLLM.from_pretrained(tmp_path)
        with_config(ffn_dim=128)
        with pytest.raises(
            ValueError,
            match=r"shape mismatches .*layers\.0\.mlp\.down_proj\.weight: \(64, 160\) in the file, \(64, 128\)",
        ):
            SonarLLM.from_pretrained(tmp_path)
        with_config(use_normalizer=True)
        with pytest.raises(ValueError, match=r"missing keys \(4: \['input_proj.center'"):
            SonarLLM.from_pretrained(tmp_path)
        with_config(num_heads=0)
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            SonarLLM.from_pretrained(tmp_path)
        with_config(colour="blue")
        with pytest.raises(ValueError, match="unknown SonarLLMConfig keys"):
            SonarLLM.from_pretrained(tmp_path)
    with_config(rms_norm_eps=1e-5)  # loads (shapes agree) but warns
    with pytest.warns(RuntimeWarning, match=r"differs from the config saved .* \['rms_norm_eps'\]"):
        SonarLLM.from_pretrained(tmp_path)
    with_config(kernel_impl="reference")  # not a drift
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SonarLLM.from_pretrained(tmp_path)

    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        SonarLLM.from_pretrained(tmp_path)
    cfg_path.write_text(good_cfg)
    w_path.write_bytes(good_w[: len(good_w) // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        SonarLLM.from_pretrained(tmp_path)
    w_path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        SonarLLM.from_pretrained(tmp_path)
    w_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors' is missing"):
        SonarLLM.from_pretrained(tmp_path)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        SonarLLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="meta device"):
        SonarLLM(SonarLLMConfig.from_name("toy"), device="meta").save_pretrained(tmp_path)


def test_training_forward_after_generation_under_inference_mode():
    """The RoPE tables cached by a first call under inference_mode must serve later training."""
    model = SonarLLM(SonarLLMConfig.from_name("toy", kernel_impl="torch"))
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
