"""The ``sonarllm`` command: generate, evaluate, and the data / training entry points.

    sonarllm generate --model DIR --prompt "Once upon a time, ..." [--stream] [--json]
    sonarllm evaluate --model DIR --data held_out.jsonl [--json results.json]
    sonarllm convert --official PATH [--config JSON] --out DIR   # the paper's checkpoints
    sonarllm prepare ...   # delegated to training.prepare_data.main
    sonarllm train ...     # delegated to training.train.main
    sonarllm compare ...   # delegated to training.compare.main

The ``training`` package is not installed with the wheel (research code often has a
``training`` package of its own): the delegated commands import it from the checkout this
``sonarllm`` lives in (an editable install), whatever directory the command runs from.

Conventions: ``--help`` on every command; exit status 0 on success, 2 for a bad command line
(argparse's errors, an empty prompt), 1 for a runtime error (missing or incompatible model
directory, missing SONAR file, corrupted checkpoint, missing optional dependency, ...), which is
reported as one line on stderr without a traceback (set ``SONARLLM_DEBUG=1`` to get the
traceback instead). ``--device auto`` picks CUDA when available, else the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "sonarllm"
DELEGATES = {
    "prepare": ("training.prepare_data", "prepare a corpus: split, SONAR-encode and shard it"),
    "train": ("training.train", "train a SONAR-LLM (DeepSpeed)"),
    "compare": (
        "training.compare",
        "compare training objectives over seeds (SONAR-LLM vs MSE-LCM)",
    ),
}


class UsageError(Exception):
    """A command-line value that argparse cannot check (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Argument types (their errors are usage errors, exit status 2)


def _bounded(kind: type, lowest, what: str):
    """An argparse type: ``kind`` parsed from the text, at least ``lowest`` and finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= lowest or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, 1, "a positive integer")
_non_negative_int = _bounded(int, 0, "an integer >= 0")
_non_negative_float = _bounded(float, 0.0, "a finite number >= 0")


def _threshold(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [-1, 1] or 'none', got {text!r}"
        ) from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1] or 'none', got {text!r}")
    return value


def _cosine(text: str) -> float:
    value = _bounded(float, -1.0, "a number in [-1, 1]")(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = _non_negative_float(text)
    except argparse.ArgumentTypeError:  # its message says >= 0
        value = 0.0
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}"
        ) from None
    return text


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu; an unavailable CUDA device is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


# ---------------------------------------------------------------------------------------------
# Parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="trained model directory (config.json, model.safetensors, sonar.json)",
    )
    p.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    )
    p.add_argument(
        "--beam-size",
        type=_positive_int,
        default=5,
        help="SONAR decoder beam size, 1 = greedy (default: 5)",
    )
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        help="most tokens per decoded sentence (default: SONAR's limit)",
    )
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="embedding-space noise: pred + T * rms(pred) * N(0, I) (default: 0)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="noise seed (default: 0)")
    p.add_argument(
        "--lang", default=None, help="SONAR language code (default: the model's, eng_Latn)"
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the model's files and its SONAR files against the checksums in its "
        "bundle.json before loading (default); --no-verify loads changed files anyway",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="SONAR-LLM: generate text, evaluate a model, prepare data, train."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="continue prompts sentence by sentence",
        description="Continue each prompt sentence by sentence until the model "
        "predicts the end sentence or --max-sentences is reached.",
    )
    _add_model_args(gen)
    gen.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt (repeat for several)",
    )
    gen.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="a file with one prompt per line (blank lines skipped); '-' = stdin",
    )
    gen.add_argument(
        "--max-sentences",
        type=_positive_int,
        default=32,
        help="most sentences per document, prompt + generated (default: 32)",
    )
    gen.add_argument(
        "--eos-threshold",
        type=_threshold,
        default=0.98,
        help="stop when cos(sentence, 'End of sequence.') >= this; 'none' disables (default: 0.98)",
    )
    gen.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="prompts generated together (default: 32)",
    )
    gen.add_argument(
        "--no-repeat-sentences",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="repetition control: a sentence within --repeat-threshold (cosine) of one of the "
        "last K is redrawn with noise, then ends generation ('repetition'); 0 = off (default)",
    )
    gen.add_argument(
        "--repeat-threshold",
        type=_cosine,
        default=None,  # GenerationOptions' default; given without --no-repeat-sentences: refused
        help="cosine at which a sentence repeats an earlier one (default: 0.95)",
    )
    gen.add_argument(
        "--repeat-retries",
        type=_non_negative_int,
        default=None,  # GenerationOptions' default; given without --no-repeat-sentences: refused
        help="noisy redraws of a repeat before generation ends (default: 2)",
    )
    gen.add_argument(
        "--repeat-noise",
        type=_positive_float,
        default=None,  # GenerationOptions' default; given without --no-repeat-sentences: refused
        help="noise of a redraw, like --temperature (default: 0.2)",
    )
    gen.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="print each sentence as soon as it is generated",
    )
    gen.add_argument("--json", action="store_true", help="print JSON lines instead of text")

    ev = sub.add_parser(
        "evaluate",
        help="held-out cross-entropy, next-sentence ROUGE-L / BLEU",
        description="Evaluate a model on held-out documents: token cross-entropy "
        "through the SONAR decoder, cosine of predicted and true next embeddings, "
        "next-sentence ROUGE-L and BLEU after 2-sentence and half-document "
        "prefixes.",
    )
    _add_model_args(ev)
    ev.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="held-out documents: .txt (blank-line separated), .jsonl, optionally "
        ".gz, or a directory of .txt files",
    )
    ev.add_argument("--text-field", default="text", help="JSON field of a .jsonl corpus")
    ev.add_argument(
        "--max-docs",
        type=_positive_int,
        default=512,
        help="evaluate the first N documents (default: 512, the paper's)",
    )
    ev.add_argument(
        "--batch-size", type=_positive_int, default=16, help="documents per batch (default: 16)"
    )
    ev.add_argument(
        "--max-sentences",
        type=_positive_int,
        default=32,
        help="sentences kept per document (default: 32)",
    )
    ev.add_argument(
        "--no-nlg",
        action="store_true",
        help="skip the decoded ROUGE-L / BLEU metrics (cross-entropy and cosine only)",
    )
    ev.add_argument(
        "--duplicate-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="label convention of the cross-entropy, as the model was trained: the paper's "
        "extra </s> label (default) or not",
    )
    ev.add_argument(
        "--json",
        metavar="OUT",
        help="also write the results as JSON to OUT ('-' = stdout, no table)",
    )

    conv = sub.add_parser(
        "convert",
        help="convert one of the paper's released checkpoints into a model directory",
        description="Convert a SONAR-LLM checkpoint of the paper (the GitHub-release .pt file with its "
        "SonarLLM_*.json, or a Hugging Face directory with config.json and pytorch_model.bin) into a "
        "model directory for 'sonarllm generate' / 'evaluate': config.json, model.safetensors, "
        "sonar.json naming the SONAR files, converted.json.",
    )
    conv.add_argument("--official", required=True, metavar="PATH", help="release .pt file or Hugging Face directory")
    conv.add_argument(
        "--config",
        metavar="JSON",
        help="the official SonarLLM_{100M,300M,600M,900M}.json (required for a release file; "
        "replaces a directory's config.json)",
    )
    conv.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory: new, empty, or an earlier conversion (replaced); anything else is refused",
    )
    conv.add_argument("--sonar-tokenizer", default="sonar_tokenizer", metavar="PATH_OR_ASSET",
                      help="SONAR tokenizer for sonar.json (default: the released asset sonar_tokenizer)")  # fmt: skip
    conv.add_argument("--sonar-encoder", default="text_sonar_basic_encoder", metavar="PATH_OR_ASSET",
                      help="SONAR encoder (default: the released text_sonar_basic_encoder)")  # fmt: skip
    conv.add_argument("--sonar-decoder", default="text_sonar_basic_decoder", metavar="PATH_OR_ASSET",
                      help="SONAR decoder (default: the released text_sonar_basic_decoder)")  # fmt: skip
    conv.add_argument("--lang", default="eng_Latn", help="SONAR language code (default: eng_Latn)")
    conv.add_argument(
        "--trust",
        action="store_true",
        help="unpickle any object of the checkpoint file (only for files you trust)",
    )

    for name, (module, text) in DELEGATES.items():
        sub.add_parser(
            name, help=f"{text} (runs {module}; see 'sonarllm {name} --help')", add_help=False
        )
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


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


CONVERTED_MARK = "converted.json"
CONVERT_OUTPUTS = {"bundle.json", "config.json", "model.safetensors", "sonar.json", "sonar", CONVERTED_MARK}  # save_bundle + the mark


def _check_convert_out(out: Path) -> None:
    """--out must be new, empty, or an earlier conversion holding nothing else (never lose files)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    if entries and (CONVERTED_MARK not in entries or entries - CONVERT_OUTPUTS):
        foreign = sorted(entries - CONVERT_OUTPUTS) if CONVERTED_MARK in entries else sorted(entries)
        raise UsageError(
            f"--out {out} is not empty and not an earlier 'sonarllm convert' output (it holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}); give a new or empty directory"
        )


def _publish_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an earlier conversion at ``out`` is moved aside first and
    deleted only after the new one is in place."""
    import secrets
    import shutil

    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_convert(args) -> int:
    import secrets
    import shutil

    from sonarllm.bundle import save_bundle
    from sonarllm.model import SonarLLM
    from sonarllm.sonar.pipeline import SonarSpec

    official, out = Path(args.official), Path(args.out)
    if official.is_file() and args.config is None:
        raise UsageError(
            f"--official {official} is a release file, which records no configuration: give --config "
            "SonarLLM_{100M,300M,600M,900M}.json (the one it was trained with)"
        )
    if not official.exists():
        raise FileNotFoundError(f"--official {official} not found")
    _check_convert_out(out)
    model = SonarLLM.from_official(official, args.config, trust=args.trust)
    spec = SonarSpec(args.sonar_tokenizer, args.sonar_encoder, args.sonar_decoder, lang=args.lang)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.convert-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        save_bundle(staging, model, spec)
        mark = {"official": str(official.resolve()), "config": None if args.config is None else str(Path(args.config).resolve()),
                "add_begin": model.config.add_begin}  # fmt: skip
        (staging / CONVERTED_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        _publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cfg = model.config
    print(f"converted {official} -> {out}: {cfg.num_layers} layers, model_dim {cfg.model_dim}, "
          f"{model.num_trainable_parameters():,} parameters, add_begin {str(cfg.add_begin).lower()}")  # fmt: skip
    return 0


RESULTS_KEY, RESULTS_KIND = "sonarllm", "evaluate results"  # marks a JSON file evaluate --json wrote


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


def _checkout_module(name: str, module_name: str):
    """Import ``module_name`` (a ``training.*`` module) from the checkout holding this package.

    The checkout's root goes first on ``sys.path`` of this (command) process, so that a
    ``training`` package of someone else's installed or in the current directory is not taken
    for ours; a module that still resolves elsewhere is refused."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "training" / "__init__.py").is_file():
        raise ImportError(
            f"'{PROG} {name}' runs the trainer from a checkout of the sonarllm repository "
            f"(git clone, then pip install -e . there); the sonarllm at {root} has no training/ "
            "beside it (a wheel install carries no trainer)"
        )
    if sys.path[:1] != [str(root)]:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"'{PROG} {name}' needs the training extra (pip install -e '.[train]'): {exc}"
        ) from exc
    where = Path(module.__file__).resolve()
    if not where.is_relative_to(root):
        raise ImportError(f"'{PROG} {name}': {module_name} resolves to {where}, not to {root / 'training'}")
    return module


def _delegate(name: str, argv: list[str]) -> int:
    module = _checkout_module(name, DELEGATES[name][0])
    try:
        code = module.main(argv)
    except SystemExit as exc:  # argparse inside the delegate
        code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _error(command: str | None, exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    where = f"{PROG} {command}" if command else PROG
    print(f"{where}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sonarllm`` command line; returns the exit status (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    debug = os.environ.get("SONARLLM_DEBUG", "") not in ("", "0")
    try:
        if command in DELEGATES:
            return _delegate(command, argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error (2)
            return exc.code if isinstance(exc.code, int) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        run = {"generate": cmd_generate, "evaluate": cmd_evaluate, "convert": cmd_convert}[args.command]
        return run(args)
    except UsageError as exc:
        _error(command, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        _error(command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
