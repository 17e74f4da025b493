"""``finetune generate``: one or several prompts, generated together in one batch, each with its own adapter.

    finetune generate --prompt "What is a list?"                                   # the base model
    finetune generate --adapter runs/lora/adapter --prompt "..."                    # one adapter (or stack several)
    finetune generate --adapter a=runs/a/adapter --adapter b=runs/b/adapter \\
        --prompt "..." --prompt "..." --prompt "..." --adapter-per-prompt a,b,-     # a mixed-adapter batch

Without ``--adapter-per-prompt`` the adapters given are summed for every prompt (PEFT's several active adapters);
with it, prompt i uses only the i-th named adapter ("-" or "__base__": none), in the same batch
(``lora.mixed.set_row_adapters``, PEFT's ``adapter_names``). Batched greedy output equals each prompt run alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_ref.cli.combine import weights
from finetune_ref.cli.common import (INFERENCE_DTYPE_HELP, add_model_args, positive_int, resolve_model_dir,
                                     say_filled_defaults, seed, temperature, top_p)
NO_ADAPTER = ("-", "__base__")


def parse_named_adapters(values: list[str] | None, flag: str = "--adapter") -> tuple[list[str], list[str] | None]:
    """["a=dir1", "dir2"] -> (dirs, names); names None when no entry is named (the loader's default names).

    Raises:
        ValueError: a mix of named and unnamed entries, an empty name or directory, or a repeated name.
    """
    values = values or []
    named = ["=" in v for v in values]
    if not any(named):
        return values, None
    if not all(named):
        raise ValueError(f"{flag}: name every adapter (NAME=DIR) or none of them; got {values}")
    pairs = [v.split("=", 1) for v in values]
    names = [n for n, _ in pairs]
    if any(not n or not d for n, d in pairs):
        bad = [v for v in values if v.startswith("=") or v.endswith("=")]
        raise ValueError(f"{flag}: expected NAME=DIR, got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag}: adapter names must be unique, got {names}")
    if any(n in NO_ADAPTER for n in names):
        raise ValueError(f"{flag}: {NO_ADAPTER} mean 'no adapter'; give the adapter another name")
    return [d for _, d in pairs], names


def read_prompts(args) -> list[str]:
    """``--prompt`` (repeatable) then the lines of ``--prompts-file`` (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        args.parser.error("give at least one --prompt, or a --prompts-file with one prompt per line")
    return prompts


def row_adapter_names(args, prompts: list[str], names: list[str] | None) -> list[str | None] | None:
    """The adapter of each prompt from ``--adapter-per-prompt`` (None: the stacked adapters for all)."""
    if args.adapter_per_prompt is None:
        return None
    wanted = [n.strip() for n in args.adapter_per_prompt.split(",")]
    if len(wanted) != len(prompts):
        raise ValueError(f"--adapter-per-prompt names {len(wanted)} adapter(s) but there are {len(prompts)} "
                         "prompts: give one name per prompt ('-' for none)")
    known = names if names is not None else (["default"] if len(args.adapter or []) == 1
                                             else [f"adapter_{i}" for i in range(len(args.adapter or []))])
    unknown = sorted({n for n in wanted if n not in NO_ADAPTER and n not in known})
    if unknown:
        raise ValueError(f"--adapter-per-prompt: unknown adapter(s) {unknown}; loaded: {known} "
                         "(name them with --adapter NAME=DIR; '-' for none)")
    return [None if n in NO_ADAPTER else n for n in wanted]


def cmd_generate(args) -> int:
    from finetune_ref.lora.mixed import set_row_adapters
    from finetune_ref.models.config import check_context
    from finetune_ref.models.batching import Row, generate_batch
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.recipes.inference import load_inference_model

    prompts = read_prompts(args)
    dirs, names = parse_named_adapters(args.adapter)
    per_row = row_adapter_names(args, prompts, names)
    model_dir = resolve_model_dir(args.model, args.cache_dir)
    say_filled_defaults(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_inference_model(model_dir, args.dtype, dirs or None, adapter_names=names,
                                 adapter_scales=args.adapter_scale)
    stop = frozenset({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else ())
    rows = []
    for i, prompt in enumerate(prompts):
        if args.raw:
            ids = tokenizer.encode(prompt, add_bos=False)
        else:
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                 add_generation_prompt=True))
        rows.append(Row(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_ids=stop, seed=None if args.seed is None else args.seed + i,
                        adapter=None if per_row is None else per_row[i]))
    longest = max(len(row.prompt) for row in rows)  # before the weights load: refuse what would run past the context
    check_context(model_dir, longest + args.max_new_tokens,
                  f"the prompt ({longest} tokens) + max_new_tokens={args.max_new_tokens}",
                  lambda context: f"use max_new_tokens <= {context - longest}" if context > longest
                  else "shorten the prompt")
    model = load_inference_model(model_dir, args.dtype, dirs or None, adapter_names=names)
    on_rows = None if per_row is None else (lambda batch: set_row_adapters(model, [r.adapter for r in batch]))
    model.eval()
    generate_batch(model, rows, decode=tokenizer.decode, on_rows=on_rows)
    for i, row in enumerate(rows):
        if len(rows) > 1:
            print(f"--- prompt {i + 1}" + ("" if per_row is None else f" ({row.adapter or 'base'})") + " ---")
        print(row.text)
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts (chat template applied unless --raw)")
    add_model_args(p, dtype_help=INFERENCE_DTYPE_HELP)
    p.add_argument("--prompt", action="append",
                   help="a user message (or raw text with --raw); repeat for several prompts, generated as one batch "
                        "(default: none; give --prompt or --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line, after any --prompt (default: none)")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="adapter directory, optionally named (repeat: stacked for every prompt, or chosen per "
                        "prompt with --adapter-per-prompt; default: none, the base alone)")
    p.add_argument("--adapter-scale", type=weights, help="one factor per --adapter on its scaling, e.g. 1,0.5 "
                                                         "(PEFT's set_scale; default 1 each)")
    p.add_argument("--adapter-per-prompt", metavar="NAME,NAME,...",
                   help="one adapter name per prompt ('-' for the base model): a mixed-adapter batch (default: none, "
                        "the adapters stacked for every prompt)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens to generate at most; prompt + these must fit the model's context "
                        "(max_position_embeddings)")
    p.add_argument("--temperature", type=temperature, default=0.0, help="softmax temperature, 0 = greedy")
    p.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability reaches this")
    p.add_argument("--seed", type=seed, default=None,
                   help="sampling seed, prompt i uses seed + i (default: none, a fresh draw)")
    p.set_defaults(func=cmd_generate, parser=p)
