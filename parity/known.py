"""The known, explained differences between this reference and its peers.

Each entry names the checks and peers it covers (``fnmatch`` patterns), the cause, the file or paper that
explains it, and a bound: a divergence larger than the bound is not explained by the cause and is reported
as unexplained. docs/parity.md describes each entry at length. Bounds are set a little above what the
installed versions measure (docs/parity.md has the numbers), never so loose that a real bug would pass:
a wrong NF4 code or a perturbed weight moves outputs by > 1e-3 relative.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from finetune_ref.parity.metrics import Divergence


@dataclass(frozen=True)
class KnownDifference:
    key: str  # short name, used in docs/parity.md
    checks: tuple[str, ...]  # fnmatch patterns on Row.check
    peers: tuple[str, ...]
    cause: str
    reference: str  # the file or paper that explains it
    max_rel: float  # normwise relative error bound
    max_mismatch_fraction: float = 1.0  # share of elements allowed to differ at all
    dtypes: tuple[str, ...] = ("*",)

    def covers(self, check: str, peer: str, dtype: str, d: Divergence) -> bool:
        return (any(fnmatch.fnmatch(check, c) for c in self.checks) and peer in self.peers
                and any(fnmatch.fnmatch(dtype, t) for t in self.dtypes)
                and d.max_rel <= self.max_rel and d.mismatched <= self.max_mismatch_fraction * d.numel)


KNOWN_DIFFERENCES: tuple[KnownDifference, ...] = (
    KnownDifference(
        "torchao-nf4-table", ("nf4.codes",), ("torchao",),
        "torchao's NF4 table is rounded to 4 decimals and it scales by dividing by absmax in the weight dtype "
        "(bitsandbytes multiplies by the fp32 reciprocal): values near a midpoint take the neighbouring code",
        "torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py (NF4Tensor.from_tensor, "
        "convert_to_norm_float_weight)",
        max_rel=1.0, max_mismatch_fraction=0.01),
    KnownDifference(
        "torchao-int8-scalers", ("nf4.absmax",), ("torchao",),
        "torchao's second level is int8 linear (round(x * 256 / (2 absmax)), one factor per 256 blocks, in the "
        "weight dtype); bitsandbytes' is the signed 8-bit dynamic map with fp32 scalers (QLoRA section 3)",
        "torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py (double_quantize_scalers)",
        max_rel=0.02),
    KnownDifference(
        "torchao-nf4", ("nf4.dequantized",), ("torchao",),
        "both torchao differences together: most values differ by the absmax difference (< 1%), and where a "
        "code differs by one NF4 step (at most 0.30 of the block's absmax)",
        "torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py (get_original_weight)",
        max_rel=0.35),
    KnownDifference(
        "bnb-cpu-dequant", ("nf4.dequantized_native", "step.qlora_bnb_edge.*"), ("bnb", "peft+bnb"),
        "bitsandbytes' native CPU dequantize_4bit reads the wrong blocks when the last dimension is even and "
        "not a multiple of the blocksize (its quantize and its pure-PyTorch dequantize are right); a QLoRA "
        "model with such a layer (here down_proj, in_features 96) computes with wrong weights",
        "bitsandbytes/backends/cpu/ops.py (dequantize_4bit); "
        "tests/test_nf4.py::test_bnb_native_cpu_dequantize_bug_is_documented",
        max_rel=float("inf")),
    KnownDifference(
        "peft-bnb-adapter-rounding", ("qlora.forward", "step.qlora.*"), ("peft+bnb",),
        "PEFT's bitsandbytes Linear4bit rounds the fp32 adapter output to the compute dtype before adding it "
        "to the base output (two roundings); its plain Linear, like ours, adds in fp32 and rounds once. In a "
        "model every adapted layer does it, so the loss and the gradients move by a few bf16 ulps too",
        "peft/tuners/lora/bnb.py (Linear4bit.forward: output.to(expected_dtype))",
        max_rel=2 ** -6, dtypes=("bf16", "fp16")),
    KnownDifference(
        "loss-reduction", ("model.loss", "step.*.loss"), ("transformers", "peft", "peft+bnb"),
        "our loss is a sum over tokens divided by their count (so that gradient accumulation divides once by "
        "the whole batch's count); transformers takes cross_entropy's mean: the last bit may differ",
        "models/llama.py (causal_lm_loss); transformers/loss/loss_utils.py (fixed_cross_entropy)",
        max_rel=1e-6),
    KnownDifference(
        "adam-first-step", ("step.*.adapter_update",), ("peft", "peft+bnb"),
        "AdamW's first update is lr * g / (|g| + eps), about lr * sign(g) per element: where the gradients "
        "differ in the last bits (see the adapter_grads row), an element near zero can move by lr either way",
        "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, Algorithm 2; torch/optim/adamw.py",
        max_rel=2.01),
    KnownDifference(
        "bnb-adam-arithmetic", ("optim.*",), ("bnb",),
        "bitsandbytes' CPU kernels update the first moment as m*beta1 + g*(1-beta1) (torch and we use lerp) and "
        "order the bias corrections and the division differently: a few fp32 ulps per step",
        "bitsandbytes/backends/cpu/ops.py, bitsandbytes/backends/default/ops.py (optimizer update); "
        "torch/optim/adamw.py (_single_tensor_adamw)",
        max_rel=1e-6),
    KnownDifference(
        "bnb-8bit-code-flip", ("optim.*8bit.*",), ("bnb",),
        "over several steps those last-bit differences in a moment can move it across a boundary of the 8-bit "
        "map: that code differs by one and its element moves by up to one learning rate",
        "optim/blockwise8.py; tests/test_adamw8bit.py::test_trajectory_within_tolerance_of_bitsandbytes_over_10_steps",
        max_rel=0.1, max_mismatch_fraction=1e-3),
)

def explain(check: str, peer: str, dtype: str, d: Divergence) -> KnownDifference | None:
    """The first known difference that covers this divergence, or None (unexplained)."""
    return next((k for k in KNOWN_DIFFERENCES if k.covers(check, peer, dtype, d)), None)
