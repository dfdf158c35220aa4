"""Held-out evaluation of a SONAR-LLM (docs/sonar-llm.md §2, §6.3).

Each document becomes its first ``max_sentences`` sentences plus "End of sequence." (exactly
as in training, ``document_sentences``), is SONAR-encoded and goes through one teacher-forced
forward pass; the prediction at position k - 1 is the model's guess for sentence k. From it:

* ``cross_entropy``: the training objective on held-out text, the token cross-entropy (nats)
  of every sentence k >= 1 (the end sentence included) decoded by the frozen SONAR decoder
  from the prediction at k - 1, averaged over all label tokens of all documents
  (``SonarTokenLoss``, same label convention as training: ``duplicate_eos``).
* ``cosine``: mean cosine similarity between those predictions and the true embeddings of
  sentences k >= 1.
* next-sentence ROUGE-L / BLEU (``sonarllm.metrics``), for two prefixes of a document with n
  sentences (end sentence not counted): ``short`` = the first 2 sentences, ``long`` = the first
  ``max(1, n // 2)``. The prediction after the prefix is beam-decoded and this *first generated
  sentence* is compared with the true next sentence; a document without a sentence after the
  prefix (n <= 2, resp. n == 1) is skipped and counted. The decoded sentence is used even when
  it is the end sentence (generation would stop there), so every prefix gets a hypothesis.
  Because the prefix embeddings are the document's own, this is what ``generate`` returns as
  the first sentence for the prompt ``" ".join(prefix)``. Each protocol also reports the
  cosine between that prediction and the true next embedding.

Optional embedding noise (``temperature``) is ``generate``'s (``perturb``), drawn from a
generator seeded with ``seed`` and (2 * document index + protocol), protocol 0 short, 1 long.

Shape legend: T packed sentences of a batch of documents, N predictions, E SONAR dim.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sonarllm import metrics
from sonarllm.generate import (
    GenerationOptions,
    check_inputs,
    decode_sentences,
    noise_generators,
    perturb,
)
from sonarllm.loss import SonarTokenLoss
from sonarllm.model import SonarLLM
from sonarllm.sonar.pipeline import SonarPipeline
from sonarllm.text import MAX_SENTENCES, document_sentences

PROTOCOLS = ("short", "long")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvalOptions:
    """What ``evaluate`` measures and how (defaults: the paper's protocol)."""

    max_documents: int | None = 512
    """Evaluate the first this many documents (the paper: 512 validation stories); None = all."""
    batch_size: int = 16
    """Documents per forward pass and per decoding batch."""
    beam_size: int = 5
    """SONAR decoder beam size for the next-sentence metrics."""
    max_tokens: int | None = None
    """Most tokens per decoded sentence (None: SONAR's default), as in GenerationOptions."""
    temperature: float = 0.0
    """Embedding noise before decoding (GenerationOptions.temperature); 0 = none."""
    seed: int = 0
    """Seed of that noise."""
    max_sentences: int = MAX_SENTENCES
    """Sentences kept per document before the end sentence (as in training)."""
    short_prefix: int = 2
    """Sentences in the short prefix (the paper: 2)."""
    duplicate_eos: bool = True
    """Label convention of the cross-entropy (the paper's code: True; see sonarllm/loss.py)."""
    nlg: bool = True
    """Compute the next-sentence ROUGE-L / BLEU (needs decoding and the eval extra)."""
    num_samples: int = 3
    """(prefix, prediction, reference) examples kept per protocol for the report."""
    lang: str | None = None
    """SONAR language code (None: the tokenizer's default)."""

    def __post_init__(self) -> None:
        if self.max_documents is not None and (
            not _is_int(self.max_documents) or self.max_documents < 1
        ):
            raise ValueError(
                f"EvalOptions.max_documents must be None or an int >= 1, got {self.max_documents!r}"
            )
        for name, low in (
            ("batch_size", 1),
            ("max_sentences", 1),
            ("short_prefix", 1),
            ("num_samples", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"EvalOptions.{name} must be an int >= {low}, got {value!r}")
        for name in ("duplicate_eos", "nlg"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EvalOptions.{name} must be a bool, got {getattr(self, name)!r}")
        try:  # beam_size, max_tokens, temperature, seed, lang: GenerationOptions' rules
            self.generation_options()
        except ValueError as exc:
            raise ValueError(str(exc).replace("GenerationOptions.", "EvalOptions.")) from None

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            beam_size=self.beam_size,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            lang=self.lang,
        )


class _Mean:
    """A running sum and count (float64)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, values: Iterable[float]) -> None:
        for v in values:
            self.total += float(v)
            self.count += 1

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class _Protocol:
    def __init__(self, name: str, prefix: str):
        self.name, self.prefix = name, prefix
        self.rouge_l, self.bleu, self.cosine = _Mean(), _Mean(), _Mean()
        self.skipped = 0
        self.samples: list[dict] = []

    def result(self) -> dict:
        return {
            "prefix": self.prefix,
            "documents": self.rouge_l.count,
            "skipped": self.skipped,
            "rouge_l": self.rouge_l.value,
            "bleu": self.bleu.value,
            "cosine": self.cosine.value,
            "samples": self.samples,
        }


def prefix_length(protocol: str, num_sentences: int, short_prefix: int = 2) -> int | None:
    """Prefix length of a protocol for a document of ``num_sentences`` sentences, or None when
    no sentence follows the prefix (the document is skipped)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    k = short_prefix if protocol == "short" else max(1, num_sentences // 2)
    return k if k < num_sentences else None


def _check(model, pipeline, options: EvalOptions) -> None:
    check_inputs(model, pipeline, options, EvalOptions, "evaluation")
    if options.max_sentences + 1 > model.config.max_seq_len:
        raise ValueError(
            f"EvalOptions.max_sentences = {options.max_sentences} (+ the end sentence) exceeds "
            f"the model's config.max_seq_len = {model.config.max_seq_len}"
        )
    if options.nlg:
        metrics.check_available()


@torch.inference_mode()
def _forward(model: SonarLLM, pipeline: SonarPipeline, docs: list[list[str]], lang):
    """SONAR embeddings [T, E] (float32) and predictions [T, E] of packed documents, and the
    offset of each document."""
    weight = model.input_proj.weight
    emb_TE = pipeline.encode([s for d in docs for s in d], lang, progress=False)
    lengths = torch.tensor([len(d) for d in docs])
    cu = F.pad(lengths.cumsum(0), (1, 0))
    x_TE = emb_TE.to(device=weight.device, dtype=weight.dtype)
    pred_TE = model(x_TE, cu_seqlens=cu.to(device=weight.device, dtype=torch.int32))
    return emb_TE.float(), pred_TE.float().to(emb_TE.device), cu.tolist()


def evaluate(
    model: SonarLLM,
    pipeline: SonarPipeline,
    documents: Iterable[str],
    options: EvalOptions | None = None,
) -> dict:
    """Evaluate ``model`` on held-out ``documents`` (texts); see the module docstring.

    Returns:
        a JSON-serialisable dict: ``documents`` (evaluated), ``empty_documents`` (no sentence,
        skipped), ``cross_entropy`` (nats per label token), ``target_tokens``,
        ``target_sentences``, ``cosine``, then per protocol (``short``, ``long``): ``prefix``,
        ``documents``, ``skipped``, ``rouge_l``, ``bleu`` (x100), ``cosine``, ``samples``;
        and ``options``. A mean over nothing is None.
    """
    options = EvalOptions() if options is None else options
    _check(model, pipeline, options)
    if isinstance(documents, str):
        raise TypeError("documents must be an iterable of texts, not a single str")
    gen = options.generation_options()
    loss_fn = SonarTokenLoss(
        pipeline.decoder,
        pipeline.tokenizer,
        duplicate_eos=options.duplicate_eos,
        kernel_impl=model.config.kernel_impl,
    )
    dec_weight = pipeline.decoder.output_weight
    ce_sum, ce_tokens, cos_all = 0.0, 0, _Mean()
    protocols = {
        "short": _Protocol("short", f"first {options.short_prefix} sentences"),
        "long": _Protocol("long", "first max(1, n//2) sentences"),
    }
    n_docs, n_empty = 0, 0
    texts = (
        iter(documents)
        if options.max_documents is None
        else itertools.islice(documents, options.max_documents)
    )
    while batch := list(itertools.islice(texts, options.batch_size)):
        docs, ids = [], []
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"documents must be texts (str), got {type(text).__name__}")
            sentences = document_sentences(text, max_sentences=options.max_sentences)
            if sentences:
                docs.append(sentences)
                ids.append(n_docs)
            else:
                n_empty += 1
            n_docs += 1
        if not docs:
            continue
        emb_TE, pred_TE, cu = _forward(model, pipeline, docs, options.lang)
        # teacher-forced positions: prediction at t - 1 for sentence t >= 1 of each document
        tgt_pos = [t for a, b in itertools.pairwise(cu) for t in range(a + 1, b)]
        tgt_T = torch.tensor(tgt_pos, device=emb_TE.device)
        with torch.inference_mode():
            targets = loss_fn.targets(
                [s for d in docs for s in d[1:]], options.lang, device=dec_weight.device
            )
            pred_NE = pred_TE[tgt_T - 1].to(device=dec_weight.device, dtype=dec_weight.dtype)
            ce_sum += float(loss_fn(pred_NE, targets, num_items=1))
        ce_tokens += targets.num_tokens
        cos_all.add(metrics.cosine(pred_TE[tgt_T - 1], emb_TE[tgt_T]).tolist())
        if options.nlg:
            _next_sentence(pipeline, docs, ids, pred_TE, emb_TE, cu, protocols, options, gen)
    results = {
        "documents": n_docs,
        "empty_documents": n_empty,
        "cross_entropy": ce_sum / ce_tokens if ce_tokens else None,
        "target_tokens": ce_tokens,
        "target_sentences": cos_all.count,
        "cosine": cos_all.value,
    }
    for name, proto in protocols.items():
        results[name] = proto.result() if options.nlg else None
    results["options"] = asdict(options)
    return results


def _next_sentence(pipeline, docs, ids, pred_TE, emb_TE, cu, protocols, options, gen) -> None:
    """Decode the prediction after each protocol's prefix and score it against the truth."""
    refs, pos, seeds, where = [], [], [], []
    for j, sentences in enumerate(docs):
        n = len(sentences) - 1  # the end sentence is not part of the story
        for p, name in enumerate(PROTOCOLS):
            k = prefix_length(name, n, options.short_prefix)
            if k is None:
                protocols[name].skipped += 1
                continue
            pos.append(cu[j] + k)  # the true next sentence; predicted at cu[j] + k - 1
            refs.append(sentences[k])
            seeds.append(2 * ids[j] + p)
            where.append((name, sentences[:k]))
    if not pos:
        return
    pos_N = torch.tensor(pos, device=pred_TE.device)
    pred_NE = pred_TE[pos_N - 1]
    with torch.inference_mode():
        noisy_NE = perturb(pred_NE, options.temperature, noise_generators(options.seed, seeds))
        hyps, _ = decode_sentences(pipeline, noisy_NE, gen)
    cos_N = metrics.cosine(pred_NE, emb_TE[pos_N]).tolist()
    for (name, prefix), hyp, ref, cos in zip(where, hyps, refs, cos_N, strict=True):
        proto = protocols[name]
        proto.rouge_l.add([metrics.rouge_l(hyp, ref)])
        proto.bleu.add([metrics.bleu(hyp, ref)])
        proto.cosine.add([cos])
        if len(proto.samples) < options.num_samples:
            proto.samples.append({"prefix": " ".join(prefix), "prediction": hyp, "reference": ref})


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """A plain-text table of ``evaluate``'s results for humans."""
    lines = [
        f"documents: {results['documents']} "
        f"({results['empty_documents']} without any sentence, skipped)",
        f"{'metric':<50} {'value':>10}  count",
        f"{'token cross-entropy (nats)':<50} {_fmt(results['cross_entropy'], 4):>10}  "
        f"{results['target_tokens']} tokens, {results['target_sentences']} sentences",
        f"{'cosine(predicted, true next)':<50} {_fmt(results['cosine'], 4):>10}  "
        f"{results['target_sentences']} sentences",
    ]
    for name in PROTOCOLS:
        proto = results.get(name)
        if proto is None:
            continue
        count = f"{proto['documents']} documents, {proto['skipped']} skipped"
        label = f"{name} prefix ({proto['prefix']})"
        lines.append(f"{'ROUGE-L, ' + label:<50} {_fmt(proto['rouge_l'], 2):>10}  {count}")
        lines.append(f"{'BLEU, ' + label:<50} {_fmt(proto['bleu'], 2):>10}  {count}")
        lines.append(f"{'cosine, ' + label:<50} {_fmt(proto['cosine'], 4):>10}  {count}")
    return "\n".join(lines)
