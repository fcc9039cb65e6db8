"""pocl_core: the POCL curriculum-distillation library (no orchestration imports).

Losses, difficulty measurers, partitioning, the stage schedule, data loading, the training step and
evaluation, usable from a notebook without Prefect or Ray.
"""

__version__ = "0.4.1"
