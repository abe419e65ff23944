"""Map the format's dtype names to torch dtypes (torch is imported only here in the loader)."""

from __future__ import annotations

import torch

from ..format.errors import FormatError


def torch_dtype(name: str, *, tensor: str = "?") -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(
            f"tensor {tensor!r}: dtype {name!r} is not available in torch {torch.__version__}"
        )
    return dtype
