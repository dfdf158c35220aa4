"""Text generation with a trained SONAR-LLM, one sentence at a time (docs/sonar-llm.md §5).

    prompt text --split_sentences--> sentences --SONAR encoder--> embeddings [n, E]
    loop:  concept transformer (KV cache) --> predicted next embedding [E]
           (+ optional Gaussian noise, ``GenerationOptions.temperature``)
           --SONAR decoder beam search--> sentence --SONAR encoder--> re-encoded embedding [E]
           stop if cos(re-encoded, e("End of sequence.")) >= eos_threshold (not emitted)
           else emit the sentence and append the *re-encoded* vector to the context

as the reference ``generate.py`` does, with two differences: the context is kept in a KV cache
(``SonarLLM.prefill`` / ``step``) instead of re-running the whole prefix every step (the
reference's behaviour is ``recompute=True``, kept to test that both agree), and a batch of
prompts of different lengths runs together: ragged prefill, one ``step`` per generated sentence
for the prompts still running, ``KVCache.select`` to drop finished ones.

Counting (``max_sentences``, default 32, the paper's T_max): prompt sentences plus generated
sentences never exceed ``max_sentences``; a prompt that already has that many gets nothing. (The
reference loop ``while len(sents) <= 32`` lets a document reach 33 sentences; we use the paper's
"32 sentences" and the training data's cap.)

Begin sentence: a model with ``config.add_begin`` (the Hugging Face checkpoints' ``add_begin``,
the paper's ``--add_begin_text``) gets "Begin of text." before every prompt in its context. It is
never emitted, is not part of ``GeneratedText.prompt_sentences`` and does not count towards
``max_sentences``.

Noise (``temperature`` T >= 0, default 0 = deterministic): before decoding, each predicted
embedding p [E] becomes ``p + T * rms(p) * z`` with ``rms(p) = sqrt(mean_i p_i^2)`` and
``z ~ N(0, I_E)`` (float32), so T is the noise-to-signal ratio per dimension (the noise norm is
about ``T * ||p||``). z is drawn on the CPU from a generator private to each prompt, seeded
with ``seed * 1_000_003 + prompt index``: results depend on (seed, prompt index) only, not on
the device, on batching, or on when other prompts finish. The noisy vector is only decoded;
the context gets the re-encoded sentence as always.

Repetition control (off by default, so the paper's algorithm is the default): with
``no_repeat_sentences`` k >= 1, a decoded sentence whose re-encoded embedding has a cosine >=
``repeat_threshold`` with one of the document's last k sentences (prompt sentences included) is
a repeat. It is decoded again from ``p + repeat_noise * rms(p) * z`` (fresh z each time, from a
second generator private to the prompt, seeded from (seed, prompt index) like the first) up to
``repeat_retries`` times; a sentence that is still a repeat ends the prompt with stop reason
"repetition" (not emitted). A redraw that is the end sentence ends it with "eos".

Pure steps in gpt-fast style: ``split_prompts``, ``prefill``, ``predict_next`` (KV cache) or
``predict_recomputed`` (full forward), ``perturb``, ``decode_sentences``, ``should_stop``,
``is_repeat``;
``stream`` runs the loop and yields sentences as they are produced, ``generate`` collects them.

Shape legend: B prompts still running, E SONAR dim, T packed prompt sentences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from sonarllm.generate_options import (  # noqa: F401 (re-exported: the options and results of this module's functions)
    _REPEAT_SEED_OFFSET,
    _SEED_STRIDE,
    MAX_SEED,
    REFERENCE_MAX_SEQ_LEN,
    STOP_EOS,
    STOP_MAX_SENTENCES,
    STOP_REPETITION,
    GeneratedText,
    GenerationOptions,
    StreamedSentence,
)
from sonarllm.model import KVCache, SonarLLM
from sonarllm.sonar.pipeline import SonarPipeline
from sonarllm.text import BEGIN_SENTENCE, split_sentences

# ---------------------------------------------------------------------------------------------
# Pure steps


def split_prompts(prompts: Sequence[str]) -> list[list[str]]:
    """Sentences of each prompt; raises ValueError naming an empty prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of str (one text per prompt), not a single str")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty (got an empty list)")
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(text).__name__}")
        sentences = split_sentences(text)
        if not sentences:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one sentence")
        out.append(sentences)
    return out


