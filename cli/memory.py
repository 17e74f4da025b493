"""``finetune memory``: the analytic memory estimate (``train/memory.py``) of a model shape and training setup,
as a table or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from finetune_ref.cli.common import (NF4_BLOCKSIZES, Parser, module_names, non_negative_int, positive_int,
                                     probability, rank, sequences_per_batch, token_ids,
                                     tokens_per_sequence)
from finetune_ref.cli.train import DEFAULTS, _default as recipe_default, run_config
from finetune_ref.qlora.model import DEFAULT_BLOCKSIZE
from finetune_ref.models.config import check_context
from finetune_ref.train import memory
from finetune_ref.train.memory_shapes import DEFAULT_PRESET, LINEAR_NAMES, PRESETS, shape_from
from finetune_ref.train.memory_settings import (DTYPE_BYTES, METHODS, OPTIMIZERS, SAVABLE_MODULES, MemoryEstimate,
                                                MemorySettings)
from finetune_ref.train.memory import estimate_memory, loss_is_chunked
from finetune_ref.train.memory_fsdp import estimate_memory_fsdp

# The flags that are recipe fields: parsed into the method's recipe, as finetune train does.
RECIPE_FLAGS = ("optimizer", "batch_size", "seq_len", "grad_checkpointing", "dtype", "rank", "dropout",
                "double_quant", "blocksize", "parallel")

DESCRIPTION = memory.__doc__.split("\n\n")[0]

_ROWS = (("weights", "weights"), ("quant_constants", "quantization constants"),
         ("lora_parameters", "LoRA parameters"), ("gradients", "gradients"),
         ("optimizer_states", "optimizer states"), ("master_weights", "fp32 master weights"),
         ("activations", "activations (saved for backward)"), ("logits_and_loss", "logits and loss"),
         ("workspace", "workspace at the peak"), ("gathered", "FSDP all-gathered (root + 2 layers)"))


def format_table(estimate: MemoryEstimate, model_name: str, settings: MemorySettings, world_size: int = 1,
                 chunked: bool | None = None) -> str:
    """A plain-text table: one row per class (GB = 1e9 bytes, GiB = 2**30, bytes per model parameter)."""
    s, est = settings, estimate
    adapter = f", {'DoRA' if s.dora else 'LoRA'} r={s.rank} on {','.join(s.target_modules)} ({s.adapter_dtype or s.dtype})" \
        if s.method != "full" else ""
    quant = f", NF4 blocksize {s.blocksize}{' + double quant' if s.double_quant else ''}" \
        if s.method == "qlora" else ""
    ranks = f", per rank of {world_size} (FSDP2)" if world_size > 1 else ""
    chunked = s.chunked_loss if chunked is None else chunked
    logits = ("on materialised logits" if not s.chunked_loss else
              "on materialised logits (the head is wrapped: an adapted tied embedding or lm_head in modules_to_save)")
    lines = [f"model {model_name}: {est.parameters:,} parameters, {est.trainable_parameters:,} trainable "
             f"({100 * est.trainable_parameters / est.parameters:.3g}%)",
             f"method {s.method} ({s.dtype}{quant}{adapter}), optimizer {s.optimizer}, batch {s.batch_size} x "
             f"{s.seq_len} tokens, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}{ranks}",
             f"loss {'chunked (no logits)' if chunked else logits}, selective "
             f"recomputation {'on' if s.selective_recompute else 'off'}", ""]
    base = est.parameters - (est.trainable_parameters if s.method != "full" else 0)
    lines.append(f"{'':34s} {'GB':>10s} {'GiB':>10s} {'B/param':>9s}")
    for key, label in _ROWS:
        value = getattr(est, key)
        if key == "gathered" and world_size == 1:
            continue
        lines.append(f"{label:34s} {value / 1e9:10.3f} {value / 2**30:10.3f} {value / base:9.3f}")
    lines.append(f"{'before activations':34s} {est.before_activations / 1e9:10.3f} "
                 f"{est.before_activations / 2**30:10.3f} {est.before_activations / base:9.3f}")
    lines.append(f"{'estimated peak':34s} {est.peak / 1e9:10.3f} {est.peak / 2**30:10.3f} {est.peak / base:9.3f}")
    lines.append("")
    lines.append(f"The peak is reached at: {est.peak_phase}. Activations and gradients are not all live at once, "
                 "so the peak is not the sum of the rows.")
    if est.pageable:
        lines.append(f"Paged optimizer: {est.pageable / 1e9:.3f} GB of states (and master weights) live off a GPU "
                     f"(host or unified memory); device peak without them: {(est.peak - est.pageable) / 1e9:.3f} GB.")
    lines.append("Tensor bytes only: a GPU adds its CUDA context (~0.5-1 GB) and allocator fragmentation.")
    return "\n".join(lines)


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    names = tuple(n for t in names for n in (LINEAR_NAMES if t == "all-linear" else (t,)))
    unknown = [t for t in names if t not in (*LINEAR_NAMES, "embed_tokens")]
    if unknown or not set(names) & set(LINEAR_NAMES):
        raise argparse.ArgumentTypeError(f"expected 'all-linear' or a comma-separated subset of "
                                         f"{','.join(LINEAR_NAMES)}, with embed_tokens if wanted (the estimator needs "
                                         f"at least one linear layer), got {text!r}")
    return names


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``finetune memory`` options to ``p``; ``p.set_defaults(func=cmd_memory)``.

    A flag left out takes ``finetune train``'s default for the method (its recipe, ``recipes/``), so the estimate
    is of the run ``finetune train --method M`` would make; what train refuses, this refuses too (``settings``).
    """
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR|config.json",
                     help="a Hugging Face model directory or its config.json (default: --preset)")
    src.add_argument("--preset", choices=sorted(PRESETS),
                     help=f"a published model shape (default without --model: {DEFAULT_PRESET}, the embedded model)")
    p.add_argument("--method", choices=METHODS, default="lora", help="what trains (default lora)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"AdamW's state format ({recipe_default('optimizer')})")
    p.add_argument("--batch-size", type=sequences_per_batch,
                   help=f"sequences per micro-batch ({recipe_default('batch_size')})")
    p.add_argument("--seq-len", type=tokens_per_sequence, help=f"tokens per sequence ({recipe_default('seq_len')})")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute each layer in backward")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES),
                   help="weights and activations (full: bf16 is --precision bf16, with fp32 master weights; "
                        f"default: {_dtype_defaults()})")
    p.add_argument("--adapter-dtype", choices=sorted(DTYPE_BYTES),
                   help="LoRA A/B dtype (default: bf16 where the method's precision is bf16, else fp32)")
    p.add_argument("--rank", type=rank, help=f"LoRA rank r ({recipe_default('rank')})")
    p.add_argument("--targets", type=_targets, default=None,
                   help="'all-linear' or a comma-separated subset of q_proj,...,down_proj, with embed_tokens for "
                        "LoRA on the input embedding (default all-linear)")
    p.add_argument("--dropout", type=probability,
                   help=f"LoRA dropout in training (each adapter keeps its dropped input) ({recipe_default('dropout')})")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (a magnitude per output, two more activations)")
    p.add_argument("--modules-to-save", type=module_names, default=(),
                   metavar="NAMES", help="modules trained in full beside the adapters, any of "
                                         f"{','.join(SAVABLE_MODULES)} (norm: the final norm only); default none")
    p.add_argument("--trainable-tokens", type=token_ids, default=(), metavar="IDS",
                   help="token ids whose embedding rows train directly, as finetune train --trainable-tokens "
                        "(their count is what costs memory); default none")
    p.add_argument("--ensure-weight-tying", action="store_true",
                   help="embed_tokens in --targets on a tied model: the head gets the same adapter, as finetune "
                        "train --ensure-weight-tying (without it such targets are refused, as train does)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_const", const=False,
                   help="QLoRA without double quantization")
    p.add_argument("--blocksize", type=int, choices=NF4_BLOCKSIZES,
                   help=f"QLoRA NF4 block size (default {DEFAULT_BLOCKSIZE})")
    p.add_argument("--no-mask", action="store_true",
                   help="batches without attention mask / document ids (plain causal attention; the training "
                        "loop's packed batches carry them)")
    p.add_argument("--no-chunked-loss", action="store_true",
                   help="the loss on materialised logits (finetune train --no-chunked-loss)")
    p.add_argument("--no-selective-recompute", action="store_true",
                   help="RMSNorm and SwiGLU outputs stored for backward, not recomputed (finetune train's flag)")
    p.add_argument("--no-fused-projections", action="store_true",
                   help="q/k/v and gate/up as separate matmuls (finetune train --no-fused-projections)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: every rank holds the model (the one-process estimate, per rank); fsdp: FSDP2 shards "
                        "weights, gradients and optimizer states over --world-size ranks (train/memory_fsdp.py)")
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks (GPUs) for --parallel fsdp (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_memory)
    return p


