"""One matmul for the frozen linears of a block that read the same input: q/k/v, and gate/up.

q_proj, k_proj and v_proj all read the attention's normalised input x, gate_proj and up_proj the MLP's. With their
weights frozen (LoRA, QLoRA, inference) the three products x W_q^T, x W_k^T, x W_v^T are one product with the
stacked weight [W_q; W_k; W_v] (sum of out_features, in_features), split by columns afterwards; in backward the
input gradient is one matmul dy_cat @ W_cat instead of three and two additions. A CPU GEMM at these shapes runs
closer to its peak on one wide matrix than on three narrow ones, and pays the per-call overhead once.

Storage (dense base): the stacked weight is the only copy. Each Hugging Face-named weight (``q_proj.weight``, or
``q_proj.base_layer.weight`` under LoRA) stays the same ``nn.Parameter`` object, its data pointed at its rows of
the stacked tensor (``param.data = rows``), so state-dict keys and values, saved files, parameter counts,
``load_state_dict`` (``copy_`` into the rows) and merging LoRA into the base (``copy_`` as well) are unchanged.
``Module._apply`` (``.to(dtype)``, ``.half()``, a device move) gives each parameter new storage: the owner module
(``FusedProjections._apply``) stacks them again afterwards. Anything else that re-points a parameter (FSDP2's
sharding, ``load_state_dict(assign=True)``) is seen at the next call (``ProjectionGroup.stacked_weight``) and that
group runs unfused.

Quantized base (``qlora.nf4_linear.NF4Linear``, duck-typed: ``dequantize_into(out)``, ``compute_dtype``,
``matmul_backend(x)``): the packed codes stay per layer, byte for byte as bitsandbytes stores them; each layer
dequantizes into its rows of one workspace and one matmul follows (``FrozenStackedMatmul``), again in backward,
so no dequantized weight lives between forward and backward (QLoRA, Dettmers et al. 2023, section 3; as
``kernels/nf4_autograd.py`` for one layer). On CUDA the layers keep their fused Triton kernels (unfused here).

Numerics: a column block of one GEMM is not guaranteed to be bitwise the GEMM of that block alone (the library
may block or vectorise the wider matrix differently), so outputs and input gradients match the unfused path
within the tolerance of reordered float sums (tests/test_fused_projections.py states it per dtype).

The model only calls ``owner.fused_projections(owner, x)``; ``lora.fused`` adds the LoRA adapters on top (with
their A matrices stacked the same way) and installs the groups (``recipes.base.RunConfig.configure_model``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def base_of(module: nn.Module) -> nn.Module:
    """The frozen base of a projection: LoRA wraps it as ``base_layer`` (PEFT's name); else the module itself."""
    return getattr(module, "base_layer", module)


def _is_dense_frozen(base: nn.Module) -> bool:
    return (type(base) is nn.Linear and type(base.weight.data) is torch.Tensor and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad))


