"""``run_parity``: every check against every installed peer that was asked for, into one ``Report``.

The checks run on tiny random shapes made on the fly and, unless ``real_model=False``, on the real model:
two of its weights through NF4 (bitsandbytes; torchao where the size allows) and its logits and loss on one
32-token window against transformers. Peers that do not import are skipped, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune_ref.parity.peers import ALWAYS, PEERS, import_error, version
from finetune_ref.parity.report import Report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what --dtype takes
# Real-model weights quantized by the NF4 check: an attention projection and an MLP one (its size, 1536 x 576,
# is a multiple of 64 * 256, which torchao needs).
REAL_WEIGHTS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight")


def _real_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in REAL_WEIGHTS:
                if name in f.keys():
                    found[name.removeprefix("model.").removesuffix(".weight")] = f.get_tensor(name)
    missing = [n for n in REAL_WEIGHTS if n.removeprefix("model.").removesuffix(".weight") not in found]
    if missing:
        raise ValueError(f"{model_dir} has no {missing[0]}: parity's real-model checks expect a Llama checkpoint")
    return found


def run_parity(model_dir: str | Path | None = None, peers: tuple[str, ...] = tuple(PEERS), dtype: str = "fp32",
               real_model: bool = True) -> Report:
    """Run the checks and return the report.

    Args:
        model_dir: the Hugging Face directory of the real model (None: skip the real-model checks).
        peers: names from ``parity.peers.PEERS``; those that do not import are skipped.
        dtype: "fp32" or "bf16": the dtype of the weights and computation of the NF4, LoRA, model and step
            checks (the QLoRA layer runs at both compute dtypes; the optimizers in fp32).
        real_model: also check the real model (needs ``model_dir``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from finetune_ref.parity.checks_lora import check_lora_layer, check_qlora_layer
    from finetune_ref.parity.checks_model import check_real_model, check_tiny_model
    from finetune_ref.parity.checks_nf4 import check_nf4
    from finetune_ref.parity.checks_optim import check_optimizers

    torch_dtype = DTYPES[dtype]
    report = Report(settings={"model": str(model_dir) if model_dir and real_model else None, "dtype": dtype,
                              "peers": list(peers)})
    report.versions = {"finetune-ref": version("finetune-ref") or "?", "torch": torch.__version__}
    available = set(ALWAYS)
    for peer in peers:
        why = import_error(peer)
        if why is None:
            available.add(peer)
            report.versions[PEERS[peer]] = version(PEERS[peer]) or "?"
        else:
            report.skipped[peer] = why
    real = model_dir is not None and real_model
    weights = _real_weights(Path(model_dir)) if real and available & {"bnb", "torchao"} else {}

    report.add(*check_nf4(available, torch_dtype, weights))
    if {"peft", "transformers"} <= available:  # PEFT needs transformers
        report.add(*check_lora_layer(torch_dtype))
        if "bnb" in available:
            for compute_dtype in DTYPES.values():
                report.add(*check_qlora_layer(compute_dtype))
    if "transformers" in available:
        report.add(*check_tiny_model(available, torch_dtype))
        if real:
            report.add(*check_real_model(Path(model_dir), torch_dtype))
    report.add(*check_optimizers(available))
    return report
