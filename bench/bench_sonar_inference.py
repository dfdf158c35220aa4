"""SONAR inference and the training loss, ours against sonar-space / fairseq2 (issue 28).

Ours is timed everywhere. When ``sonar`` is importable (the separate reference venv of
the shared environment notes, §3: sonar-space 0.5.0, fairseq2 0.8.1, torch 2.9.1), the fairseq2 side runs
in the same test, interleaved with ours round by round (pytest-benchmark's ``setup`` hook times
it), on the same random-weight model (ours wraps the fairseq2 modules' weights without copying),
with the same threads; outputs are compared (beam search: token-identical; encoder: embeddings;
loss: the loss value) and each test records fairseq2's median and the ratio in ``extra_info``.

* ``beam``: beam-5 search (and greedy at 64 embeddings) from N sentence embeddings, ours
  ``beam_search`` against fairseq2's ``BeamSearchSeq2SeqGenerator`` as SONAR's
  ``EmbeddingToTextModelPipeline`` builds it, both given the same N embeddings in one call;
  also beam 5 at 1 and 5 embeddings with the released decoder's shape.
* ``encoder``: sentences/s of ``SonarEncoder.encode_tokens`` (packed) against the model part of
  SONAR's ``TextToEmbeddingModelPipeline.predict`` (sentences sorted by length, batches of
  ``batch_size``, right-padded, ``model(seqs, layout)``) at several batch sizes; tokenisation is
  left out on both sides.
* ``step_linear``: one wide projection of a decoding step (``sonarllm.sonar.step_linear``,
  sliced into 1,024 output features) against the plain ``F.linear``, interleaved, at the row
  counts of beam search (peer ``plain``; the ratio is plain ÷ sliced).
* ``loss``: forward + backward to the predicted embeddings of the SONAR-LLM loss, ours
  (``SonarTokenLoss``: packed, closed-form cross-attention, fused cross-entropy) against the
  official recipe (fairseq2 ``decode`` + ``project`` + materialised logits + ``cross_entropy``);
  time and peak memory. An official problem whose logits cannot fit is skipped with its size;
  ``loss_accumulated`` runs the official recipe where it does not fit in micro-batches with
  gradient accumulation (same loss and gradient, compared), against ours in one batch.

    pytest bench/bench_sonar_inference.py --benchmark [--bench-size full] [--bench-jsonl FILE]
    PYTHONPATH=. /path/to/.venv-sonar/bin/python -m pytest bench/bench_sonar_inference.py --benchmark ...

Sizes: "ci" is a 64-d toy (seconds); "full" is the issue's decoder (512-d, 6 layers, 8 heads,
FFN 2,048, V = 32,000), the released decoder and encoder shapes (1024-d, 24 layers, 16 heads, FFN 8,192,
V = 256,206) and the loss at the released vocabulary (V = 256,206) with the 512-d decoder, at 64
(where the official recipe's logits fit in memory; 5 rounds), 512 and 2,048 target
sentences (1 round).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._harness import has_peer, measure_interleaved, peak_memory_mb
from bench.bench_sonar_loss import story_lengths
from sonarllm.loss import SonarTargets, SonarTokenLoss
from sonarllm.sonar import SonarDecoder, SonarEncoder, SonarTextConfig
from sonarllm.sonar.generation import BeamSearchOptions, beam_search
from sonarllm.sonar.step_linear import sliced, step_linear

LIVE = has_peer("sonar", "fairseq2")
EOS, UNK, PAD, LANG = 3, 1, 0, 9  # the tokenizer's ids (SONAR pipelines pass the tokenizer's vocab info)
ROUNDS = 5

_TINY = dict(model_dim=64, num_layers=2, num_heads=4, ffn_dim=128, vocab_size=1000, max_seq_len=64)
SIZES = {
    "ci": {
        "decoder": _TINY, "beam_batches": (1, 5), "max_gen_len": (0, 8),
        "encoder": _TINY, "encoder_sentences": 32, "encoder_batches": (5, 32),
        "loss_decoder": _TINY | {"vocab_size": 2000}, "loss_sentences": (16,), "loss_accumulated": ((16, 4),),
        "step_linear": [(4096, 64, 5)], "released_decoder": _TINY | {"vocab_size": 5000, "ffn_dim": 4096},
    },
    "full": {
        "decoder": dict(model_dim=512, num_layers=6, num_heads=8, ffn_dim=2048, vocab_size=32_000, max_seq_len=512),
        "beam_batches": (1, 5, 64, 256), "max_gen_len": (0, 12),
        "encoder": dict(model_dim=1024, num_layers=24, num_heads=16, ffn_dim=8192, vocab_size=256_206, max_seq_len=512),
        "encoder_sentences": 24, "encoder_batches": (5, 24),
        "loss_decoder": dict(model_dim=512, num_layers=6, num_heads=8, ffn_dim=2048, vocab_size=256_206, max_seq_len=512),
        "released_decoder": dict(model_dim=1024, num_layers=24, num_heads=16, ffn_dim=8192, vocab_size=256_206, max_seq_len=512),
        "loss_sentences": (64, 512, 2048), "loss_accumulated": ((512, 64),),
        # (output features, input features, rows): the vocabulary projections of the and
        # the released decoder, and the released FFN's inner projection, at beam search's rows
        "step_linear": [(32_000, 512, b) for b in (1, 5, 25, 64, 128, 256, 320)]
        + [(256_206, 1024, b) for b in (1, 5, 25, 64, 128, 256, 320, 640, 1280)] + [(8192, 1024, b) for b in (5, 25, 64)],
    },
}  # fmt: skip


def _size(request) -> dict:
    return SIZES[request.config.getoption("--bench-size")]


def pytest_generate_tests(metafunc):
    size = SIZES[metafunc.config.getoption("--bench-size", default="ci")]
    if "beam_case" in metafunc.fixturenames:
        cases = [(5, n) for n in size["beam_batches"]] + [(1, max(size["beam_batches"][-1] // 4, 1))]
        metafunc.parametrize("beam_case", cases, ids=lambda c: f"beam{c[0]}-n{c[1]}")
    if "fs2_batch" in metafunc.fixturenames:
        metafunc.parametrize("fs2_batch", size["encoder_batches"], ids=lambda b: f"fs2batch{b}")
    if "linear_case" in metafunc.fixturenames:
        metafunc.parametrize("linear_case", size["step_linear"], ids=lambda c: f"O{c[0]}-D{c[1]}-B{c[2]}")
    if "accumulated_case" in metafunc.fixturenames:
        metafunc.parametrize("accumulated_case", size["loss_accumulated"], ids=lambda c: f"{c[0]}sent-micro{c[1]}")
    if "loss_sentences" in metafunc.fixturenames:
        metafunc.parametrize("loss_sentences", size["loss_sentences"], ids=lambda n: f"{n}sent")


# --- models: fairseq2's when importable (ours wraps its weights), else ours alone -----------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights, scaled so that the softmax is not flat and </s> wins at varied steps
    (LayerNorm weights 1 + N(0, 0.2), biases N(0, 0.1), matrices N(0, 0.2))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_((0.2 if p.dim() >= 2 else 0.1) * noise)


def _models(kind: str, sizes: dict):
    """(ours, fairseq2's or None) with the same weights."""
    if not LIVE:
        cfg = SonarTextConfig(**sizes, dropout_p=0.0)
        ours = SonarDecoder(cfg) if kind == "decoder" else SonarEncoder(cfg)
        _randomize(ours, 0)
        return ours, None
    from sonarllm.sonar import decoder_from_fairseq2, encoder_from_fairseq2
    from tests.fixtures import sonar_reference as ref

    args = dict(vocab_size=sizes["vocab_size"], model_dim=sizes["model_dim"], num_layers=sizes["num_layers"],
                num_heads=sizes["num_heads"], ffn_inner_dim=sizes["ffn_dim"], max_seq_len=sizes["max_seq_len"])  # fmt: skip
    if kind == "decoder":
        fs2 = ref.build_decoder(ref.tiny_decoder_config(**args))
    else:
        fs2 = ref.build_encoder(ref.tiny_encoder_config(**args))
    _randomize(fs2, 0)
    ours = (decoder_from_fairseq2 if kind == "decoder" else encoder_from_fairseq2)(fs2)
    return ours, fs2


# --- beam search --------------------------------------------------------------------------------


def _fs2_beam(fs2, emb_ND, options: BeamSearchOptions, vocab: int):
    from tests.fixtures import sonar_reference as ref

    vocab_info = {"size": vocab, "unk_idx": UNK, "bos_idx": 2, "eos_idx": EOS, "pad_idx": PAD}
    return ref.beam_search(fs2, emb_ND, [EOS, LANG], vocab_info, beam_size=options.beam_size,
                           max_gen_len=options.max_gen_len)  # fmt: skip


def _beam_benchmark(benchmark, request, decoder_sizes: dict, beam: int, n: int, label: str) -> None:
    """Beam search (greedy at beam 1) from n random embeddings, ours and fairseq2's interleaved."""
    size = _size(request)
    ours, fs2 = _models("decoder", decoder_sizes)
    emb_ND = torch.randn(n, ours.config.model_dim, generator=torch.Generator().manual_seed(n))
    options = BeamSearchOptions(beam_size=beam, max_gen_len=size["max_gen_len"])
    run_ours = lambda: beam_search(ours, emb_ND, [EOS, LANG], eos_idx=EOS, unk_idx=UNK, pad_idx=PAD, options=options)
    run_fs2 = None if fs2 is None else (lambda: _fs2_beam(fs2, emb_ND, options, ours.config.vocab_size))
    got = run_ours() if benchmark.enabled else benchmark.pedantic(run_ours, rounds=1, iterations=1)
    lengths = [len(h.seq) for row in got for h in row]
    if fs2 is not None:
        want = run_fs2()
        assert [[h.seq for h in row] for row in got] == [[w["seq"].tolist() for w in row] for row in want]
    if not benchmark.enabled:  # --benchmark-disable (CI): the call above was the smoke test
        return
    benchmark.group = f"sonar-beam-{request.config.getoption('--bench-size')}-{label}beam{beam}-n{n}"
    benchmark.extra_info.update(sentences=n, beam=beam, mean_hypothesis_tokens=round(sum(lengths) / len(lengths), 1),
                                identical_to_fairseq2=fs2 is not None, vocab=ours.config.vocab_size,
                                model_dim=ours.config.model_dim, layers=ours.config.num_layers)  # fmt: skip
    benchmark.extra_info.update(measure_interleaved(benchmark, run_ours, run_fs2, device="cpu", rounds=ROUNDS, peer="fairseq2"))
    if benchmark.stats:
        benchmark.extra_info["sentences_per_s"] = round(n / benchmark.stats.stats.median, 2)


def test_sonar_beam_search(benchmark, request, beam_case):
    beam, n = beam_case
    _beam_benchmark(benchmark, request, _size(request)["decoder"], beam, n, "")


@pytest.mark.parametrize("n", [1, 5])
def test_sonar_beam_search_released_decoder(benchmark, request, n):
    """Beam 5 with the released decoder's shape (``released_decoder``: 1024-d, 24 layers, V = 256,206)."""
    _beam_benchmark(benchmark, request, _size(request)["released_decoder"], 5, n, "released-")


# --- the sliced projections of a decoding step ------------------------------------------------------


def test_step_linear_vs_plain(benchmark, request, linear_case):
    features, dim, rows = linear_case
    g = torch.Generator().manual_seed(rows)
    weight_OD = 0.2 * torch.randn(features, dim, generator=g)
    x_BD = torch.randn(rows, dim, generator=g)
    run_ours = lambda: step_linear(x_BD, weight_OD)
    run_plain = lambda: F.linear(x_BD, weight_OD)
    got = run_ours() if benchmark.enabled else benchmark.pedantic(run_ours, rounds=1, iterations=1)
    torch.testing.assert_close(got, run_plain(), rtol=1e-5, atol=1e-5)
    if not benchmark.enabled:
        return
    benchmark.group = f"sonar-step-linear-O{features}-D{dim}-B{rows}"
    benchmark.extra_info.update(rows=rows, features=features, dim=dim, sliced=sliced(x_BD, weight_OD),
                                threads=torch.get_num_threads())  # fmt: skip
    rounds = 15 if rows * features * dim < 2e10 else 3  # from 128 rows of the released vocabulary: 3
    benchmark.extra_info.update(measure_interleaved(benchmark, run_ours, run_plain, device="cpu", rounds=rounds, peer="plain"))


# --- encoder ------------------------------------------------------------------------------------


def _fs2_encode(fs2, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    """The model part of SONAR's TextToEmbeddingModelPipeline.predict: length-sorted batches of
    ``batch_size``, right-padded with the pad index, then the inverse order."""
    from fairseq2.nn import BatchLayout

    order = torch.argsort(torch.tensor([len(s) for s in seqs]))
    out = []
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            batch = [seqs[i] for i in order[start : start + batch_size].tolist()]
            width = max(map(len, batch))
            tokens = torch.tensor([s + [PAD] * (width - len(s)) for s in batch])
            out.append(fs2(tokens, BatchLayout.of(tokens, seq_lens=[len(s) for s in batch])).sentence_embeddings)
    return torch.cat(out)[torch.argsort(order)]


@pytest.fixture(scope="module")
def encoder_pair(request):
    return _models("encoder", _size(request)["encoder"])


def test_sonar_encoder_vs_fairseq2(benchmark, request, encoder_pair, fs2_batch):
    size = _size(request)
    ours, fs2 = encoder_pair
    n = size["encoder_sentences"]
    g = torch.Generator().manual_seed(3)
    seqs = [[LANG] + torch.randint(4, ours.config.vocab_size, (length - 2,), generator=g).tolist() + [EOS]
            for length in story_lengths(n, seed=3)]  # fmt: skip
    run_ours = lambda: ours.encode_tokens(seqs, progress=False)
    run_fs2 = None if fs2 is None else (lambda: _fs2_encode(fs2, seqs, fs2_batch))
    got = run_ours() if benchmark.enabled else benchmark.pedantic(run_ours, rounds=1, iterations=1)
    max_diff = None
    if fs2 is not None:  # float32 rounding grows with depth (fairseq2 at batch 5 vs 24: 6e-5 of the scale)
        want = run_fs2()
        max_diff = float((got - want).abs().max() / want.abs().max())
        assert max_diff < 5e-4, f"embeddings differ from fairseq2's by {max_diff:.2e} of their largest value"
    if not benchmark.enabled:
        return
    benchmark.extra_info["max_relative_difference"] = max_diff
    benchmark.group = f"sonar-encoder-{request.config.getoption('--bench-size')}-d{ours.config.model_dim}-fs2batch{fs2_batch}"
    benchmark.extra_info.update(sentences=n, tokens=sum(map(len, seqs)), fairseq2_batch=fs2_batch,
                                threads=torch.get_num_threads())  # fmt: skip
    benchmark.extra_info.update(measure_interleaved(benchmark, run_ours, run_fs2, device="cpu", rounds=ROUNDS, peer="fairseq2"))
    if benchmark.stats:
        per_s = n / benchmark.stats.stats.median
        benchmark.extra_info.update(sentences_per_s=round(per_s, 2), sentences_per_s_per_core=round(per_s / torch.get_num_threads(), 2))


# --- training loss at the released vocabulary ---------------------------------------------------


def _official_loss(fs2, pred_ND, seqs) -> torch.Tensor:
    """The official recipe: right-padded teacher forcing through fairseq2's decoder, materialised
    [N, L, V] logits, token cross-entropy (labels: the sequence shifted by one, then </s>)."""
    from fairseq2.nn import BatchLayout

    width = max(map(len, seqs))
    tokens = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s[1:] + [EOS] + [-100] * (width - len(s)) for s in seqs])
    memory = pred_ND.unsqueeze(1)
    hidden = fs2.decode(tokens, BatchLayout.of(tokens, seq_lens=[len(s) for s in seqs]), memory, BatchLayout.of(memory))
    logits = fs2.project(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def official_logits_bytes(n: int, width: int, vocab: int) -> int:
    """float32 logits [N, L, V], the cross-entropy's log-softmax and the logits' gradient."""
    return 3 * n * width * vocab * 4


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


@pytest.fixture(scope="module")
def loss_pair(request):
    ours, fs2 = _models("decoder", _size(request)["loss_decoder"])
    if fs2 is not None:
        for p in fs2.parameters():
            p.requires_grad_(False)
    return ours, fs2


def _loss_problem(ours, n: int):
    """n story-length target sentences (token lists), predicted embeddings [n, D] to
    differentiate, and our loss's targets."""
    lengths = story_lengths(n, seed=1)
    g = torch.Generator().manual_seed(1)
    vocab = ours.config.vocab_size
    seqs = [[EOS, LANG] + torch.randint(10, vocab, (length - 3,), generator=g).tolist() + [EOS] for length in lengths]
    pred_ND = torch.randn(n, ours.config.model_dim, generator=g).requires_grad_(True)
    return seqs, pred_ND, SonarTargets.from_target_sequences(seqs, EOS)


def test_sonar_loss_vs_official(benchmark, request, loss_pair, loss_sentences):
    ours, fs2 = loss_pair
    n, vocab = loss_sentences, ours.config.vocab_size
    seqs, pred_ND, targets = _loss_problem(ours, n)
    lengths = [len(s) for s in seqs]
    loss_fn = SonarTokenLoss(ours)
    need = official_logits_bytes(n, max(lengths), vocab)
    fits = need < 0.8 * _available_bytes()

    def run_ours():
        pred_ND.grad = None
        loss = loss_fn(pred_ND, targets)
        loss.backward()
        return loss.detach()

    def run_official():
        pred_ND.grad = None
        loss = _official_loss(fs2, pred_ND, seqs)
        loss.backward()
        return loss.detach()

    run_fs2 = run_official if fs2 is not None and fits else None
    if not benchmark.enabled:
        got = benchmark.pedantic(run_ours, rounds=1, iterations=1)
    elif run_fs2 is not None:  # a call of each to compare (and warm up)
        got = run_ours()
    if run_fs2 is not None:
        torch.testing.assert_close(got, run_fs2(), atol=1e-4, rtol=1e-5)
    if not benchmark.enabled:
        return
    benchmark.group = f"sonar-loss-{request.config.getoption('--bench-size')}-d{ours.config.model_dim}-V{vocab}-{n}sent"
    benchmark.extra_info.update(sentences=n, target_tokens=targets.num_tokens, padded_tokens=n * max(lengths),
                                official_logits_gib=round(need / 2**30, 1), official_fits=fits)  # fmt: skip
    benchmark.extra_info["peak_mem_mib"] = round(peak_memory_mb(run_ours, "cpu"), 1)
    if run_fs2 is not None:
        benchmark.extra_info["official_peak_mem_mib"] = round(peak_memory_mb(run_fs2, "cpu"), 1)
    # the largest problems take minutes per call on a CPU: fewer rounds (ours alone there)
    rounds = ROUNDS if n <= 64 else 1
    benchmark.extra_info.update(measure_interleaved(benchmark, run_ours, run_fs2, device="cpu", rounds=rounds, peer="fairseq2"))
    if benchmark.stats:
        benchmark.extra_info["target_tokens_per_s"] = round(targets.num_tokens / benchmark.stats.stats.median)


def test_sonar_loss_vs_official_accumulated(benchmark, request, loss_pair, accumulated_case):
    """The official recipe made to fit: micro-batches of ``micro`` sentences, each one's summed
    token cross-entropy over the whole problem's target tokens, gradients accumulated: the same
    loss and gradient as one batch. Ours takes all n sentences at once."""
    ours, fs2 = loss_pair
    n, micro = accumulated_case
    seqs, pred_ND, targets = _loss_problem(ours, n)
    loss_fn = SonarTokenLoss(ours)

    def run_ours():
        pred_ND.grad = None
        loss = loss_fn(pred_ND, targets)
        loss.backward()
        return loss.detach(), pred_ND.grad.clone()

    def run_official():
        pred_ND.grad = None
        total = 0.0
        for start in range(0, n, micro):
            chunk = seqs[start : start + micro]
            tokens = sum(map(len, chunk))
            loss = _official_loss(fs2, pred_ND[start : start + micro], chunk) * (tokens / targets.num_tokens)
            loss.backward()
            total += loss.detach().item()
        return torch.tensor(total), pred_ND.grad.clone()

    run_fs2 = run_official if fs2 is not None else None
    got = run_ours() if benchmark.enabled else benchmark.pedantic(run_ours, rounds=1, iterations=1)
    if run_fs2 is not None:
        want = run_fs2()
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-3)
    if not benchmark.enabled:
        return
    benchmark.group = f"sonar-loss-accumulated-{request.config.getoption('--bench-size')}-{n}sent-micro{micro}"
    benchmark.extra_info.update(sentences=n, official_micro_batch=micro, target_tokens=targets.num_tokens)
    rounds = ROUNDS if n <= 64 else 1
    benchmark.extra_info.update(measure_interleaved(benchmark, run_ours, run_fs2, device="cpu", rounds=rounds, peer="fairseq2"))
