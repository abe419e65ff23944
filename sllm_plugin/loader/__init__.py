"""The multi-tier loader: plans aligned reads, runs them on the compiled core, lands tensors.

Public entry points: `load_state_dict`, `iter_state_dict` (streaming, for engines that consume
tensors while later ones are still being read), `verify_checkpoint`.
"""

from .api import LoadStats, default_threads, iter_state_dict, load_state_dict
from .verify import VerifyReport, verify_checkpoint

__all__ = [
    "LoadStats",
    "VerifyReport",
    "default_threads",
    "iter_state_dict",
    "load_state_dict",
    "verify_checkpoint",
]
