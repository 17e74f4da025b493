"""After training: ``finetune merge`` (fold adapters into the base, optionally re-quantize for serving) and
``finetune quantize`` (write a 4-bit NF4 model).

``finetune merge --requantize``:

=======  ==================================================================================================
none     a dense 16/32-bit Hugging Face model (``models.checkpoint.save_model``)
nf4      NF4 with double quantization, in bitsandbytes' layout (``qlora.model.save_quantized``); for a QLoRA
         adapter merged into the NF4-dequantized base this is PEFT's 4-bit merge, which can round the update away
         (see ``qlora/merge.py``)
rtn4     4-bit round-to-nearest, asymmetric, groups of ``--group-size`` columns, in the GPTQ layout: the baseline
gptq4    GPTQ 4-bit (Frantar et al. 2022) on calibration sequences from the training data, same grid and layout
=======  ==================================================================================================

For a QLoRA adapter (its folder holds ``qlora_config.json``, or ``--model`` is 4-bit, or ``--base`` is given) the
base is rebuilt as in training and merged per ``--base`` (``qlora.merge.merge_qlora``). Every merge reports, on
held-out batches, the largest logit difference and the loss change against the unmerged model, and the bytes
the result takes on disk.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

from finetune_ref.cli.common import (NF4_BLOCKSIZES, add_data_args, add_model_args, add_out_args, directory_bytes,
                                     group_size, heldout_batches, non_negative_int, positive_int, resolve_model_dir,
                                     writing_to)
from finetune_ref.models.output_dir import written_whole
from finetune_ref.qlora.adapter_record import check_loftq_base, read_qlora_record
from finetune_ref.recipes.inference import copy_tokenizer_files

REQUANTIZE = ("none", "nf4", "rtn4", "gptq4")
DEFAULT_NUM_SAMPLES = 128  # GPTQ calibration sequences (the GPTQ paper's 128 random segments)
DEFAULT_SEQ_LEN = 256
CALIBRATION_BATCH_SIZE = 8  # sequences per calibration forward


def cmd_merge(args) -> int:
    model_dir = resolve_model_dir(args.model, args.cache_dir)
    with writing_to(args.out, model_dir, args.original, *args.adapter, overwrite=args.overwrite):
        return _merge(args, model_dir)


def _merge(args, model_dir: Path) -> int:
    from finetune_ref.lora import load_adapters, merge_and_unload
    from finetune_ref.lora.base_weight import RequantizationWarning
    from finetune_ref.lora.inject import get_active_adapters
    from finetune_ref.models.loader import load_model
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.gptq.checkpoint import is_gptq_dir
    from finetune_ref.qlora.merge import adapter_deltas, merge_qlora, merge_report, quantize_merged
    from finetune_ref.qlora.bnb_config import is_quantized_dir
    from finetune_ref.models.config import check_context
    from finetune_ref.qlora.model import load_quantized

    check_context(model_dir, args.seq_len, f"seq_len={args.seq_len}")
    if is_gptq_dir(model_dir):
        raise ValueError(f"{model_dir} is a GPTQ model; merge adapters into the 16/32-bit or NF4 base they were "
                         "trained on")
    record = read_qlora_record(args.adapter)
    check_loftq_base(record, model_dir)
    qlora = record is not None or args.base is not None or args.original is not None or is_quantized_dir(model_dir)
    dtype = args.dtype or "fp32"  # everything in one dtype (NF4 matmuls too), so the report measures the merge
    gptq_config = _gptq_config(args)  # bad settings fail before any weight is read
    tokenizer = Tokenizer.from_dir(model_dir)
    batches = heldout_batches(args, tokenizer)[:args.report_batches] if args.report_batches else []
    calibration = _calibration(args, tokenizer) if args.requantize == "gptq4" else None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizationWarning)
        if qlora:
            base = args.base or "nf4-dequant"
            original = _original_dir(args, base, model_dir)
            settings = record or {}
            blocksize = args.blocksize if args.blocksize is not None else settings.get("blocksize")
            double_quant = False if args.no_double_quant else settings.get("double_quant")
            model = load_quantized(model_dir, blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype,
                                   dtype=dtype)
            load_adapters(model, args.adapter, adapter_dtype=model.model.embed_tokens.weight.dtype)
            merged = merge_qlora(model, base=base, original=original, dtype=dtype, untie_tied=args.untie,
                                 requantize="nf4" if args.requantize == "nf4" else "none")
            what = f"QLoRA adapter(s) into the {base} base"
        else:
            model = load_model(model_dir, dtype=dtype)
            load_adapters(model, args.adapter, adapter_dtype=model.model.embed_tokens.weight.dtype)
            deltas = adapter_deltas(model, get_active_adapters(model)) if args.requantize == "nf4" else {}
            merged = merge_and_unload(copy.deepcopy(model) if batches else model, untie_tied=args.untie)
            if args.requantize == "nf4":
                quantize_merged(merged, deltas, blocksize=args.blocksize or 64, double_quant=not args.no_double_quant,
                                compute_dtype=merged.model.embed_tokens.weight.dtype)
            what = "LoRA adapter(s)"
    for w in caught:  # the library's warning, measured by lora.base_weight.requantization_drift: print its line
        if isinstance(w.message, RequantizationWarning):
            print(f"warning: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if gptq_config is not None:
        from finetune_ref.gptq.model import gptq_quantize_model

        print(f"{gptq_config.method.upper()} 4-bit, group size {gptq_config.group_size}"
              + (f", {len(calibration)} calibration sequences" if calibration else ""), file=sys.stderr)
        gptq_quantize_model(merged, calibration_batches(calibration) if calibration else None, gptq_config,
                            progress=lambda line: print(line, file=sys.stderr))
    print(f"merged {len(args.adapter)} {what}" + ("" if args.requantize == "none" else
                                                   f", re-quantized ({args.requantize})"))
    if batches:
        report = merge_report(model, merged, batches)
        print(f"error against the unmerged model ({report['tokens']} held-out tokens): logits max-abs "
              f"{report['logits_max_abs']:.3g}, held-out loss {report['loss_reference']:.4f} -> "
              f"{report['loss_merged']:.4f} (change {report['loss_change']:+.2e})")
    with written_whole(args.out) as tmp:  # a temporary sibling, renamed to --out when complete
        _save(merged, tmp, args.requantize, gptq_config)
        copy_tokenizer_files(model_dir, tmp)
    out = Path(args.out)
    print(f"merged model saved to {out} ({directory_bytes(out) / 2**20:.1f} MiB of weights)")
    return 0


def _original_dir(args, base: str, model_dir: Path):
    from finetune_ref.qlora.bnb_config import is_quantized_dir

    if base != "original":
        if args.original is not None:
            raise ValueError("--original is only used with --base original")
        return None
    if args.original is not None:
        return args.original
    if is_quantized_dir(model_dir):
        raise ValueError("--base original needs --original DIR: the 16/32-bit checkpoint the 4-bit --model was "
                         "quantized from")
    return model_dir  # --model is the 16/32-bit checkpoint itself


def _gptq_config(args):
    if args.requantize not in ("rtn4", "gptq4"):
        if args.act_order or args.calibration_data:
            raise ValueError("--act-order and --calibration-data are for --requantize gptq4")
        return None
    from finetune_ref.gptq.format import GPTQConfig

    if args.requantize == "rtn4" and args.act_order:
        raise ValueError("--act-order orders GPTQ's columns by the Hessian; rtn4 has none (use gptq4)")
    return GPTQConfig(bits=4, group_size=args.group_size, desc_act=args.act_order,
                      method="gptq" if args.requantize == "gptq4" else "rtn")


def _calibration(args, tokenizer) -> list[dict]:
    return calibration_examples(tokenizer, args.calibration_data or args.data, num_samples=args.calibration_samples,
                                seq_len=args.seq_len, eval_fraction=0.0 if args.calibration_data else
                                args.eval_fraction)


def calibration_examples(tokenizer, data: str | Path | None = None, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                         seq_len: int = DEFAULT_SEQ_LEN, eval_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """GPTQ calibration data: up to ``num_samples`` training examples of ``build_datasets(tokenizer, data, seq_len,
    eval_fraction)`` (so the held-out split never calibrates), drawn without replacement with ``seed`` and kept
    in their original order (all of them if there are fewer). Packed text keeps its document ids and positions.

    Raises:
        ValueError: ``num_samples`` < 1, or no training example (data errors come from ``build_datasets``).
    """
    from finetune_ref.train.data import build_datasets

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    train, _ = build_datasets(tokenizer, data, seq_len=seq_len, eval_fraction=eval_fraction)
    if not train:
        raise ValueError("the calibration data gave no training example; give more text or a lower seq_len")
    if num_samples >= len(train):
        return list(train)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [train[i] for i in sorted(chosen.tolist())]


def calibration_batches(examples: list[dict], batch_size: int = CALIBRATION_BATCH_SIZE) -> list[dict]:
    """``examples`` in order, ``batch_size`` at a time, padded by ``train.data.collate`` (``attention_mask`` 0
    at padding, which gptq.model keeps out of every Hessian): the ``calibration`` of ``gptq_quantize_model``."""
    from finetune_ref.train.data import collate

    return [collate(examples[i:i + batch_size], pad_token_id=0) for i in range(0, len(examples), batch_size)]


def _save(merged, out: Path, requantize: str, gptq_config) -> Path:
    from finetune_ref.models.checkpoint import save_model
    from finetune_ref.gptq.checkpoint import save_gptq_model
    from finetune_ref.qlora.model import save_quantized

    if gptq_config is not None:
        return save_gptq_model(merged, out, gptq_config)
    if requantize == "nf4":
        return save_quantized(merged, out)
    return save_model(merged, out)


def cmd_quantize(args) -> int:
    from finetune_ref.qlora.bnb_config import is_quantized_dir
    from finetune_ref.qlora.model import load_quantized, nf4_layers, quantized_nbytes, save_quantized

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    with writing_to(args.out, model_dir, overwrite=args.overwrite) as out:
        if is_quantized_dir(model_dir):
            raise ValueError(f"{model_dir} is already 4-bit (its config.json has a quantization_config)")
        model = load_quantized(model_dir, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                               compute_dtype=args.compute_dtype, dtype=args.dtype)
        with written_whole(out) as tmp:  # a temporary sibling, renamed to --out when complete
            save_quantized(model, tmp)
            copy_tokenizer_files(model_dir, tmp)
    size = quantized_nbytes(model)
    print(f"quantized {len(nf4_layers(model))} linear layers ({size['parameters']:,d} weights) to NF4, blocksize "
          f"{args.blocksize}, double quantization {'off' if args.no_double_quant else 'on'}: {size['bytes']:,d} "
          f"bytes, {size['bytes_per_parameter']:.4f} bytes/parameter")
    print(f"4-bit model saved to {out}")
    return 0


def add_merge_parsers(sub) -> None:
    """Register ``merge`` and ``quantize`` on the ``finetune`` subcommands."""
    from finetune_ref.gptq.gptq import DEFAULT_GROUP_SIZE

    p = sub.add_parser("merge", help="merge LoRA or QLoRA adapters into the base; save it dense, NF4, RTN or "
                                     "GPTQ 4-bit")
    add_model_args(p, dtype_help="dtype of the merge and of the saved dense tensors (default fp32)")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    add_out_args(p, "output directory for the merged model", required=True)
    p.add_argument("--untie", action="store_true",
                   help="if an adapter touches the tied lm_head, untie it instead of refusing")
    p.add_argument("--requantize", choices=REQUANTIZE, default="none",
                   help="save the merged model dense (none), NF4 (nf4), 4-bit round-to-nearest (rtn4) or GPTQ "
                        "4-bit (gptq4)")
    g = p.add_argument_group("QLoRA adapters (found from qlora_config.json, a 4-bit --model, or these flags)")
    g.add_argument("--base", choices=["nf4-dequant", "original"], default=None,
                   help="merge into the dequantized NF4 weights the adapter was trained against (nf4-dequant, the "
                        "default) or into the original 16/32-bit checkpoint")
    g.add_argument("--original", metavar="DIR", help="--base original: the 16/32-bit checkpoint the NF4 base "
                                                     "was quantized from (default: --model when it is not 4-bit)")
    g.add_argument("--blocksize", type=int, choices=NF4_BLOCKSIZES, default=None,
                   help="NF4 blocksize (default: the adapter's qlora_config.json, else 64)")
    g.add_argument("--no-double-quant", action="store_true",
                   help="NF4 without double quantization (default: as the adapter was trained)")
    g = p.add_argument_group("--requantize rtn4 / gptq4")
    g.add_argument("--group-size", type=group_size, default=DEFAULT_GROUP_SIZE,
                   help="input columns per scale and zero point (-1: one group per row)")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian "
                                                            "diagonal")
    g.add_argument("--calibration-data", metavar="FILE",
                   help="GPTQ calibration text/JSONL (default: the training part of --data)")
    g.add_argument("--calibration-samples", type=positive_int, default=DEFAULT_NUM_SAMPLES,
                   help="GPTQ calibration sequences of --seq-len tokens")
    add_data_args(p, batch_size=2)
    p.add_argument("--report-batches", type=non_negative_int, default=4,
                   help="held-out batches for the error report against the unmerged model (0: none)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("quantize", help="quantize a model's linear layers to NF4 and save a 4-bit model "
                                        "(bitsandbytes/transformers layout)")
    add_model_args(p, dtype_help="dtype of the unquantized tensors and of the weights before quantization "
                                   "(default: --compute-dtype, as train --method qlora builds its base)")
    add_out_args(p, "output directory for the 4-bit model", required=True)
    p.add_argument("--blocksize", type=int, choices=NF4_BLOCKSIZES, default=64,
                   help="NF4 block size (elements per absmax)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax values in fp32 (4.5 instead "
                                                                  "of 4.127 bits per weight)")
    p.add_argument("--compute-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the NF4 matmuls, recorded in quantization_config")
    p.set_defaults(func=cmd_quantize)
