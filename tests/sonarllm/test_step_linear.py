"""The sliced projections of an incremental decoding step (sonarllm/sonar/step_linear.py):
against a float64 product, inside the decoder's ``step`` (logits equal to teacher forcing), in
beam search (the same hypotheses and scores as with the plain product), and, in the reference
environment, token-identical to fairseq2's generator at a vocabulary wide enough to be sliced."""

import pytest
import torch
import torch.nn.functional as F

from sonarllm.sonar import PackedBatch, SonarDecoder
from sonarllm.sonar import decoder as decoder_module
from sonarllm.sonar import layers as layers_module
from sonarllm.sonar import step_linear as step_linear_module
from sonarllm.sonar.generation import BeamSearchOptions, beam_search
from sonarllm.sonar.step_linear import sliced, step_linear
from tests.sonarllm.sonar_fixtures import live_only, reference
from tests.sonarllm.test_sonar_beam_parity import _random_decoder


@pytest.mark.parametrize("rows", [2, 5, 64, 256])
@pytest.mark.parametrize("features", [4096, 5000, 9217])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sliced_product_is_the_product(rows, features, with_bias):
    g = torch.Generator().manual_seed(rows * features)
    x_BD = torch.randn(rows, 48, generator=g)
    weight_OD = torch.randn(features, 48, generator=g)
    bias_O = torch.randn(features, generator=g) if with_bias else None
    assert sliced(x_BD, weight_OD)
    got = step_linear(x_BD, weight_OD, bias_O)
    plain = F.linear(x_BD, weight_OD, bias_O)
    exact = F.linear(x_BD.double(), weight_OD.double(), None if bias_O is None else bias_O.double())
    assert got.shape == (rows, features) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-5


@pytest.mark.parametrize(
    ("rows", "features", "dtype", "why"),
    [
        (1, 8192, torch.float32, "one row: slicing was not faster"),
        (257, 8192, torch.float32, "more rows than measured faster"),
        (5, 4095, torch.float32, "too narrow"),
        (5, 8192, torch.float64, "float64 not measured"),
        (5, 8192, torch.bfloat16, "bfloat16 not measured"),
    ],
)
def test_other_shapes_and_dtypes_take_the_plain_product(rows, features, dtype, why):
    x_BD = torch.randn(rows, 16, dtype=dtype)
    weight_OD = torch.randn(features, 16, dtype=dtype)
    assert not sliced(x_BD, weight_OD), why
    torch.testing.assert_close(step_linear(x_BD, weight_OD), F.linear(x_BD, weight_OD), rtol=0, atol=0)


def test_a_large_weight_is_sliced_up_to_more_rows():
    weight_OD = torch.empty(65_536, 1024)  # 256 MiB, never touched
    assert sliced(torch.empty(1280, 1024), weight_OD)
    assert not sliced(torch.empty(1281, 1024), weight_OD)
    assert not sliced(torch.empty(1, 1024), weight_OD)
    assert not sliced(torch.empty(300, 1024), weight_OD[:-1])  # just under 256 MiB: at most 256 rows


@pytest.mark.parametrize("grad", ["x", "weight", "bias"])
def test_a_product_that_records_a_gradient_is_plain_and_differentiable(grad):
    x_BD, weight_OD, bias_O = torch.randn(5, 16), torch.randn(4096, 16), torch.randn(4096)
    leaf = {"x": x_BD, "weight": weight_OD, "bias": bias_O}[grad].requires_grad_(True)
    assert not sliced(x_BD, weight_OD, bias_O)
    step_linear(x_BD, weight_OD, bias_O).square().sum().backward()
    out_BO = 2 * (x_BD @ weight_OD.t() + bias_O).detach()
    want = {"x": out_BO @ weight_OD, "weight": out_BO.t() @ x_BD, "bias": out_BO.sum(0)}[grad]
    torch.testing.assert_close(leaf.grad, want.detach())
    with torch.no_grad():
        assert sliced(x_BD, weight_OD, bias_O)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward-AD import
