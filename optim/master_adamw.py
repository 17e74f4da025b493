"""AdamW with fp32 master weights: the optimizer of mixed-precision full fine-tuning.

The model's parameters may be bf16 (or fp16). For each such parameter the optimizer keeps, in fp32,

    master      a copy of the weight (4 bytes/param)
    exp_avg     Adam's first moment m (4 bytes/param)
    exp_avg_sq  Adam's second moment v (4 bytes/param)

and one update is: upcast the 16-bit gradient, apply AdamW to the fp32 master, then round the master to the
parameter's dtype (round-to-nearest-even, ``Tensor.copy_``). With the 2-byte weight and the 2-byte gradient this
is the 16 bytes/parameter of mixed-precision training (Micikevicius et al. 2018, "Mixed Precision Training",
section 3.1; the ZeRO paper's accounting, Rajbhandari et al. 2020, section 3.1: 2 + 2 + 12 = 16 bytes).

Why the master copy: bf16 has 8 significant bits, so an update smaller than half a unit in the last place of
the weight (|w| * 2^-9) is rounded away. With lr = 1e-5 and Adam's normalised step of about lr, every weight
with |w| > ~0.005 would never move in pure bf16. The fp32 master accumulates those small updates until they
cross a bf16 rounding boundary (``tests/test_full.py`` shows both behaviours).

Parameters that are already fp32 get no master copy (the parameter is its own master): then this optimizer is
exactly ``torch.optim.AdamW`` (bitwise: the same operations in the same order as torch/optim/adam.py
``_single_tensor_adam`` with ``decoupled_weight_decay=True``).

The gradient is upcast one parameter at a time, so the only transient extra memory is one fp32 copy of the
largest gradient (the embedding's, 576 x 49152 x 4 = 113 MB for SmolLM2-135M), not a second set of fp32 grads.
"""

from __future__ import annotations

import math

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update, in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (all fp32, same shape).

    Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2 (AdamW), with Adam's bias
    correction (Kingma & Ba 2015, Algorithm 1). ``step`` is the 1-based number of this update. The operation
    order is torch.optim.AdamW's single-tensor path, so fp32 results are bitwise equal to it.

        param      <- param * (1 - lr * weight_decay)                     (decoupled decay)
        exp_avg    <- beta1 * exp_avg + (1 - beta1) * grad                 (as lerp)
        exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * grad^2
        param      <- param - lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW keeping fp32 master weights and fp32 moments for 16-bit parameters (see the module docstring).

    Args:
        params: parameters or param groups, as for any torch optimizer; dtypes fp32, bf16 or fp16.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled).

    State per parameter (``optimizer.state[p]``): ``step`` (fp32 scalar tensor, as torch's AdamW),
    ``exp_avg``, ``exp_avg_sq`` (fp32, p's shape) and, for 16-bit p only, ``master`` (fp32, p's shape).

    Raises:
        ValueError: lr, eps or weight_decay negative or not finite; betas outside [0, 1).
        TypeError: a parameter that is not floating point.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"MasterWeightAdamW needs floating-point parameters, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one update to every parameter that has a gradient (parameters without one are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("MasterWeightAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                    if p.dtype in LOW_PRECISION:
                        state["master"] = p.detach().to(torch.float32, copy=True)
                state["step"] += 1
                master = state.get("master", p)
                grad = p.grad if p.grad.dtype == torch.float32 else p.grad.to(torch.float32)  # one param at a time
                adamw_update_(master, grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(),
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                if master is not p:
                    p.copy_(master)  # round the fp32 master to nearest (even) in p's dtype
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``, keeping the moments and the master copy in fp32.

        (``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype,
        which would round the fp32 master and moments of a bf16 parameter to bf16.)

        Raises:
            ValueError: a different number of groups or parameters, or a state tensor of the wrong shape.
        """
        groups, saved_groups = self.param_groups, state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
            raise ValueError(f"optimizer state has {len(saved_groups or [])} param groups, this optimizer "
                             f"{len(groups)}")
        id_to_param = {}
        for group, saved in zip(groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"a saved param group has {len(saved['params'])} parameters, the optimizer's "
                                 f"{len(group['params'])}")
            id_to_param.update(zip(saved["params"], group["params"]))
        new_state = {}
        for key, value in state_dict.get("state", {}).items():
            if key not in id_to_param:
                raise ValueError(f"optimizer state refers to parameter {key!r}, which no param group lists")
            p = id_to_param[key]
            entry = {}
            for name, tensor in value.items():
                if name != "step" and tuple(tensor.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state '{name}' has shape {tuple(tensor.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
                entry[name] = tensor.detach().to(device=p.device, dtype=torch.float32, copy=True)
            if p.dtype in LOW_PRECISION and "master" not in entry:
                raise ValueError("optimizer state of a 16-bit parameter lacks its fp32 'master' copy")
            new_state[p] = entry
        self.state.clear()
        self.state.update(new_state)
        for group, saved in zip(groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
