"""`--model-loader-extra-config` for `--load-format sllm`: the knobs, validated.

Torch-free so the router and the node daemon can build and check these too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..format.spec import ALIGNMENT

CACHE_ENV = "SLLM_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where plain Hugging Face models are converted to: $SLLM_CACHE_DIR, else
    $XDG_CACHE_HOME/sllm_plugin/checkpoints, else ~/.cache/sllm_plugin/checkpoints."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sllm_plugin" / "checkpoints"


class LoaderOptions(BaseModel):
    """The keys `--model-loader-extra-config` accepts with `--load-format sllm`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int | None = Field(default=None, ge=1, le=256,
                                description="I/O threads (default: 2 per core, 4 to 16)")
    chunk_size: int | None = Field(default=None, ge=ALIGNMENT,
                                   description="bytes per read, a multiple of 4096")
    direct_io: bool | None = Field(default=None,
                                   description="O_DIRECT: true, false, or null = by residency")
    verify: bool = Field(default=False, description="check every chunk's checksum while loading")
    cache_dir: str | None = Field(default=None,
                                  description=f"conversion cache (default ${CACHE_ENV})")
    tier: str | None = Field(default=None,
                             description="the store tier this path is on, for the load log")
    save_engine_to: str | None = Field(
        default=None, description="internal to `sllm save-vllm`: save each rank's state there")

    @field_validator("chunk_size")
    @classmethod
    def _aligned(cls, v: int | None) -> int | None:
        if v is not None and v % ALIGNMENT:
            raise ValueError(f"chunk_size must be a multiple of {ALIGNMENT}")
        return v

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    @classmethod
    def parse(cls, extra: Any) -> LoaderOptions:
        """From vLLM's `model_loader_extra_config` (a dict, or None): a clear error on bad keys."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(cls.model_fields))
        if unknown:
            valid = ", ".join(sorted(cls.model_fields))
            raise ValueError(
                f"--model-loader-extra-config: unknown key(s) {unknown} for --load-format sllm; "
                f"valid keys: {valid}"
            )
        try:
            return cls.model_validate(extra)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
            raise ValueError(
                f"--model-loader-extra-config for --load-format sllm: {msgs}"
            ) from None
