# Peer loader requirements, verified together on Python 3.11.7, CPU only (no GPU, 2 cores):
#
#   torch==2.13.0 (local +cpu wheel)   numpy==2.4.6   safetensors==0.8.0
#   runai-model-streamer==0.17.0       (+ humanize; does not touch torch or numpy)
#   tensorizer==2.12.1                 (+ boto3, redis, hiredis, libnacl, protobuf, psutil;
#                                        does not touch torch or numpy)
#   fastsafetensors==0.5.0             (+ typer, rich, pydantic; does not touch torch or numpy)
#   instanttensor==0.2.2               (installs and imports; CUDA-only at run time)
#
# None of the installable peers upgrades or downgrades torch or numpy when installed with
# `pip install <peers...> torch==2.13.0`.  serverless-llm-store==0.8.0 cannot be installed at
# all here: it is an sdist that pins torch==2.7.0 (pip: ResolutionImpossible against
# torch==2.13.0) and its setup.py aborts without a CUDA/ROCm toolchain
# ("CUDA_HOME or ROCM_HOME environment variable must be set to compile CUDA or HIP
# extensions."), so it is deliberately absent from PEER_REQUIREMENTS.
"""Peer checkpoint loaders for the load-throughput benchmark.

Every peer turns a safetensors checkpoint (one ``.safetensors`` file, or a directory of
``*.safetensors`` shards) into ``dict[str, torch.Tensor]`` of CPU tensors whose bytes are
resident in memory the caller owns.  A lazy ``mmap`` view does not count, so each peer is
"materialized" as described below; the cost of that materialization is part of its load time.

Each :class:`Peer` has

* ``prepare(src, workdir) -> path``: one-time conversion outside the timed region.  Peers that
  read safetensors return ``src`` unchanged; tensorizer serializes into its own format.
* ``load(path) -> dict[str, Tensor]``: the timed load, returning materialized CPU tensors.
* ``files(path) -> list[str]``: every file ``load`` reads, so a benchmark can drop them from the
  page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, see :func:`evict_page_cache`) before a
  cold run.
* ``unavailable_reason``: ``None`` when the peer can run here, otherwise the concrete reason
  (import error, "requires CUDA: ...").  Peer packages are optional; availability is probed at
  run time by :func:`get_peers`.

The peers:

``safetensors-load_file``
    ``safetensors.torch.load_file(f)`` (default ``mmap`` backend), then ``.clone()`` of every
    tensor.  ``load_file`` returns views of a private file mapping whose pages are only faulted
    in on first touch (RSS stays "file" memory); the clone performs the actual read and copy
    into anonymous memory owned by the tensor.

``safetensors-pread``
    ``safetensors.torch.load_file(f, backend="pread")`` (safetensors >= 0.8 only).  Each tensor
    is read with ``pread(2)`` into its own freshly allocated storage, so the result is already
    owned; no clone.  Not one of the required peers, but the cheapest owned path safetensors
    itself offers.

``vllm-safe_open``
    What vLLM's default loader does (``safetensors_weights_iterator`` with the default "lazy"
    strategy): ``with safe_open(f, framework="pt") as fh: for name in fh.keys():
    fh.get_tensor(name)``, then ``.clone()`` of each tensor for ownership, as above.

``runai-model-streamer``
    ``runai_model_streamer.SafetensorsStreamer``: ``stream_files(files, device="cpu")`` then
    ``get_tensors()``.  Its C++ engine reads the file with many threads
    (``RUNAI_STREAMER_CONCURRENCY``, default 16) with ``O_DIRECT`` (seen in strace) into a ring
    of host buffers, so it neither uses nor fills the page cache.  With ``owned=True`` (the
    default since the ``owned`` flag exists) every yielded tensor is a view of a buffer that is
    handed to the caller and never reused, so no clone is needed; on older releases without
    that flag the tensors are cloned.

``tensorizer``
    ``prepare`` serializes each shard with ``tensorizer.TensorSerializer`` into
    ``<workdir>/tensorizer/<shard>.tensors``.  ``load`` uses ``TensorDeserializer(path,
    device="cpu")`` (eager, not lazy), which on CPU reads every tensor into its own fresh
    ``torch.empty`` buffer; the values are ``nn.Parameter`` (``requires_grad=True``), so they
    are ``.detach()``-ed into plain tensors sharing that storage (no copy).  Tensorizer 2.12.1
    cannot deserialize a zero-element tensor of a dtype numpy lacks (e.g. an empty bf16 tensor:
    ``TypeError: data type '<V2\\x00torch.bfloat16' not understood``), so zero-element tensors
    are kept out of the ``.tensors`` file and recorded in a ``<shard>.empty.json`` sidecar
    (name, dtype, shape) that ``load`` turns back into empty tensors: no bytes are involved.

``fastsafetensors``
    ``fastsafetensors.fastsafe_open(files, framework="pt", device="cpu", nogds=True)``: the
    no-GDS copier ``pread``-s the whole data section (O_DIRECT by default on local disks; set
    ``FASTSAFETENSORS_ODIRECT=0`` for buffered reads) into one host buffer per file and the
    tensors are views of it.  From 0.5.0 those tensors hold a reference to the buffer and
    outlive the loader, so they are owned; older releases free the buffer on close, so they are
    cloned there.

``instanttensor``
    ``instanttensor.safe_open`` only supports CUDA devices ("InstantTensor only supports CUDA
    devices for now" for ``device="cpu"``), so it is registered as unavailable for CPU loads.

``serverless-llm-store``
    ``sllm_store.torch.load_dict`` always allocates CUDA memory and is served by a running
    ``sllm-store`` gRPC server; the 0.8.0 package cannot even be built without nvcc/hipcc and
    pins ``torch==2.7.0``.  Registered as unavailable for CPU loads.

Gotchas seen on a 2-core CPU VM:

* runai-model-streamer and fastsafetensors read with ``O_DIRECT``: their "warm" runs do not
  come from the page cache, so they gain little over cold runs, while the buffered peers do.
  ``FASTSAFETENSORS_ODIRECT=0`` makes fastsafetensors buffered (warm ~2.5x faster here); runai
  has no equivalent switch.
* Materializing by ``.clone()`` leaves the file pages mapped while copying, so peak RSS of the
  safetensors mmap peers is about twice the checkpoint (file pages + anonymous copy); the
  others peak at about checkpoint size plus the interpreter.
* Timings on a shared VM vary by 2-5x between identical runs; time each load in a fresh
  process (as ``time`` does) and repeat.

Run ``python benchmarks/peers.py verify`` to check every available peer bit for bit against
``safetensors.torch.load_file`` on a generated checkpoint, and ``python benchmarks/peers.py time
--size-mb 500`` for a rough cold/warm timing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PEER_REQUIREMENTS: list[str] = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "runai-model-streamer==0.17.0",
    "tensorizer==2.12.1",
    "fastsafetensors==0.5.0",
    "instanttensor==0.2.2",
]
"""Versions verified together (Python 3.11, CPU).  Install all of them on one pip command line
(``pip install "torch==2.13.0" ...``) so nothing can move torch.  serverless-llm-store==0.8.0 is
left out: it pins torch==2.7.0 and needs a CUDA/ROCm toolchain to build."""

TensorDict = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class Peer:
    """One peer loader; see the module docstring for what each one does."""

    name: str
    description: str
    prepare: Callable[[str, str], str]
    load: Callable[[str], TensorDict]
    files: Callable[[str], list[str]]
    unavailable_reason: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


# --------------------------------------------------------------------------------------------
# helpers


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def safetensors_files(path: str) -> list[str]:
    """The shard files behind ``path``: the file itself, or the sorted ``*.safetensors``
    of a directory."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(str(f) for f in p.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        return shards
    if not p.is_file():
        raise FileNotFoundError(path)
    return [str(p)]