def test_autocast_forward_ad_and_unusual_shapes_take_the_plain_product():
    x_BD, weight_OD = torch.randn(5, 16), torch.randn(4096, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sliced(x_BD, weight_OD)
        assert step_linear(x_BD, weight_OD).dtype == F.linear(x_BD, weight_OD).dtype == torch.bfloat16
    with torch.autograd.forward_ad.dual_level():
        dual_BD = torch.autograd.forward_ad.make_dual(x_BD, torch.ones_like(x_BD))
        assert not sliced(dual_BD, weight_OD)
        tangent = torch.autograd.forward_ad.unpack_dual(step_linear(dual_BD, weight_OD)).tangent
        torch.testing.assert_close(tangent, torch.ones_like(x_BD) @ weight_OD.t())
    bias_1 = torch.randn(1)  # broadcast by F.linear
    assert not sliced(x_BD, weight_OD, bias_1)
    torch.testing.assert_close(step_linear(x_BD, weight_OD, bias_1), F.linear(x_BD, weight_OD, bias_1))
    weight_D = torch.randn(16)
    assert not sliced(torch.randn(5, 4096), torch.randn(4096))
    assert step_linear(x_BD, weight_D).shape == (5,)


def _wide_decoder(seed: int = 0) -> SonarDecoder:
    """A tiny decoder whose vocabulary and FFN are wide enough for the sliced path."""
    return _random_decoder(5000, seed, scale=0.3, ffn_dim=4096, max_seq_len=24)


def test_decoding_steps_equal_teacher_forcing_on_the_sliced_path(monkeypatch):
    dec = _wide_decoder()
    calls = []  # (module, sliced) of every step_linear call the decoder makes
    for module in (decoder_module, layers_module):
        monkeypatch.setattr(module, "step_linear", lambda *a, _m=module.__name__: calls.append((_m, sliced(*a))) or step_linear(*a))
    n, steps = 5, 6
    emb_ND = torch.randn(n, 32, generator=torch.Generator().manual_seed(1))
    tokens_NS = torch.randint(4, 5000, (n, steps), generator=torch.Generator().manual_seed(2))
    assert sliced(emb_ND, dec.output_weight) and sliced(emb_ND, dec.decoder.layers[0].ffn.inner_proj.weight)
    state = dec.start(emb_ND, steps)
    got_NSV = torch.stack([dec.step(tokens_NS[:, t], state) for t in range(steps)], dim=1)
    batch = PackedBatch.from_sequences(tokens_NS.tolist())
    want_NSV = dec.logits(dec.hidden_states(emb_ND, batch)).view(n, steps, -1)
    torch.testing.assert_close(got_NSV, want_NSV, rtol=1e-5, atol=1e-5)
    assert ("sonarllm.sonar.decoder", True) in calls and ("sonarllm.sonar.layers", True) in calls


def test_beam_search_is_the_same_with_the_plain_product(monkeypatch):
    dec = _wide_decoder(seed=3)
    with torch.no_grad():
        dec.output_weight[3] *= 3  # </s> wins at varied steps
    emb_ND = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    opts = BeamSearchOptions(beam_size=5, max_gen_len=(0, 14))
    got = beam_search(dec, emb_ND, [3, 9], options=opts)
    monkeypatch.setattr(step_linear_module, "MIN_FEATURES", 10**9)  # every product plain
    assert not sliced(emb_ND, dec.output_weight)
    want = beam_search(dec, emb_ND, [3, 9], options=opts)
    assert [[h.seq for h in row] for row in got] == [[h.seq for h in row] for row in want]
    for g_row, w_row in zip(got, want, strict=True):
        assert [h.score for h in g_row] == pytest.approx([h.score for h in w_row], abs=1e-5)
    assert len({len(h.seq) for row in got for h in row}) > 1, "the case should finish hypotheses at different steps"


@live_only
def test_live_beam_search_matches_fairseq2_on_the_sliced_path():
    from sonarllm.sonar import decoder_from_fairseq2

    cfg = reference.tiny_decoder_config(vocab_size=5000, model_dim=32, num_layers=2, num_heads=4, ffn_inner_dim=4096, max_seq_len=24)
    fs2 = reference.build_decoder(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in fs2.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = decoder_from_fairseq2(fs2)
    emb_ND = torch.randn(4, 32, generator=g)
    assert sliced(emb_ND.repeat(5, 1), ours.output_weight)
    vocab = {"size": 5000, "unk_idx": 1, "bos_idx": 2, "eos_idx": 3, "pad_idx": 0}
    want = reference.beam_search(fs2, emb_ND, [3, 9], vocab, beam_size=5, max_gen_len=(0, 12))
    got = beam_search(ours, emb_ND, [3, 9], options=BeamSearchOptions(beam_size=5, max_gen_len=(0, 12)))
    assert [[h.seq for h in row] for row in got] == [[[int(t) for t in w["seq"]] for w in row] for row in want]
