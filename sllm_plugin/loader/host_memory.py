"""One page-aligned host allocation per load, owned by torch, backed by huge pages if possible."""

from __future__ import annotations

import torch

from .. import _fastio

HUGE_PAGE = 2 * 1024 * 1024


def allocate_host(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A 1-D uint8 tensor of `nbytes` whose first byte is 2 MiB-aligned.

    Reading into fresh memory pays a page fault per page on first touch, which on a small
    machine costs more than the copy itself; asking for transparent huge pages before the first
    touch cuts the faults 512-fold. The alignment also satisfies O_DIRECT. The caller's tensors
    are views of this buffer, so it lives exactly as long as any of them.
    """
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % HUGE_PAGE
    buf = raw[shift : shift + nbytes]
    usable = nbytes // HUGE_PAGE * HUGE_PAGE
    if usable:
        _fastio.advise_hugepages(buf.data_ptr(), usable)
    return buf
