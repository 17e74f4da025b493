"""What every method's recipe shares: the settings of a run beyond the loop's (``RunConfig``) and what a recipe's
``build`` gives the loop (``Trainable``).

A recipe (``full.py``, ``lora.py``, ``qlora.py``) is one frozen dataclass: ``RunConfig`` plus the method's own
settings, with the method's defaults, and a ``build(model_dir, info)`` that loads the base the way the method
trains it. ``finetune train`` makes one with ``dataclasses.replace(Recipe(), **the flags given)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, ClassVar

from torch import nn

from finetune_ref.lora.fused import fuse_projections
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.distributed import DistInfo

DTYPES = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What a recipe's ``build`` returns to the run."""

    model: nn.Module                              # the model to train (the base loaded as the method trains it)
    metadata: dict                                # what a resume must match (checked by the Checkpointer)
    export: Callable[[nn.Module, Path], object]   # writes the result into a directory; called on every rank
    what: str                                     # what the result is called ("adapter", "model", ...)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(TrainConfig):
    """One run of ``finetune train``: the loop's settings (``TrainConfig``), and where the model, data and output
    are, how the data is cut into batches, checkpoints and parallelism.

    Raises:
        ValueError: on construction, naming the bad field.
    """

    method: ClassVar[str]                # the recipe's name (``--method``)

    model: str | None = None             # HF directory or .gguf file; None: the embedded SmolLM2-135M-Instruct
    cache_dir: str | None = None         # where converted models are kept; None: $FINETUNE_CACHE_DIR or ~/.cache
    dtype: str | None = None             # the unquantized base weights; None: what the precision implies
    data: str | None = None              # .txt file, folder or .jsonl; None: Python's docs (pydoc_data.topics)
    eval_data: str | None = None         # a separate held-out set (then all of ``data`` trains)
    eval_fraction: float = 0.1           # share of ``data`` held out (train/data.py says which part)
    eval_tokens: int = 65536             # held-out tokens evaluated at most (train/data.cap_tokens; 0: all)
    seq_len: int = 256                   # tokens per sequence
    batch_size: int = 4                  # sequences per micro-batch, per process
    out: str | None = None               # the result, metrics.jsonl and checkpoints/; None: runs/<method>
    grad_checkpointing: bool = False     # recompute each decoder layer in backward (models/llama.py)
    chunked_loss: bool = True            # cross-entropy from the hidden states in chunks, no logits (models/loss.py)
    # Recompute RMSNorm internals and outputs, SwiGLU products and adapters' casts of them in backward instead of
    # storing them (models/recompute.py; bitwise the same gradients): under 5% of step time, measured in turns
    # (benchmarks/bench_training.py --recompute-cost); --no-selective-recompute turns it off.
    selective_recompute: bool = True
    # One matmul for the frozen q/k/v and gate/up, and for the LoRA A's sharing an input (models/fused.py,
    # lora/fused.py, lora/branch.py); trainable (full) or FSDP-sharded bases run unfused.
    fused_projections: bool = True
    compile: bool = False                # torch.compile each decoder layer in place (names and files unchanged)
    save_every: int = 0                  # updates between checkpoints (0: only at the end and on Ctrl-C)
    keep_last: int = 2                   # checkpoints kept (0: all)
    resume: str | None = None            # a checkpoint, or the out directory of an interrupted run
    parallel: str = "ddp"                # under torchrun: replicate (ddp) or shard with FSDP2 (fsdp)
    seed: int = 0                        # initialisation (LoRA's A) and data order
    plot: bool = False                   # draw the curves into out/loss.png at the end (train/plots.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or None, got {self.dtype!r}")
        if not isinstance(self.eval_tokens, int) or self.eval_tokens < 0:
            raise ValueError(f"eval_tokens must be an integer >= 0 (0: no cap), got {self.eval_tokens!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.optimizer != "adamw":
            # optim/'s paged and 8-bit optimizers allocate per-tensor state from the parameter, which under FSDP2
            # is a DTensor shard; torch.optim.AdamW's state shards with it.
            raise ValueError(f"--parallel fsdp steps the parameter shards with AdamW: add --optimizer adamw "
                             f"(--optimizer {self.optimizer} does not handle FSDP2's sharded parameters)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.method}")

    def trained_dtype(self, world_size: int = 1) -> str:
        """The dtype the precision trains: bf16 for "bf16", except under FSDP on several processes, whose fp32
        shards are the master copy (FSDP2 casts them to bf16 for compute); else fp32. Frozen weights need no
        master copy: LoRA and QLoRA keep their base in the precision's dtype under FSDP too."""
        sharded = self.parallel == "fsdp" and world_size > 1
        return "bf16" if self.precision == "bf16" and not sharded else "fp32"

    def base_dtype(self, world_size: int = 1) -> str:
        """The dtype to load the unquantized base weights in: ``dtype``, else ``trained_dtype``."""
        return self.dtype or self.trained_dtype(world_size)

    def configure_model(self, model: nn.Module) -> None:
        """Set the model's training switches (models/llama.py) from this config; call after ``build``."""
        model.model.gradient_checkpointing = self.grad_checkpointing
        model.chunked_loss = self.chunked_loss
        model.model.selective_recompute = self.selective_recompute
        # FSDP2 (train/fsdp.py) re-points every parameter at its shard: the stacked views would not survive it.
        fuse_projections(model, self.fused_projections and self.parallel != "fsdp")
        if self.compile:
            # Module.compile compiles in place: parameter names, state dicts and exported files stay as they are.
            for layer in model.model.layers:
                layer.compile()

    def check_data_paths(self, flag) -> None:
        """``data`` and ``eval_data`` exist (``flag(field)``: the flag to name), before anything is loaded.

        Raises:
            FileNotFoundError: naming the flag and the path.
        """
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{flag(name)} {path}: no such file or directory")

    def check_shapes(self, model_dir, flag) -> None:
        """What the method's settings need of ``model_dir``'s shapes, checked from its config.json (or of a
        ``LlamaConfig`` given instead, as ``finetune memory`` has one) before any weight loads (``flag(field)``:
        the flag to name). Nothing for full fine-tuning."""

    def build(self, model_dir: Path, info: DistInfo) -> Trainable:
        """Load ``model_dir`` the way the method trains it; see the recipes."""
        raise NotImplementedError
