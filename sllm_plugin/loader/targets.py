"""Read a checkpoint straight into tensors that already exist (an engine's parameters).

This is the `engine` layout's fast path. Two ways:
- `load_into` copies: the bytes go from the file into the parameter's own memory, once. On CPU
  the reads land directly in the parameters (buffered where a parameter's address is not
  O_DIRECT-aligned); on CUDA they go through the same bounded pinned ring as a plain CUDA load,
  one copy per unit into the parameter's slice.
- `map_into` does not copy at all (CPU only): each parameter's storage becomes a view of a
  private (copy-on-write) mapping of the checkpoint's data file. The pages are the page cache's
  (or the DRAM tier's shared memory), shared by every replica on the server; a parameter the
  engine later modifies in place gets private copies of just the pages it writes. The files are
  only ever replaced by rename, never rewritten in place, so a mapping never changes under a
  running engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..format.errors import FormatError
from ..format.reader import Checkpoint, open_checkpoint
from ..format.spec import ALIGNMENT, DEFAULT_CHUNK_BYTES
from .api import LoadStats, default_threads
from .dtypes import torch_dtype
from .io_engine import FileSet, run_parallel
from .mapping import map_files, populate_worker
from .plan import ReadUnit
from .verify import verify_checkpoint


@dataclass(frozen=True)
class _TargetUnit:
    unit: ReadUnit
    tensor: str
    target_offset: int  # bytes into the target tensor


def live_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's names mapped to the module's own tensor objects (not detached copies).

    Tied parameters appear under each of their names, as in `state_dict()`.
    """
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    return {name: live[name] for name in model.state_dict()}


