"""Parity: the reference checks other implementations and says where and why they differ.

    parity.metrics      ulp distance (integer view of the float bits) and the divergence of two tensors
    parity.known        the table of known, explained differences (cause + the file or paper explaining it)
    parity.report       Row / Report: one row per check, Markdown and JSON
    parity.peers        the peers (peft, bnb, torchao, transformers), their versions, the extra installing them
    parity.oracles      the peers' versions of what we compute (shared with the oracle tests)
    parity.checks_*     the checks: NF4, LoRA/QLoRA layers, the model and a training step, optimizers
    parity.run          run_parity(): every check against every installed peer -> Report

``finetune parity`` (cli/parity.py) prints the report.
"""

from finetune_ref.parity.report import Report, Row
from finetune_ref.parity.run import run_parity

__all__ = ["Report", "Row", "run_parity"]