def _dtype_defaults() -> str:
    by_dtype: dict[str, list[str]] = {}
    for method, recipe in DEFAULTS.items():
        by_dtype.setdefault(recipe.base_dtype(), []).append(method)
    return ", ".join(f"{dtype} for {' and '.join(methods)}" for dtype, methods in by_dtype.items())


def _savable(names: tuple[str, ...]) -> tuple[str, ...]:
    """--modules-to-save as the estimator counts them (``SAVABLE_MODULES``): each entry by its last name part
    ("model.norm" is "norm"); one layer's module is refused, as the estimator counts a kind in every layer."""
    kinds = []
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        if kind not in SAVABLE_MODULES or re.search(r"(^|\.)layers\.\d+(\.|$)", name):
            raise ValueError(f"--modules-to-save {','.join(names)}: the estimator counts copies of "
                             f"{', '.join(SAVABLE_MODULES)} (the layers' norms in every layer), not {name}")
        kinds += [kind] if kind not in kinds else []
    return tuple(kinds)


def settings(args: argparse.Namespace, config=None) -> MemorySettings:
    """The ``MemorySettings`` of the run ``finetune train`` would make with these flags: the method's recipe
    (``cli.train.run_config``, so the same defaults and the same refusals; with the model's ``config`` also
    what train checks of its shapes) plus the estimator's own flags.

    Raises:
        ValueError: what train refuses (NF4 flags without --method qlora, ...) or the estimator does.
    """
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k, None) is not None}
    # the adapter flags given: train refuses them with --method full, and checks them against the model's shapes
    given.update({k: v for k, v in (("targets", args.targets), ("dora", args.dora or None),
                                    ("modules_to_save", args.modules_to_save or None),
                                    ("trainable_tokens", args.trainable_tokens or None),
                                    ("ensure_weight_tying", args.ensure_weight_tying or None)) if v is not None})
    dtype = given.pop("dtype", None)
    if dtype is not None and args.method == "full":  # full trains the weights in the precision's dtype
        given["precision"] = "bf16" if dtype == "bf16" else "fp32"
    elif dtype is not None:
        given["dtype"] = dtype
    recipe, _, _ = run_config(argparse.Namespace(method=args.method, **given))
    if config is not None:  # what train checks of the model before loading it (recipes/lora.py check_shapes)
        recipe.check_shapes(config, lambda name: "--" + name.replace("_", "-"))
        check_context(config, recipe.seq_len, f"--seq-len {recipe.seq_len}")
    if args.method == "full" and args.adapter_dtype:
        raise ValueError("--adapter-dtype sets the dtype of LoRA's A and B: use it with --method lora or qlora")
    if args.world_size > 1 and args.parallel != "fsdp":
        raise ValueError(f"--world-size {args.world_size} applies to --parallel fsdp (with ddp every rank holds the "
                         "whole model: the estimate is per rank at any world size); add --parallel fsdp or leave it out")
    adapter_dtype = args.adapter_dtype or ("bf16" if recipe.precision == "bf16" else "fp32")
    return MemorySettings(
        method=args.method, optimizer=recipe.optimizer, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
        gradient_checkpointing=recipe.grad_checkpointing, dtype=dtype or recipe.base_dtype(),
        adapter_dtype=None if args.method == "full" else adapter_dtype, rank=getattr(recipe, "rank", 8),
        target_modules=tuple(args.targets or LINEAR_NAMES), dora=args.dora,
        modules_to_save=_savable(args.modules_to_save),
        lora_dropout=getattr(recipe, "dropout", 0.0),
        trainable_tokens=len(args.trainable_tokens),
        double_quant=getattr(recipe, "double_quant", None) is not False,
        blocksize=getattr(recipe, "blocksize", None) or DEFAULT_BLOCKSIZE, attention_mask=not args.no_mask,
        chunked_loss=not args.no_chunked_loss, selective_recompute=not args.no_selective_recompute,
        # as RunConfig.configure_model: FSDP2 runs unfused
        fused_projections=not args.no_fused_projections and args.parallel != "fsdp")


