"""The ``generate`` and ``evaluate`` commands (model directory, prompts, data, results file)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from sonarllm.cli.args import UsageError, resolve_device

RESULTS_KEY, RESULTS_KIND = "sonarllm", "evaluate results"  # marks a JSON file evaluate --json wrote


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if args.prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(args.prompts_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompts file not found: {path}")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"--prompts-file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
                ) from None
        prompts += [line for line in lines if line.strip()]
    return prompts


def _check_prompts(prompts: list[str]) -> None:
    from sonarllm.text import split_sentences

    if not prompts:
        raise UsageError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    for i, text in enumerate(prompts):
        if not split_sentences(text):
            raise UsageError(f"prompt #{i + 1} is empty: a prompt needs at least one sentence")


def _check_sonar_files(model_dir: Path) -> None:
    """Name a missing model directory or SONAR file before loading starts."""
    from sonarllm.bundle import SPEC_NAME
    from sonarllm.sonar.pipeline import SonarSpec

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    SonarSpec.load(model_dir / SPEC_NAME)  # raises FileNotFoundError naming a missing file


def _load(args):
    from sonarllm.bundle import load_bundle

    model_dir = Path(args.model)
    _check_sonar_files(model_dir)
    return load_bundle(model_dir, device=resolve_device(args.device), verify=args.verify)


def cmd_generate(args) -> int:
    from sonarllm.generate import GenerationOptions, generate, stream

    repeat = {k: v for k in ("repeat_threshold", "repeat_retries", "repeat_noise") if (v := getattr(args, k)) is not None}
    if repeat and args.no_repeat_sentences == 0:
        given = ", ".join("--" + k.replace("_", "-") for k in repeat)
        raise UsageError(f"{given}: {'apply' if len(repeat) > 1 else 'applies'} only with --no-repeat-sentences K > 0 "
                         "(the repetition control is off)")  # fmt: skip
    prompts = _read_prompts(args)
    _check_prompts(prompts)
    options = GenerationOptions(
        max_sentences=args.max_sentences,
        eos_threshold=args.eos_threshold,
        beam_size=args.beam_size,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        lang=args.lang,
        batch_size=args.batch_size,
        no_repeat_sentences=args.no_repeat_sentences,
        **repeat,
    )
    bundle = _load(args)
    if args.stream:
        for item in stream(bundle.model, bundle.pipeline, prompts, options):
            if args.json:
                line = json.dumps({"index": item.index, "sentence": item.sentence})
            else:
                line = item.sentence if len(prompts) == 1 else f"[{item.index}] {item.sentence}"
            print(line, flush=True)
        return 0
    for i, result in enumerate(generate(bundle.model, bundle.pipeline, prompts, options)):
        if args.json:
            print(json.dumps({"index": i, **result.to_dict()}), flush=True)
        else:
            print(result.text, flush=True)
    return 0


def cmd_evaluate(args) -> int:
    from sonarllm import metrics
    from sonarllm.corpus import read_documents
    from sonarllm.evaluate import EvalOptions, evaluate, format_table

    options = EvalOptions(
        max_documents=args.max_docs,
        batch_size=args.batch_size,
        beam_size=args.beam_size,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        max_sentences=args.max_sentences,
        nlg=not args.no_nlg,
        duplicate_eos=args.duplicate_eos,
        lang=args.lang,
    )
    if options.nlg:
        metrics.check_available()  # fail before the model loads
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"evaluation data not found: {data}")
    if args.json not in (None, "-"):
        _check_results_path(Path(args.json), data, Path(args.model))
    documents = read_documents(data, text_field=args.text_field)
    first = next(documents, None)  # fail before the model loads
    if first is None:
        raise UsageError(f"--data {data} holds no documents")
    bundle = _load(args)
    results = evaluate(bundle.model, bundle.pipeline, itertools.chain([first], documents), options)
    results["model"], results["data"] = str(args.model), str(data)
    results[RESULTS_KEY] = RESULTS_KIND
    text = json.dumps(results, indent=2)
    if args.json == "-":
        print(text)
        return 0
    print(format_table(results))
    if args.json is not None:
        from sonarllm.files import write_text_atomic

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, text + "\n")
        print(f"results written to {out}")
    return 0


def _is_results_file(path: Path) -> bool:
    """Whether ``path`` holds results ``evaluate --json`` wrote: marked with RESULTS_KEY, or (an
    older sonarllm's, before the mark) an object with all of its keys."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(obj, dict):
        return False
    older = {"documents", "cross_entropy", "cosine", "options", "model", "data"}
    return obj.get(RESULTS_KEY) == RESULTS_KIND or older <= obj.keys()


def _check_results_path(out: Path, data: Path, model: Path) -> None:
    """``--json OUT`` must not replace an input (the --data file or a file under it, a file of
    the --model directory) nor a file evaluate did not write (UsageError, before the model
    loads)."""
    from sonarllm.files import output_file_problem

    problem = output_file_problem(out, inputs=[data, model], is_ours=_is_results_file)
    if problem:
        raise UsageError(
            f"--json {out} {problem}; results only replace an earlier evaluate --json file: "
            "choose another path"
        )
