"""The ``sonarllm`` command line's parser: argument types (their errors are usage errors, exit
status 2), the commands' options, and the names of the commands delegated to ``training``."""

from __future__ import annotations

import argparse

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