def check_targets(ckpt: Checkpoint, targets: Mapping[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes must match exactly; a mismatch names every offender.

    An alias is checked like every other name, against the stored tensor it stands for: the
    model's tensor under the alias name must have that tensor's shape and dtype too (filling
    it would otherwise cast or broadcast, and mapping it would change its shape and dtype).
    """
    index = ckpt.index
    stored = {t.name: t for t in index.tensors}
    entries = {**stored, **{alias: stored[target] for alias, target in index.aliases.items()}}
    missing = sorted(set(targets) - set(entries))
    unexpected = sorted(set(entries) - set(targets))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:10]}")
    for name, entry in entries.items():
        target = targets.get(name)
        if target is None:
            continue
        what = repr(name) if name in stored else f"{name!r} (an alias of {entry.name!r})"
        want_dtype = str(target.dtype).removeprefix("torch.")
        if list(target.shape) != entry.shape or want_dtype != entry.dtype:
            problems.append(
                f"{what}: checkpoint has {entry.dtype} {entry.shape}, the model expects "
                f"{want_dtype} {list(target.shape)}"
            )
        elif not target.is_contiguous():
            problems.append(f"{what}: the model's tensor is not contiguous")
    if problems:
        raise FormatError(f"{ckpt.directory}: checkpoint does not fit the model: "
                          + "; ".join(problems))


def load_into(
    path: str | Path,
    targets: Mapping[str, torch.Tensor],
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    chunk_bytes: int | None = None,
    stats: LoadStats | None = None,
) -> LoadStats:
    """Fill `targets` (name -> existing tensor) from the checkpoint at `path`.

    Every stored tensor must have a target of the same shape and dtype, and every target a
    stored tensor (aliases count: tied parameters are filled once through their shared memory).
    With `verify`, each tensor's checksum is checked in place after the read (CPU targets), or
    a full checksum pass over the files runs first (CUDA targets, whose memory we cannot hash).
    """
    ckpt = open_checkpoint(path)
    check_targets(ckpt, targets)
    on_cuda = any(t.device.type == "cuda" for t in targets.values())
    if verify and on_cuda:
        verify_checkpoint(path, threads=threads, direct_io=direct_io)
    threads = threads or default_threads()
    chunk = chunk_bytes or DEFAULT_CHUNK_BYTES
    units: list[_TargetUnit] = []
    for entry in ckpt.index.tensors:
        for start in range(0, entry.bytes, chunk):
            length = min(chunk, entry.bytes - start)
            units.append(_TargetUnit(
                ReadUnit(file=entry.file, offset=entry.offset + start, length=length, dest=0),
                entry.name, start))
    stats = stats if stats is not None else LoadStats()
    stats.path, stats.threads, stats.verified = str(path), threads, verify
    stats.bytes = ckpt.index.tensor_bytes
    stats.files = len(ckpt.index.files)
    devices = {t.device.type for t in targets.values()}
    if devices - {"cpu", "cuda"} or len(devices) > 1:
        raise ValueError(f"targets must all be on cpu or all on cuda, got {sorted(devices)}")
    stats.device = devices.pop() if devices else "cpu"
    started = time.perf_counter()
    with FileSet(ckpt.file_paths, direct_io) as files:
        stats.direct_files = files.direct_files
        if stats.device == "cpu":
            _read_to_host(files, ckpt, units, targets, threads)
            if verify:
                _check_in_place(ckpt, targets)
        else:
            _read_to_cuda(files, ckpt, units, targets, threads, chunk)
        # A tied pair in the checkpoint that the model keeps as two tensors: fill the second.
        for alias, target in ckpt.index.aliases.items():
            if targets[alias].data_ptr() != targets[target].data_ptr():
                targets[alias].copy_(targets[target])
    stats.seconds = time.perf_counter() - started
    return stats


def map_into(
    path: str | Path,
    targets: Mapping[str, torch.Tensor],
    *,
    threads: int | None = None,
    verify: bool = False,
    chunk_bytes: int | None = None,
    stats: LoadStats | None = None,
) -> LoadStats:
    """Make every CPU tensor in `targets` a view of the checkpoint's mapped data files.

    `targets` must be the live tensors (parameters and buffers, not `state_dict()`'s detached
    copies): their `.data` is replaced, so the module keeps its Parameter objects and their
    attributes. The mapping is populated by `threads` threads in parallel (reading from disk
    what is not cached) before this returns, so the first forward pass takes no page faults
    on the weights. With `verify`, each tensor's checksum is checked on the mapped bytes.
    """
    ckpt = open_checkpoint(path)
    check_targets(ckpt, targets)
    devices = {t.device.type for t in targets.values()}
    if devices - {"cpu"}:
        raise ValueError(f"map_into maps into CPU tensors only, got {sorted(devices)}")
    threads = threads or default_threads()
    chunk = chunk_bytes or DEFAULT_CHUNK_BYTES
    stats = stats if stats is not None else LoadStats()
    stats.path, stats.threads, stats.verified = str(path), threads, verify
    stats.bytes, stats.files = ckpt.index.tensor_bytes, len(ckpt.index.files)
    stats.device, stats.extra["mode"] = "cpu", "mapped"
    started = time.perf_counter()
    with FileSet(ckpt.file_paths, False) as files:
        maps = map_files(ckpt, files)
        units = [ReadUnit(file=f.name, offset=start, length=min(chunk, f.bytes - start), dest=0)
                 for f in ckpt.index.files for start in range(0, f.bytes, chunk)]
        for _ in run_parallel(units, threads, populate_worker(ckpt, maps)):
            pass
    views = {}
    for entry in ckpt.index.tensors:
        raw = maps[entry.file][entry.offset : entry.offset + entry.bytes]
        views[entry.name] = raw.view(torch_dtype(entry.dtype, tensor=entry.name)).view(entry.shape)
    if verify:  # on the mapped bytes, before any parameter changes
        _check_in_place(ckpt, views)
    for name, view in views.items():
        targets[name].data = view
    # A tied pair the model keeps as two tensors gets its own copy: sharing one mapping would
    # let an in-place change of one silently change the other.
    for alias, target in ckpt.index.aliases.items():
        if targets[alias] is not targets[target]:
            targets[alias].data = views[target].clone()
    stats.seconds = time.perf_counter() - started
    return stats


def _short_read(ckpt: Checkpoint, tu: _TargetUnit, n: int) -> FormatError:
    return FormatError(
        f"{ckpt.file_paths[tu.unit.file]}: data file ended early while reading tensor "
        f"{tu.tensor!r} ({n} of {tu.unit.length} bytes)"
    )


def _read_to_host(files: FileSet, ckpt: Checkpoint, units: list[_TargetUnit],
                  targets: Mapping[str, torch.Tensor], threads: int) -> None:
    def work(_w: int, i: int, _u: ReadUnit) -> None:
        tu = units[i]
        addr = targets[tu.tensor].data_ptr() + tu.target_offset
        unit = tu.unit
        # The engine allocated its parameters but never touched them: pre-fault each range in
        # one call (populate) rather than one fault per page inside the read.
        if addr % ALIGNMENT or unit.length % ALIGNMENT:
            # O_DIRECT needs aligned memory; a parameter's address usually is not.
            n, _ = files.read_buffered(unit, addr, populate=True)
        else:
            n, _ = files.read(unit, addr, False, True)
        if n != unit.length:
            raise _short_read(ckpt, tu, n)

    for _ in run_parallel([u.unit for u in units], threads, work):
        pass


def _check_in_place(ckpt: Checkpoint, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every stored tensor's own checksum, over `tensors[name]`'s memory (CPU)."""
    from .. import _fastio

    bad = [t.name for t in ckpt.index.tensors
           if f"{_fastio.xxh3_64(tensors[t.name].data_ptr(), t.bytes):016x}" != t.checksum]
    if bad:
        raise FormatError(f"{ckpt.directory}: checksum mismatch; corrupt tensor(s): "
                          + ", ".join(repr(n) for n in bad[:10]))


def _read_to_cuda(files: FileSet, ckpt: Checkpoint, units: list[_TargetUnit],
                  targets: Mapping[str, torch.Tensor], threads: int, chunk: int) -> None:
    workers = max(1, min(threads, len(units)))
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(workers)]
    device = next(iter(targets.values())).device
    streams = [torch.cuda.Stream(device=device) for _ in range(workers)]
    flat = {name: t.view(-1).view(torch.uint8) if t.numel() else t for name, t in targets.items()}

    def work(w: int, i: int, _u: ReadUnit) -> None:
        tu = units[i]
        host = ring[w]
        n, _ = files.read(tu.unit, host.data_ptr(), False)
        if n != tu.unit.length:
            raise _short_read(ckpt, tu, n)
        with torch.cuda.stream(streams[w]):
            flat[tu.tensor][tu.target_offset : tu.target_offset + n].copy_(
                host[:n], non_blocking=True)
        streams[w].synchronize()

    for _ in run_parallel([u.unit for u in units], workers, work):
        pass
