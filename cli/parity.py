"""finetune parity: run the same weights, packed bytes and batch through this reference and each installed peer
(PEFT, bitsandbytes, torchao, transformers) and print where they diverge, by how much, and why.

Exit status: 0 when every divergence is bitwise or explained, 1 when one is unexplained, 2 on bad flags.
"""

from __future__ import annotations

import sys

from finetune_ref.cli.common import resolve_model_dir
from finetune_ref.parity.peers import PEERS, parse_peers

EXIT_UNEXPLAINED = 1


def cmd_parity(args) -> int:
    import warnings

    from finetune_ref.parity import run_parity

    peers = parse_peers(args.peers)  # before any work: a typo fails at once
    _quiet_transformers()
    model_dir = None if args.tiny_only else resolve_model_dir(args.model, args.cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peers' deprecation and "paged on CPU" warnings
        report = run_parity(model_dir, peers, args.dtype, real_model=not args.tiny_only)
    print(report.to_json() if args.json else report.to_markdown())
    unexplained = report.unexplained()
    if unexplained and not args.json:
        print(f"\n{len(unexplained)} unexplained divergence(s): " +
              ", ".join(f"{r.check} [{r.case}] vs {r.peer}" for r in unexplained[:5]), file=sys.stderr)
    return EXIT_UNEXPLAINED if unexplained else 0


def _quiet_transformers() -> None:
    """No weight-loading progress bars between the report's lines (transformers may not be installed)."""
    try:
        from transformers.utils import logging
    except Exception:  # noqa: BLE001 - a missing or broken peer is reported by the run, not here
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def add_parity_parser(sub) -> None:
    p = sub.add_parser("parity", help="check PEFT, bitsandbytes, torchao and transformers against this reference",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file for the real-model checks "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="where converted models are kept (default: "
                   "$FINETUNE_CACHE_DIR or ~/.cache/finetune-ref)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated peers to check (default: all of {','.join(PEERS)}); "
                        "one that is not installed is reported as skipped")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the weights and computation compared (the optimizers always run fp32)")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny random shapes, not the real model")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_parity)