def _stack_into_views(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack the parameters' data along dim 0 into one new tensor and point each parameter at its rows."""
    stacked = torch.cat([t.detach() for t in tensors])  # (sum of rows, ...)
    for t, rows in zip(tensors, stacked.split([t.shape[0] for t in tensors])):
        t.data = rows
    return stacked


def _views_intact(tensors: list[torch.Tensor], stacked: torch.Tensor) -> bool:
    """Do the parameters still alias consecutive rows of ``stacked``? (a few pointer comparisons per call)"""
    offset = stacked.data_ptr()
    for t in tensors:
        if t.dtype != stacked.dtype or t.device != stacked.device or t.data_ptr() != offset:
            return False
        offset += t.numel() * t.element_size()
    return True


class FrozenStackedMatmul(torch.autograd.Function):
    """y = x @ W^T (+ bias) with W (N, K) made by ``make_weight(dtype)`` on each call and dropped after it:
    forward keeps no dequantized weight, backward makes it again for dx = dy @ W (the frozen weight gets no
    gradient; a frozen bias neither). Shapes: x (..., K) -> y (..., N)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, make_weight: Callable[[torch.dtype], torch.Tensor],
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.make_weight = make_weight
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
        return F.linear(rows, make_weight(x.dtype), bias).view(*x.shape[:-1], -1)  # (M, N) -> (..., N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        rows = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # (M, N)
        grad_x = (rows @ ctx.make_weight(grad_y.dtype)).view(*grad_y.shape[:-1], -1)  # (M, K) -> (..., K)
        return grad_x, None, None


class ProjectionGroup:
    """The projections ``names`` of one owner module (an Attention or MLP) that read the same input.

    A plain object, not an ``nn.Module``: it adds nothing to the state dict or the parameter list. It looks the
    projections up on the owner at each call, so wrapping them later (LoRA injection) keeps it working.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.weight: torch.Tensor | None = None  # (sum of out_features, in_features): the dense bases' storage
        self.bias: torch.Tensor | None = None    # (sum of out_features,) when the bases have biases

    def bases(self, owner: nn.Module) -> list[nn.Module]:
        return [base_of(getattr(owner, name)) for name in self.names]

    @torch.no_grad()
    def fuse_(self, owner: nn.Module) -> bool:
        """Stack the dense frozen bases' weights (and biases) into one tensor each, the named parameters
        becoming views of it. Returns whether the bases are stacked; False leaves them as they are (a trainable,
        quantized or mixed base; different dtypes or devices)."""
        bases = self.bases(owner)
        self.weight = self.bias = None
        if not all(_is_dense_frozen(b) for b in bases):
            return False
        weights = [b.weight for b in bases]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return False
        has_bias = [b.bias is not None for b in bases]
        if any(has_bias) and not all(has_bias):
            return False
        biases = [b.bias for b in bases] if all(has_bias) else []
        if biases and {(t.dtype, t.device) for t in biases} != {(weights[0].dtype, weights[0].device)}:
            return False
        self.weight = _stack_into_views(weights)
        self.bias = _stack_into_views(biases) if biases else None
        return True

    def stacked_weight(self, bases: list[nn.Module]) -> torch.Tensor | None:
        """The stacked dense weight if the bases' parameters are still its views and still frozen, else None."""
        if self.weight is None or not all(_is_dense_frozen(b) for b in bases):
            return None
        if not _views_intact([b.weight for b in bases], self.weight):
            return None
        if self.bias is not None and not _views_intact([b.bias for b in bases], self.bias):
            return None
        return self.weight

    def base_outputs(self, owner: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each base's output x W_i^T (+ b_i), from one matmul, as column blocks (views) of it; None where the
        bases cannot be run together (then each runs alone)."""
        bases = self.bases(owner)
        sizes = [b.out_features for b in bases]
        weight = self.stacked_weight(bases)
        if weight is not None:
            if x.dtype != weight.dtype:
                return None  # nn.Linear would raise; let it, with its own message
            return list(F.linear(x, weight, self.bias).split(sizes, dim=-1))  # (..., N) -> (..., n_i) each
        if not all(callable(getattr(b, "dequantize_into", None)) for b in bases):
            return None
        compute = {b.compute_dtype for b in bases}
        if len(compute) != 1 or any(b.matmul_backend(x) != "torch" for b in bases):
            return None  # e.g. CUDA: each NF4 layer keeps its fused dequantize-matmul kernel
        dtype = compute.pop()
        has_bias = [b.bias is not None for b in bases]
        if (any(has_bias) and not all(has_bias)) or any(b.bias is not None and b.bias.requires_grad for b in bases):
            return None  # FrozenStackedMatmul gives a frozen bias no gradient
        bias = torch.cat([b.bias.to(dtype) for b in bases]) if all(has_bias) else None  # (N,) small, per call

        device = x.device  # not x itself: the closure lives until backward and must not keep x alive

        def make_weight(dt: torch.dtype) -> torch.Tensor:
            workspace = torch.empty(sum(sizes), bases[0].in_features, dtype=dt, device=device)  # (N, K)
            for b, rows in zip(bases, workspace.split(sizes)):
                b.dequantize_into(rows)
            return workspace

        # As NF4Linear.forward: the input in the compute dtype, the output back in the input's dtype.
        y = FrozenStackedMatmul.apply(x.to(dtype), make_weight, bias).to(x.dtype)
        return list(y.split(sizes, dim=-1))  # (..., N) -> (..., n_i) each

    def adapted(self, owner: nn.Module, x: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The projections' outputs from their bases' outputs. Plain projections only here (``lora.fused`` adds
        the adapters); None when a projection wraps its base (then each runs alone)."""
        if any(base_of(getattr(owner, name)) is not getattr(owner, name) for name in self.names):
            return None
        return outputs

    def usable(self, owner: nn.Module) -> bool:
        """Whether to fuse at all this call (``lora.fused`` says no for DoRA, which keeps each base output)."""
        return True

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The projections of x, in ``names`` order: fused where possible, else each module's own forward."""
        outputs = self.base_outputs(owner, x) if self.usable(owner) else None
        if outputs is not None:
            outputs = self.adapted(owner, x, outputs)
        if outputs is None:
            return tuple(getattr(owner, name)(x) for name in self.names)
        return tuple(outputs)


class FusedProjections(nn.Module):
    """Base of Attention and MLP: holds their ``ProjectionGroup`` (None: unfused) and stacks the dense bases
    again after ``Module._apply`` gave the parameters new storage (``.to(dtype)``, ``.half()``, device moves)."""

    fused_projections: ProjectionGroup | None = None

    def project(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        if self.fused_projections is not None:
            return self.fused_projections(self, x)
        return tuple(getattr(self, name)(x) for name in names)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self.fused_projections is not None:
            self.fused_projections.fuse_(self)
        return result
