"""Optimizers: AdamW with fp32 master weights for 16-bit parameters, states paged to host memory, 8-bit states.

This room imports nothing else of the project. ``build_optimizer`` builds one by the name ``finetune train
--optimizer`` takes (``OPTIMIZER_NAMES``).
"""

from finetune_ref.optim.optimizers import OPTIMIZER_NAMES, build_optimizer

__all__ = ["OPTIMIZER_NAMES", "build_optimizer"]
