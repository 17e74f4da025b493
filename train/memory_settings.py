"""What the memory estimator (``memory.py``) takes and gives: one training setup (``MemorySettings``) and the
bytes it needs (``MemoryEstimate``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune_ref.optim import OPTIMIZER_NAMES
from finetune_ref.qlora.quant_state import SUPPORTED_BLOCKSIZES
from finetune_ref.train.memory_shapes import LINEAR_NAMES

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = OPTIMIZER_NAMES  # the names finetune train --optimizer takes (optim/optimizers.py)
# modules_to_save entries the estimator counts: the final norm, each layer's two norms, an untied head
SAVABLE_MODULES = ("norm", "input_layernorm", "post_attention_layernorm", "lm_head")


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """One training setup. Sizes in tokens; dtypes as "fp32"/"bf16"/"fp16".

    Attributes:
        method: "full" (every weight trains), "lora" (frozen base in ``dtype``), "qlora" (NF4 base).
        optimizer: "adamw" (fp32 states), "adamw8bit" (block-wise 8-bit states), "paged_adamw",
            "paged_adamw8bit" (the same, paged off the device): the names of optim/optimizers.py.
        batch_size, seq_len: sequences per micro-batch and tokens per sequence.
        gradient_checkpointing: recompute each decoder layer in backward (models/llama.py).
        dtype: weights and activations of the unquantized model (full: bf16 means fp32 master weights).
        adapter_dtype: LoRA A/B dtype; None means ``dtype``.
        rank: LoRA r; target_modules: which of q/k/v/o/gate/up/down_proj carry adapters (all-linear default),
            and "embed_tokens" for LoRA on the input embedding (lora/embedding.py; a tied head gets it too).
        trainable_tokens: how many embedding rows train directly (lora/trainable_tokens.py), k x hidden
            parameters; a tied head then computes with a saved (V, H) copy of the weight.
        modules_to_save: modules trained in full beside the adapters (lora/modules_to_save.py), any of
            SAVABLE_MODULES: "norm" (the final RMSNorm), "input_layernorm", "post_attention_layernorm" (each
            layer's), "lm_head" (an untied head): a trainable copy in the model dtype, its gradient, optimizer
            state and master copy, and the tensor its weight gradient needs (the normalised input; the head's input).
        dora: DoRA adapters (lora/dora.py): a trained magnitude (out,) per adapted linear, and two more
            (N, out) activations saved per adapted linear (the base output and B(A(x)), multiplied by m / norm).
        double_quant, blocksize: QLoRA's NF4 settings.
        attention_mask: the batches carry an attention mask / document ids (train/data.collate does, so the
            training loop passes one); then SDPA saves a float (B, 1, T, T) mask per layer. False: plain causal.
        keeps_output: the loop holds the step's output, and so its logits, until the next forward returns
            (train/trainer.py keeps ``out``); False for a loop that keeps only the loss.
        chunked_loss: the loss is computed from the hidden states in chunks, without logits (models/loss.py;
            the training recipes' default); False: the plain loss on (B, T, vocab) logits.
        fused_adamw: "adamw" through torch's fused kernel (fp32 parameters: no step temporaries).
        selective_recompute: RMSNorm internals and outputs, SwiGLU products and adapters' casts of them are
            recomputed in backward instead of saved (models/recompute.py, models/norm.py).
        fused_projections: q/k/v and gate/up over the frozen base as one matmul each, the LoRA A's sharing an
            input as one (models/fused.py, lora/fused.py; the recipes' default), and every LoRA branch saving its
            input in its own dtype (lora/branch.py: an adapter dtype other than the activations' casts it again in
            backward, no copy is kept); QLoRA dequantizes a group into one workspace.
        lora_dropout: LoRA dropout in training: each adapter keeps its dropped input and dropout's mask (PEFT's
            ops; the branch above needs every adapter to see the same input).
    """

    method: str = "lora"
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    dtype: str = "bf16"
    adapter_dtype: str | None = None
    rank: int = 8
    target_modules: tuple[str, ...] = LINEAR_NAMES
    dora: bool = False
    lora_dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    trainable_tokens: int = 0
    double_quant: bool = True
    blocksize: int = 64
    attention_mask: bool = True
    keeps_output: bool = True
    chunked_loss: bool = True
    selective_recompute: bool = True
    fused_adamw: bool = False
    fused_projections: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the accepted values."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("batch_size", "seq_len", "rank", "blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dtype", "adapter_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
        if self.method == "full" and self.dtype == "fp16":
            raise ValueError("full fine-tuning in fp16 needs loss scaling, which this project does not implement; "
                             "use dtype 'bf16' or 'fp32'")
        unknown = [t for t in self.target_modules if t not in (*LINEAR_NAMES, "embed_tokens")]
        if unknown or not set(self.target_modules) & set(LINEAR_NAMES):
            raise ValueError(f"target_modules must be a subset of {LINEAR_NAMES} (at least one), plus "
                             f"'embed_tokens' if wanted, got {tuple(self.target_modules)!r}")
        if not set(self.modules_to_save) <= set(SAVABLE_MODULES) or (self.modules_to_save and self.method == "full"):
            raise ValueError(f"modules_to_save must be a subset of {SAVABLE_MODULES} with method lora or qlora, "
                             f"got {tuple(self.modules_to_save)!r}")
        if not isinstance(self.trainable_tokens, int) or self.trainable_tokens < 0 or \
                (self.trainable_tokens and self.method == "full"):
            raise ValueError(f"trainable_tokens (a number of embedding rows) must be an int >= 0 with method lora or "
                             f"qlora, got {self.trainable_tokens!r}")
        if not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool) or \
                not 0.0 <= self.lora_dropout < 1.0 or (self.lora_dropout and self.method == "full"):
            raise ValueError(f"lora_dropout must be a number in [0, 1) with method lora or qlora, got "
                             f"{self.lora_dropout!r}")
        if self.method == "qlora" and self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two in [32, 4096], got {self.blocksize}")


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per class (see the module docstring), the peak of a training step and where it happens.

    Each class holds its largest size during the step: ``activations`` at the end of the forward,
    ``logits_and_loss`` and ``workspace`` at their own largest moment, ``gradients`` all of them. They are not
    all live at once (a full fine-tune frees activations while its gradients appear), so the peak is not their
    sum: ``phases`` maps each moment of the step to {class: bytes live then}; ``peak`` is the largest total,
    reached in ``peak_phase``, and ``live_at_peak`` is that moment's composition.
    """

    parameters: int
    trainable_parameters: int
    weights: int
    quant_constants: int
    lora_parameters: int
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int
    logits_and_loss: int
    workspace: int
    pageable: int
    peak: int
    peak_phase: str
    live_at_peak: dict[str, int]
    phases: dict[str, dict[str, int]]
    gathered: int = 0  # FSDP: parameters all-gathered whole at once (train/memory_fsdp.py); 0 in one process

    @property
    def before_activations(self) -> int:
        """Weights, constants, adapters, gradients, optimizer states and master weights (the "16 B/param")."""
        return (self.weights + self.quant_constants + self.lora_parameters + self.gradients
                + self.optimizer_states + self.master_weights)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "before_activations": self.before_activations}
