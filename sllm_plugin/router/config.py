"""The router's configuration: a YAML file, then flags; defaults that run on one machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..configfile import ConfigError, read_mapping, validate

DEFAULT_PORT = 8080


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeRef(_Strict):
    name: str
    url: str = Field(description="the node daemon, e.g. http://10.0.0.5:8073")
    token: str | None = Field(None, description="the node daemon's bearer token")


class ModelSpec(_Strict):
    source: str | None = Field(None, description="registered on every node (hub id, path, URL)")
    size_bytes: int | None = Field(None, description="checkpoint size, until a node reports it")
    min_replicas: int = 0
    max_replicas: int = 1
    keep_alive_s: float = Field(300.0, description="stop a replica idle this long")
    target_load: int = Field(4, description="requests per replica before scaling up")
    max_queue: int | None = Field(None, description="requests waiting for a replica of this "
                                  "model (default: limits.max_queue)")
    replica_args: list[str] = Field(default_factory=list)


class Limits(_Strict):
    max_body_bytes: int = 1024 * 1024
    max_tokens: int = 4096
    max_queue: int = Field(64, description="requests waiting for a replica, per model")
    start_timeout_s: float = 900.0
    upstream_timeout_s: float = 600.0
    migration_gap_tokens: int = Field(
        8, description="stop warming the destination when fewer new tokens than this remain")
    migration_rounds: int = 3


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_token: str | None = None
    nodes: list[NodeRef] = Field(default_factory=lambda: [
        NodeRef(name="local", url="http://127.0.0.1:8073")])
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    poll_interval_s: float = 1.0


def load_config(path: str | Path | None = None, **overrides: Any) -> RouterConfig:
    """Read the YAML file (if any), apply the flags that were given, validate everything."""
    raw = read_mapping(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "admin_token" not in raw and os.environ.get("SLLM_ROUTER_TOKEN"):
        raw["admin_token"] = os.environ["SLLM_ROUTER_TOKEN"]
    return validate(RouterConfig, raw, path, "router")


__all__ = ["ConfigError", "ModelSpec", "NodeRef", "RouterConfig", "load_config"]