def _packed(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed [T, E], int32 cu_seqlens [B + 1] and each document's last row [B]."""
    x_TE = torch.cat(list(embeds))
    lengths = torch.tensor([len(e) for e in embeds], dtype=torch.int64)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=x_TE.device, dtype=torch.int32)
    return x_TE, cu, cu[1:].long() - 1


def prefill(
    model: SonarLLM, embeds: Sequence[torch.Tensor], capacity: int
) -> tuple[torch.Tensor, KVCache]:
    """Put B prompts (embeddings [n_b, E] each, in the model's dtype and device) into a new
    KV cache of ``capacity`` sentences per prompt; returns the predicted next embedding of each
    prompt [B, E] and the cache."""
    x_TE, cu, last_B = _packed(embeds)
    cache = model.new_cache(len(embeds), capacity)
    pred_TE = model.prefill(x_TE, cache, cu_seqlens=cu)
    return pred_TE[last_B], cache


def predict_next(model: SonarLLM, new_BE: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Append one sentence embedding per prompt to the cache; the next predictions [B, E]."""
    return model.step(new_BE, cache)


@torch.no_grad()
def predict_recomputed(model: SonarLLM, contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The next predictions [B, E] from a full forward over each whole context [n_b, E] (the
    reference's no-cache loop)."""
    x_TE, cu, last_B = _packed(contexts)
    return model(x_TE, cu_seqlens=cu)[last_B]


def noise_generators(seed: int, indices: Sequence[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded from (seed, prompt index) only (plus ``offset``
    for a second, independent stream)."""
    return [torch.Generator().manual_seed(offset + seed * _SEED_STRIDE + i) for i in indices]


def perturb(
    pred_BE: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """``p + T * rms(p) * z`` per row, z ~ N(0, I) from that row's generator (float32). T = 0
    returns the predictions (as float32) without drawing."""
    pred_BE = pred_BE.float()
    if temperature == 0:
        return pred_BE
    if len(generators) != pred_BE.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} for {pred_BE.shape[0]}")
    width = pred_BE.shape[1]
    z_BE = torch.stack([torch.randn(width, generator=g) for g in generators]).to(pred_BE.device)
    rms_B1 = pred_BE.pow(2).mean(dim=1, keepdim=True).sqrt()
    return pred_BE + temperature * rms_B1 * z_BE


def decode_sentences(
    pipeline: SonarPipeline, emb_BE: torch.Tensor, options: GenerationOptions
) -> tuple[list[str], list[float]]:
    """Beam-search each embedding to text; returns the best sentences and their scores."""
    hyps = pipeline.decode_hypotheses(emb_BE, options.lang, options.beam_search_options())
    texts = [pipeline.tokenizer.decode(h[0].seq) for h in hyps]
    return texts, [float(h[0].score) for h in hyps]


def should_stop(emb_BE: torch.Tensor, eos_E: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Bool [B]: cos(emb_b, eos) >= threshold (all False when threshold is None)."""
    if threshold is None:
        return torch.zeros(emb_BE.shape[0], dtype=torch.bool, device=emb_BE.device)
    cos_B = F.cosine_similarity(emb_BE.float(), eos_E.float().to(emb_BE.device)[None], dim=-1)
    return cos_B >= threshold


def is_repeat(emb_E: torch.Tensor, recent_KE: torch.Tensor, threshold: float) -> bool:
    """Whether cos(emb, one of the K recent embeddings) >= threshold (False when K = 0)."""
    if recent_KE.shape[0] == 0:
        return False
    cos_K = F.cosine_similarity(emb_E.float()[None], recent_KE.float().to(emb_E.device), dim=-1)
    return bool((cos_K >= threshold).any())


def _redraw_repeats(pipeline, pred_BE, step, recent, generators, eos_E, options) -> list[bool]:
    """Repetition control for one step: decode each repeat again from a noisy prediction, up
    to ``repeat_retries`` times, updating the step's (texts, scores, new_BE, eos_B) in place;
    returns which rows are still repeats."""
    texts, scores, new_BE, eos_B = step
    k, threshold = options.no_repeat_sentences, options.repeat_threshold
    repeat = [
        not eos_B[j] and is_repeat(new_BE[j], recent[j][-k:], threshold) for j in range(len(texts))
    ]
    for _ in range(options.repeat_retries):
        rows = [j for j, r in enumerate(repeat) if r]
        if not rows:
            break
        noisy_RE = perturb(pred_BE[rows], options.repeat_noise, [generators[j] for j in rows])
        texts_R, scores_R = decode_sentences(pipeline, noisy_RE, options)
        emb_RE = pipeline.encode(texts_R, options.lang)
        eos_R = should_stop(emb_RE, eos_E, options.eos_threshold).tolist()
        for i, j in enumerate(rows):
            texts[j], scores[j], new_BE[j], eos_B[j] = texts_R[i], scores_R[i], emb_RE[i], eos_R[i]
            repeat[j] = not eos_R[i] and is_repeat(emb_RE[i], recent[j][-k:], threshold)
    return repeat


# ---------------------------------------------------------------------------------------------
# The loop


def check_inputs(model, pipeline, options, options_type: type, task: str) -> None:
    """Type checks shared by generation and evaluation; both need the encoder and the decoder."""
    if not isinstance(model, SonarLLM):
        raise TypeError(f"model must be a SonarLLM, got {type(model).__name__}")
    if not isinstance(pipeline, SonarPipeline):
        raise TypeError(f"pipeline must be a SonarPipeline, got {type(pipeline).__name__}")
    if not isinstance(options, options_type):
        raise TypeError(f"options must be {options_type.__name__}, got {type(options).__name__}")
    if pipeline.encoder is None or pipeline.decoder is None:
        raise ValueError(f"{task} needs a pipeline with both a SONAR encoder and a decoder")


def begin_sentences(model: SonarLLM) -> list[str]:
    """The sentences put before every prompt: ["Begin of text."] for a model with
    ``config.add_begin`` (the paper's ``--add_begin_text``), else none."""
    return [BEGIN_SENTENCE] if model.config.add_begin else []


def _check(model: SonarLLM, pipeline: SonarPipeline, options: GenerationOptions) -> None:
    check_inputs(model, pipeline, options, GenerationOptions, "generation")
    context = options.max_sentences - 1 + len(begin_sentences(model))
    if context > model.config.max_seq_len:
        raise ValueError(
            f"GenerationOptions.max_sentences = {options.max_sentences} needs a context of "
            f"{context} sentences; the model takes at most "
            f"config.max_seq_len = {model.config.max_seq_len}"
        )


def _events(model, pipeline, prompt_sentences, offset, options) -> Iterator[tuple]:
    """Run one batch of prompts (global indices ``offset + b``); yields ("sentence", index,
    text, score) as sentences are produced and ("stop", index, reason) when a prompt ends.
    Computation runs under ``torch.inference_mode``, which is never held across a yield."""
    weight = model.input_proj.weight
    to_model = lambda t: t.to(device=weight.device, dtype=weight.dtype)
    n_prompt = [len(s) for s in prompt_sentences]
    for b, n in enumerate(n_prompt):  # prompts that are already long enough get nothing
        if n >= options.max_sentences:
            yield ("stop", offset + b, STOP_MAX_SENTENCES)
    active = [b for b, n in enumerate(n_prompt) if n < options.max_sentences]
    if not active:
        return
    begin = begin_sentences(model)  # context only: never emitted, not counted in max_sentences
    n_context = [len(begin) + n_prompt[b] for b in active]
    with torch.inference_mode():
        flat = [s for b in active for s in (*begin, *prompt_sentences[b])]
        emb = pipeline.encode(flat, options.lang)
        eos_E = pipeline.encode([options.eos_sentence], options.lang)[0]
        contexts = list(to_model(emb).split(n_context))
        if options.recompute:
            pred_BE, cache = predict_recomputed(model, contexts), None
        else:
            pred_BE, cache = prefill(model, contexts, options.max_sentences - 1 + len(begin))
    generators = noise_generators(options.seed, [offset + b for b in active])
    control = options.no_repeat_sentences > 0
    if control:  # the document's recent sentence embeddings [<= k, E], and the redraws' noise
        k = options.no_repeat_sentences
        recent = [e[len(begin):][-k:].float() for e in emb.split(n_context)]
        redraw_gens = noise_generators(
            options.seed, [offset + b for b in active], _REPEAT_SEED_OFFSET
        )
    total = [n_prompt[b] for b in active]
    while True:
        with torch.inference_mode():
            noisy_BE = perturb(pred_BE, options.temperature, generators)
            texts, scores = decode_sentences(pipeline, noisy_BE, options)
            new_BE = pipeline.encode(texts, options.lang)
            eos_B = should_stop(new_BE, eos_E, options.eos_threshold).tolist()
            repeat_B = [False] * len(active)
            if control:
                step = (texts, scores, new_BE, eos_B)
                repeat_B = _redraw_repeats(
                    pipeline, pred_BE, step, recent, redraw_gens, eos_E, options
                )
        keep = []
        for j, b in enumerate(active):
            if eos_B[j] or repeat_B[j]:
                yield ("stop", offset + b, STOP_EOS if eos_B[j] else STOP_REPETITION)
                continue
            yield ("sentence", offset + b, texts[j], scores[j])
            if control:
                recent[j] = torch.cat([recent[j], new_BE[j : j + 1].float()])[-k:]
            total[j] += 1
            if total[j] >= options.max_sentences:
                yield ("stop", offset + b, STOP_MAX_SENTENCES)
            else:
                keep.append(j)
        if not keep:
            return
        active = [active[j] for j in keep]
        generators = [generators[j] for j in keep]
        if control:
            recent = [recent[j] for j in keep]
            redraw_gens = [redraw_gens[j] for j in keep]
        total = [total[j] for j in keep]
        with torch.inference_mode():
            new_BE = to_model(new_BE[keep])
            if options.recompute:
                contexts = [torch.cat([contexts[j], new_BE[i : i + 1]]) for i, j in enumerate(keep)]
                pred_BE = predict_recomputed(model, contexts)
            else:
                if len(keep) < cache.batch_size:
                    cache = cache.select(keep)
                pred_BE = predict_next(model, new_BE, cache)


def _prepare(model, pipeline, prompts, options) -> tuple[list[list[str]], GenerationOptions]:
    """Validate everything before the first sentence is produced; the prompts' sentences."""
    options = GenerationOptions() if options is None else options
    _check(model, pipeline, options)
    return split_prompts(prompts), options


def _all_events(model, pipeline, sentences, options) -> Iterator[tuple]:
    for start in range(0, len(sentences), options.batch_size):
        chunk = sentences[start : start + options.batch_size]
        yield from _events(model, pipeline, chunk, start, options)


def stream(
    model: SonarLLM,
    pipeline: SonarPipeline,
    prompts: Sequence[str],
    options: GenerationOptions | None = None,
) -> Iterator[StreamedSentence]:
    """Generate like ``generate`` and yield each sentence as soon as it is decoded, as
    ``StreamedSentence(index, sentence)``; the sentences of prompts generated together
    interleave (one per running prompt per step, in prompt order). Bad prompts or options
    raise here, before iteration starts."""
    sentences, options = _prepare(model, pipeline, prompts, options)
    events = _all_events(model, pipeline, sentences, options)
    return (StreamedSentence(e[1], e[2]) for e in events if e[0] == "sentence")


def generate(
    model: SonarLLM,
    pipeline: SonarPipeline,
    prompts: Sequence[str],
    options: GenerationOptions | None = None,
) -> list[GeneratedText]:
    """Continue each prompt sentence by sentence (see the module docstring).

    Args:
        model: a SonarLLM (eval mode, e.g. from ``load_bundle``).
        pipeline: the SONAR pipeline of its embedding space, with encoder and decoder.
        prompts: B texts; each is split into sentences and must have at least one.
        options: GenerationOptions (defaults: the paper's settings).

    Returns:
        one GeneratedText per prompt, in order.

    Raises:
        ValueError: an empty prompt (named by index), or options the model cannot run.
    """
    sentences, options = _prepare(model, pipeline, prompts, options)
    results = [GeneratedText(list(s)) for s in sentences]
    for event in _all_events(model, pipeline, sentences, options):
        out = results[event[1]]
        if event[0] == "sentence":
            out.sentences.append(event[2])
            out.scores.append(event[3])
        else:
            out.stop_reason = event[2]
    return results