def _identity_prepare(src: str, workdir: str) -> str:
    del workdir
    safetensors_files(src)  # validate early
    return os.path.abspath(src)


def _merge(out: TensorDict, part: TensorDict, source: str) -> None:
    dup = out.keys() & part.keys()
    if dup:
        raise ValueError(f"tensor names repeated across shards ({source}): {sorted(dup)[:5]}")
    out.update(part)


def evict_page_cache(paths: list[str]) -> None:
    """Drop ``paths`` from the page cache (clean pages only) with POSIX_FADV_DONTNEED."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# safetensors load_file (+ clone)


def _st_load_file(path: str) -> TensorDict:
    from safetensors.torch import load_file

    out: TensorDict = {}
    for f in safetensors_files(path):
        lazy = load_file(f)  # views of a private mmap; pages not read yet
        _merge(out, {k: v.clone() for k, v in lazy.items()}, f)
        del lazy
    return out


def _probe_safetensors() -> str | None:
    try:
        import safetensors.torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torch underneath
        return f"import safetensors.torch failed: {_exc_text(exc)}"
    return None


# --------------------------------------------------------------------------------------------
# safetensors load_file(backend="pread")


def _st_pread(path: str) -> TensorDict:
    from safetensors.torch import load_file

    out: TensorDict = {}
    for f in safetensors_files(path):
        _merge(out, load_file(f, backend="pread"), f)  # each tensor its own pread buffer
    return out


def _probe_safetensors_pread() -> str | None:
    reason = _probe_safetensors()
    if reason:
        return reason
    from safetensors.torch import load_file

    if "backend" not in inspect.signature(load_file).parameters:
        return (
            f"safetensors {_version('safetensors')} has no load_file(backend=...); "
            "the pread backend needs safetensors>=0.8"
        )
    return None


# --------------------------------------------------------------------------------------------
# vLLM's safetensors_weights_iterator (+ clone)


def _vllm_safe_open(path: str) -> TensorDict:
    from safetensors import safe_open

    out: TensorDict = {}
    for f in safetensors_files(path):
        part: TensorDict = {}
        # Same calls as vllm.model_executor.model_loader.weight_utils.
        # safetensors_weights_iterator (default "lazy" load strategy).
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                part[name] = fh.get_tensor(name).clone()
        _merge(out, part, f)
    return out


# --------------------------------------------------------------------------------------------
# runai-model-streamer


def _runai_load(path: str) -> TensorDict:
    from runai_model_streamer import SafetensorsStreamer

    files = safetensors_files(path)
    out: TensorDict = {}
    with SafetensorsStreamer() as streamer:
        has_owned = "owned" in inspect.signature(streamer.stream_files).parameters
        if has_owned:
            # owned=True: every yielded tensor views a buffer given to the caller for good.
            streamer.stream_files(files, device="cpu", owned=True)
        else:
            streamer.stream_files(files)
        for name, tensor in streamer.get_tensors():
            if name in out:
                raise ValueError(f"tensor name repeated across shards: {name}")
            out[name] = tensor if has_owned else tensor.clone()
    return out


def _probe_runai() -> str | None:
    try:
        import runai_model_streamer

        runai_model_streamer.SafetensorsStreamer  # noqa: B018
    except Exception as exc:
        return f"import runai_model_streamer failed: {_exc_text(exc)}"
    return None


# --------------------------------------------------------------------------------------------
# tensorizer

_TENSORIZER_SUBDIR = "tensorizer"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensorizer_prepare(src: str, workdir: str) -> str:
    from safetensors.torch import load_file
    from tensorizer import TensorSerializer

    shards = safetensors_files(src)
    # One workdir per checkpoint: a directory source loads every *.tensors in outdir.
    outdir = Path(workdir).resolve() / _TENSORIZER_SUBDIR
    outdir.mkdir(parents=True, exist_ok=True)
    produced: list[Path] = []
    for shard in shards:
        target = outdir / (Path(shard).stem + ".tensors")
        sidecar = target.with_suffix(".empty.json")
        produced.append(target)
        if target.exists() and target.stat().st_mtime >= Path(shard).stat().st_mtime:
            continue  # already converted
        state = load_file(shard)
        empty = {k: v for k, v in state.items() if v.numel() == 0}
        body = {k: v for k, v in state.items() if v.numel() != 0}
        tmp = target.with_name(target.name + ".tmp")
        serializer = TensorSerializer(str(tmp))
        try:
            serializer.write_state_dict(body)
        finally:
            serializer.close()
        if empty:
            sidecar.write_text(
                json.dumps(
                    {
                        k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)}
                        for k, v in empty.items()
                    }
                )
            )
        elif sidecar.exists():
            sidecar.unlink()
        os.replace(tmp, target)
        del state, body, empty
    return str(produced[0]) if Path(src).is_file() else str(outdir)


def _tensorizer_files(path: str) -> list[str]:
    p = Path(path)
    tensors = sorted(p.glob("*.tensors")) if p.is_dir() else [p]
    out: list[str] = []
    for t in tensors:
        out.append(str(t))
        sidecar = t.with_suffix(".empty.json")
        if sidecar.exists():
            out.append(str(sidecar))
    return out


def _tensorizer_load(path: str) -> TensorDict:
    import torch
    from tensorizer import TensorDeserializer

    out: TensorDict = {}
    for f in _tensorizer_files(path):
        if f.endswith(".empty.json"):
            spec = json.loads(Path(f).read_text())
            part = {
                k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]))
                for k, v in spec.items()
            }
        else:
            # Eager CPU load: one fresh torch.empty buffer per tensor, filled by readinto.
            with TensorDeserializer(f, device="cpu", lazy_load=False) as de:
                part = {str(k): de[k].detach() for k in de.keys()}  # noqa: SIM118
        _merge(out, part, f)
    return out


def _probe_tensorizer() -> str | None:
    try:
        from tensorizer import TensorDeserializer, TensorSerializer  # noqa: F401
    except Exception as exc:
        return f"import tensorizer failed: {_exc_text(exc)}"
    return None


# --------------------------------------------------------------------------------------------
# fastsafetensors


def _fastsafetensors_load(path: str) -> TensorDict:
    import fastsafetensors
    from fastsafetensors import fastsafe_open

    files = safetensors_files(path)
    # From 0.5.0 tensors share ownership of the host buffer and outlive the loader.
    needs_clone = _version_tuple(getattr(fastsafetensors, "__version__", "0")) < (0, 5)
    out: TensorDict = {}
    with fastsafe_open(files, framework="pt", device="cpu", nogds=True) as fh:
        for name in fh.keys():  # noqa: SIM118 - fastsafe_open is not a Mapping
            tensor = fh.get_tensor(name)
            out[name] = tensor.clone() if needs_clone else tensor
    return out


def _probe_fastsafetensors() -> str | None:
    try:
        from fastsafetensors import fastsafe_open  # noqa: F401
    except Exception as exc:
        return f"import fastsafetensors failed: {_exc_text(exc)}"
    return None


# --------------------------------------------------------------------------------------------
# instanttensor


def _instanttensor_load(path: str) -> TensorDict:
    from instanttensor import safe_open

    files = safetensors_files(path)
    out: TensorDict = {}
    with safe_open(files, framework="pt", device="cpu") as fh:  # raises: CUDA only
        for name, tensor in fh.tensors():
            out[name] = tensor.clone()
    return out


def _probe_instanttensor() -> str | None:
    try:
        from instanttensor import safe_open
    except Exception as exc:
        return f"import instanttensor failed: {_exc_text(exc)}"
    try:
        # The device check comes before any file access, so a missing path is fine.
        with safe_open(
            os.path.join(tempfile.gettempdir(), "peers-probe-missing.safetensors"),
            framework="pt",
            device="cpu",
        ):
            pass
    except ValueError as exc:
        if "cuda" in str(exc).lower():
            return f"requires CUDA: {_exc_text(exc)}"
        return None  # CPU accepted; failed later on the missing file
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------------------------
# serverless-llm-store


def _sllm_store_load(path: str) -> TensorDict:
    raise RuntimeError(f"serverless-llm-store cannot load {path} into CPU memory")


def _probe_sllm_store() -> str | None:
    version = _version("serverless-llm-store")
    try:
        import sllm_store.torch  # noqa: F401
    except Exception as exc:
        return (
            f"import sllm_store.torch failed ({_exc_text(exc)}); serverless-llm-store==0.8.0 "
            "pins torch==2.7.0 (conflicts with torch==2.13.0) and its setup.py refuses to build "
            "without a GPU toolchain: 'RuntimeError: CUDA_HOME or ROCM_HOME environment variable "
            "must be set to compile CUDA or HIP extensions.'"
        )
    return (
        f"requires CUDA: serverless-llm-store {version} loads only into CUDA memory "
        "(sllm_store.torch.load_dict calls allocate_cuda_memory and needs a running "
        "sllm-store server); it has no CPU-memory target"
    )


# --------------------------------------------------------------------------------------------
# registry


_SPECS: list[
    tuple[
        str,
        str,
        Callable[[str, str], str],
        Callable[[str], TensorDict],
        Callable[[str], list[str]],
        Callable[[], str | None],
        tuple[str, ...],
    ]
] = [
    (
        "safetensors-load_file",
        "safetensors.torch.load_file (mmap) + clone",
        _identity_prepare,
        _st_load_file,
        safetensors_files,
        _probe_safetensors,
        ("safetensors",),
    ),
    (
        "safetensors-pread",
        "safetensors.torch.load_file(backend='pread'), owned as returned",
        _identity_prepare,
        _st_pread,
        safetensors_files,
        _probe_safetensors_pread,
        ("safetensors",),
    ),
    (
        "vllm-safe_open",
        "vLLM safetensors_weights_iterator: safe_open + get_tensor + clone",
        _identity_prepare,
        _vllm_safe_open,
        safetensors_files,
        _probe_safetensors,
        ("safetensors",),
    ),
    (
        "runai-model-streamer",
        "SafetensorsStreamer to CPU, owned buffers",
        _identity_prepare,
        _runai_load,
        safetensors_files,
        _probe_runai,
        ("runai-model-streamer",),
    ),
    (
        "tensorizer",
        "TensorSerializer in prepare; TensorDeserializer(device='cpu') + detach",
        _tensorizer_prepare,
        _tensorizer_load,
        _tensorizer_files,
        _probe_tensorizer,
        ("tensorizer",),
    ),
    (
        "fastsafetensors",
        "fastsafe_open(device='cpu', nogds=True), shared-ownership buffer",
        _identity_prepare,
        _fastsafetensors_load,
        safetensors_files,
        _probe_fastsafetensors,
        ("fastsafetensors",),
    ),
    (
        "instanttensor",
        "instanttensor.safe_open (CUDA only)",
        _identity_prepare,
        _instanttensor_load,
        safetensors_files,
        _probe_instanttensor,
        ("instanttensor",),
    ),
    (
        "serverless-llm-store",
        "sllm_store.torch.load_dict (CUDA + sllm-store server only)",
        _identity_prepare,
        _sllm_store_load,
        safetensors_files,
        _probe_sllm_store,
        ("serverless-llm-store",),
    ),
]


@functools.cache
def get_peers() -> tuple[Peer, ...]:
    """All peers, probed once: ``unavailable_reason`` is set for those that cannot run here."""
    peers: list[Peer] = []
    for name, desc, prepare, load, files, probe, dists in _SPECS:
        try:
            reason = probe()
        except Exception as exc:  # a probe must never break the benchmark
            reason = f"availability probe failed: {_exc_text(exc)}"
        versions = {d: v for d in dists if (v := _version(d)) is not None}
        peers.append(Peer(name, desc, prepare, load, files, reason, versions))
    return tuple(peers)


def available_peers() -> list[Peer]:
    return [p for p in get_peers() if p.available]


def get_peer(name: str) -> Peer:
    for p in get_peers():
        if p.name == name:
            return p
    raise KeyError(f"unknown peer {name!r}; known: {[p.name for p in get_peers()]}")


PEER_NAMES: tuple[str, ...] = tuple(spec[0] for spec in _SPECS)


# --------------------------------------------------------------------------------------------
# self-check: python benchmarks/peers.py verify | time


def make_checkpoint(path: str, size_mb: int, seed: int = 0) -> None:
    """Random safetensors file of about ``size_mb`` MiB: bf16, fp32, fp16 and int8 tensors,
    an odd-sized tensor that leaves later tensors unaligned, a scalar and an empty tensor."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = [(1024, 1024), (4096, 512), (3, 7, 11), (777,), (2048, 1536)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int8]
    tensors: dict[str, torch.Tensor] = {}
    nbytes = i = 0
    while nbytes < size_mb * 2**20:
        shape, dtype = shapes[i % len(shapes)], dtypes[i % len(dtypes)]
        if dtype == torch.int8:
            t = torch.randint(-128, 128, shape, dtype=dtype, generator=gen)
        else:
            t = torch.randn(shape, generator=gen).to(dtype)
        tensors[f"model.layers.{i}.weight"] = t
        nbytes += t.numel() * t.element_size()
        i += 1
    tensors["model.scale"] = torch.tensor(3.5)
    tensors["model.empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})


def compare(got: TensorDict, ref: TensorDict) -> list[str]:
    """Differences between ``got`` and ``ref``: names, dtype, shape, device, bytes."""
    import torch

    problems: list[str] = []
    if got.keys() != ref.keys():
        problems.append(f"names differ: {sorted(got.keys() ^ ref.keys())[:5]}")
    for k in ref.keys() & got.keys():
        a, b = got[k], ref[k]
        if not isinstance(a, torch.Tensor) or type(a) is not torch.Tensor:
            problems.append(f"{k}: type {type(a).__name__}")
        elif a.device.type != "cpu" or a.dtype != b.dtype or a.shape != b.shape:
            problems.append(
                f"{k}: {a.device}/{a.dtype}/{tuple(a.shape)} vs cpu/{b.dtype}/{tuple(b.shape)}"
            )
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            problems.append(f"{k}: bytes differ")
    return problems


def _proc_status_mb(field_name: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _load_once(name: str, path: str) -> dict[str, float]:
    """One timed load in this process (the ``_load`` subcommand, run in a fresh process)."""
    import torch

    peer = get_peer(name)
    before = _proc_status_mb("RssAnon")
    t0 = time.perf_counter()
    got = peer.load(path)
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in got.values())
    assert all(isinstance(t, torch.Tensor) for t in got.values())
    return {
        "seconds": seconds,
        "tensor_bytes": nbytes,
        "anon_growth_mb": _proc_status_mb("RssAnon") - before,
        "peak_rss_mb": _proc_status_mb("VmHWM"),
    }


def _verify(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    failed = 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = os.path.join(tmp, "ckpt.safetensors")
        make_checkpoint(src, args.size_mb)
        ref = {k: v.clone() for k, v in load_file(src).items()}
        for peer in get_peers():
            if not peer.available:
                print(f"{peer.name:24s} UNAVAILABLE: {peer.unavailable_reason}")
                continue
            path = peer.prepare(src, tmp)
            got = peer.load(path)
            problems = compare(got, ref)
            status = "OK" if not problems else "MISMATCH " + "; ".join(problems[:3])
            failed += bool(problems)
            print(
                f"{peer.name:24s} {status} ({len(got)} tensors, reads {len(peer.files(path))} "
                f"file(s)) {peer.versions}"
            )
            del got
    return 1 if failed else 0


def _time(args: argparse.Namespace) -> int:
    import subprocess

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = os.path.join(tmp, "ckpt.safetensors")
        make_checkpoint(src, args.size_mb)
        size = os.path.getsize(src)
        print(f"checkpoint: {size / 1e6:.0f} MB; each load in a fresh process", flush=True)
        for peer in get_peers():
            if not peer.available or (args.peer and peer.name not in args.peer):
                continue
            path = peer.prepare(src, tmp)
            results = []
            for mode in ["cold"] + ["warm"] * args.warm:
                if mode == "cold":
                    evict_page_cache(peer.files(path))
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "_load", peer.name, path],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(
                    f"{mode} {r['tensor_bytes'] / r['seconds'] / 1e9:5.2f} GB/s "
                    f"({r['seconds']:5.2f}s, anon +{r['anon_growth_mb']:4.0f} MB, "
                    f"peak {r['peak_rss_mb']:4.0f} MB)"
                )
            print(f"{peer.name:22s} " + " | ".join(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["list", "verify", "time", "_load"])
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, default=2, help="warm runs after the cold one")
    parser.add_argument("--size-mb", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where to put the test checkpoint")
    parser.add_argument("--peer", action="append", help="only this peer (time); repeatable")
    args = parser.parse_args(argv)
    if args.command == "list":
        for p in get_peers():
            print(f"{p.name:24s} {p.unavailable_reason or 'available'} {p.versions}")
        return 0
    if args.command == "_load":
        print(json.dumps(_load_once(*args.rest)))
        return 0
    if args.command == "verify":
        args.size_mb = args.size_mb or 50
        return _verify(args)
    args.size_mb = args.size_mb or 500
    return _time(args)


if __name__ == "__main__":
    sys.exit(main())
