"""`--load-format sllm`: vLLM's model loader for sllm checkpoints.

Shaped like vLLM's own loaders (a BaseModelLoader with download_model / load_weights):
- `hf` layout: tensors stream from our loader into the model's own `load_weights` as their
  chunks land, so every architecture and tensor-parallel size vLLM supports works;
- `engine` layout: each rank's tensors, captured before `process_weights_after_loading`, are
  read straight into the parameters' memory, then vLLM post-processes them as usual.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..format.errors import FormatError
from ..format.index import EngineInfo, read_index_file
from ..format.spec import LAYOUT_ENGINE
from ..loader.api import LoadStats, iter_state_dict
from .options import LoaderOptions
from .resolve import ResolvedCheckpoint, rank_dir, resolve_checkpoint

# A child of vLLM's logger, so the load line appears in vLLM's own log with its format.
logger = logging.getLogger("vllm.sllm_plugin")


def _tier_of(path: Path) -> str:
    """Which storage tier a path is on, for the log line (the node store passes its own)."""
    real = str(path.resolve())
    return "dram" if real.startswith("/dev/shm/") else "disk"


def _parallel_rank() -> tuple[int, int, int]:
    """(tp_rank, tp_size, pp_size) of this worker."""
    from vllm.distributed import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            get_pp_group().world_size)


def engine_info(model_config: ModelConfig, rank: int, tp_size: int) -> EngineInfo:
    import vllm

    return EngineInfo(
        engine="vllm",
        engine_version=vllm.__version__,
        tensor_parallel_size=tp_size,
        rank=rank,
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization,
        model=str(model_config.model),
    )


def check_engine_compatible(saved: EngineInfo, current: EngineInfo, where: Path) -> None:
    """An engine checkpoint fits only the engine configuration it was saved from."""
    pairs = [
        ("vLLM version", saved.engine_version, current.engine_version),
        ("tensor parallel size", saved.tensor_parallel_size, current.tensor_parallel_size),
        ("rank", saved.rank, current.rank),
        ("dtype", saved.dtype, current.dtype),
        ("quantization", saved.quantization, current.quantization),
    ]
    bad = [f"{what}: checkpoint {a!r}, this engine {b!r}" for what, a, b in pairs if a != b]
    if bad:
        raise FormatError(
            f"{where}: this engine-layout checkpoint was saved for another configuration ("
            + "; ".join(bad)
            + "). Save it again with `sllm save-vllm` for this configuration, or load the "
            "hf-layout checkpoint, which works for any."
        )


class SllmModelLoader(BaseModelLoader):
    """Loads sllm checkpoints (and plain models, converted once) into vLLM."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)

    # -- BaseModelLoader ----------------------------------------------------------------

    def download_model(self, model_config: ModelConfig) -> None:
        self._resolve(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        resolved = self._resolve(model_config)
        if resolved.layout == LAYOUT_ENGINE:
            self._load_engine(model, model_config, resolved)
        else:
            self._load_hf(model, model_config, resolved)
        if self.options.save_engine_to is not None:
            # `sllm save-vllm`: vLLM's load_model runs process_weights_after_loading right
            # after this returns (on CPU it repacks linear weights and empties the originals),
            # so this is the moment the tensors are in the engine's own loadable form.
            self._save_engine(model, model_config)

    # -- internals ----------------------------------------------------------------------

    def _resolve(self, model_config: ModelConfig) -> ResolvedCheckpoint:
        model = model_config.model_weights or model_config.model
        return resolve_checkpoint(str(model), model_config.revision, self.options.cache_path)

    def _log(self, stats: LoadStats, layout: str, path: Path) -> None:
        tier = self.options.tier or _tier_of(path)
        logger.info(
            "sllm: loaded %.4f GB in %.4f s (%.2f GB/s), layout %s, tier %s, %d threads, "
            "%s I/O%s, from %s",
            stats.bytes / 1e9, stats.seconds, stats.gbps, layout, tier, stats.threads,
            "page-cache mapped" if stats.extra.get("mode") == "mapped"
            else "direct" if stats.direct_files else "buffered",
            ", checksums verified" if stats.verified else "", path,
        )

    def _load_hf(self, model: nn.Module, model_config: ModelConfig,
                 resolved: ResolvedCheckpoint) -> None:
        opts = self.options
        stats = LoadStats()
        started = time.perf_counter()
        # load_weights copies every tensor into the engine's parameters right away, so a
        # checkpoint already in the page cache is handed over as mapped views (zero-copy).
        weights = iter_state_dict(resolved.path, "cpu", threads=opts.threads,
                                  direct_io=opts.direct_io, verify=opts.verify,
                                  chunk_bytes=opts.chunk_size, stats=stats, zero_copy=True)
        loaded = model.load_weights(weights)
        stats.seconds = time.perf_counter() - started  # including the model's own copies
        # As vLLM's default loader: strict only for unquantized models (quantized ones may
        # legitimately lack scales that post-processing creates).
        if loaded is not None and model_config.quantization is None:
            expected = {name for name, _ in model.named_parameters()}
            missing = sorted(expected - set(loaded))
            if missing:
                raise FormatError(f"{resolved.path}: the checkpoint has no weights for "
                                  f"{len(missing)} parameter(s) of the model: {missing[:8]}")
        self._log(stats, "hf", resolved.path)

    def _load_engine(self, model: nn.Module, model_config: ModelConfig,
                     resolved: ResolvedCheckpoint) -> None:
        from ..loader.targets import live_state, load_into, map_into

        rank, tp_size, pp_size = _parallel_rank()
        if pp_size > 1:
            raise FormatError(f"{resolved.path}: engine-layout checkpoints do not support "
                              f"pipeline parallelism (pipeline parallel size {pp_size})")
        path = rank_dir(resolved.path, rank)
        if not path.is_dir():
            raise FormatError(f"{path}: missing: the checkpoint has no directory for rank "
                              f"{rank} (this engine runs tensor parallel size {tp_size})")
        saved = read_index_file(path).engine
        assert saved is not None  # guaranteed by index validation for layout 'engine'
        check_engine_compatible(saved, engine_info(model_config, rank, tp_size), path)
        opts = self.options
        targets = live_state(model)
        if opts.direct_io is not True and all(t.device.type == "cpu" for t in targets.values()):
            # CPU engine: the parameters become views of the mapped checkpoint (no copy, and
            # the pages are shared with every other replica of the model on this server).
            stats = map_into(path, targets, threads=opts.threads, verify=opts.verify,
                             chunk_bytes=opts.chunk_size)
        else:
            stats = load_into(path, targets, threads=opts.threads, direct_io=opts.direct_io,
                              verify=opts.verify, chunk_bytes=opts.chunk_size)
        self._log(stats, LAYOUT_ENGINE, path)

    def _save_engine(self, model: nn.Module, model_config: ModelConfig) -> None:
        from ..format.spec import LAYOUT_ENGINE as ENGINE
        from ..format.writer import save_state_dict

        rank, tp_size, pp_size = _parallel_rank()
        if pp_size > 1:
            raise ValueError("sllm save-vllm does not support pipeline parallelism")
        target = rank_dir(Path(str(self.options.save_engine_to)), rank)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        save_state_dict(state, target, layout=ENGINE,
                        engine=engine_info(model_config, rank, tp_size),
                        metadata={"saved_by": "sllm save-vllm"})
        logger.info("sllm: saved rank %d of %d (%d tensors) to %s", rank, tp_size, len(state),
                    target)