def add_memory_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``memory`` on a ``parser.add_subparsers()`` object (as ``cli/main.py`` builds its commands)."""
    p = subparsers.add_parser("memory", help="estimate the memory of full, LoRA or QLoRA fine-tuning",
                              description=DESCRIPTION)
    return configure_parser(p)


def cmd_memory(args: argparse.Namespace) -> int:
    """Run ``finetune memory``; raises ValueError / FileNotFoundError for bad input (the CLI prints them)."""
    config, name = shape_from(args.model, args.preset)
    if args.trainable_tokens and args.method == "full":
        raise ValueError("--trainable-tokens does not apply to --method full (every row trains); leave it out")
    if args.trainable_tokens and max(args.trainable_tokens) >= config.vocab_size:
        raise ValueError(f"--trainable-tokens: id {max(args.trainable_tokens)} is outside the vocabulary of "
                         f"{config.vocab_size} tokens")
    if "embed_tokens" in (args.targets or ()) and config.tie_word_embeddings and not args.ensure_weight_tying:
        raise ValueError("--targets with embed_tokens on a model whose lm_head is tied to it: add "
                         "--ensure-weight-tying (the head then gets the same adapter), as finetune train asks")
    setup = settings(args, config)
    world = args.world_size if args.parallel == "fsdp" else 1
    estimate = estimate_memory_fsdp(config, setup, world) if world > 1 else estimate_memory(config, setup)
    if args.json:
        print(json.dumps({"model": name, "settings": dataclasses.asdict(setup), "parallel": args.parallel,
                          "world_size": world, **estimate.to_dict()}, indent=2))
    else:
        print(format_table(estimate, name, setup, world, chunked=loss_is_chunked(config, setup)))
    return 0


def memory_main(argv: list[str] | None = None) -> int:
    """``finetune memory`` as a standalone entry point: returns the exit status (2 with a one-line error)."""
    parser = configure_parser(Parser(prog="finetune memory", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return cmd_memory(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"finetune memory: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(memory_main())
