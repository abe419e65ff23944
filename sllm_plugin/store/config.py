"""The node daemon's configuration: a YAML file, then command-line flags, then defaults.

The defaults run on a laptop: a DRAM tier in /dev/shm sized to a quarter of the memory, an SSD
tier in the user's cache directory sized to half of its free space, the machine's GPUs (or all
its CPU cores as one device), and vLLM's OpenAI server as the replica command.

The bearer token is never a value here: configuration files are shared, copied and left
readable (and the command line is in `ps`). `token_file` names a 0600 file of this user; with
none, $SLLM_NODE_TOKEN; with neither, the daemon makes `<state_dir>/token` (see `tokens`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from ..configfile import ConfigError, read_mapping, validate
from ..tokens import NODE_TOKEN_ENV, default_node_state_dir, ensure_node_token, token_from
from .names import check_model_names
from .replicaargs import has_flag

DEFAULT_PORT = 8073
DEFAULT_REPLICA_COMMAND = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TierConfig(_Strict):
    path: Path
    capacity: ByteSize = Field(description="bytes, or a size such as '8GiB'")
    huge_pages: bool = Field(
        False, description="dram only: keep the tier on a tmpfs with transparent huge pages "
        "(mounted by the node as root if `path` is not one already)")


def _no_api_key(args: list[str]) -> list[str]:
    """vLLM's own `--api-key` would lock the router out: the node gives every replica a key of
    its own (sllm_plugin.vllm.guard) and hands it to the router; that guard also covers what
    `--api-key` leaves open."""
    if has_flag(args, "--api-key"):
        raise ValueError("--api-key is not accepted in replica_args: the node protects each "
                         "replica with a key of its own and gives it to the router (see "
                         "README, 'Across servers')")
    return args


class ModelEntry(_Strict):
    source: str = Field(description="hub id, local path, or http(s) URL of the model")
    revision: str | None = None
    replica_args: list[str] = Field(default_factory=list,
                                    description="extra vLLM flags for this model's replicas")

    @field_validator("source")
    @classmethod
    def _no_credentials(cls, source: str) -> str:
        from .sources import check_url_source

        check_url_source(source)  # a SourceError is a ValueError: a validation error
        return source

    _replica_args = field_validator("replica_args")(_no_api_key)


class FetchConfig(_Strict):
    """What fetching a URL source may cost (see store.sources.FetchLimits)."""

    deadline_s: float = Field(3600.0, gt=0, description="a whole download, every file")
    index_deadline_s: float = Field(60.0, gt=0, description="fetching the index(es)")
    index_bytes: ByteSize = Field(ByteSize(64 * 1024**2), description="every index together")
    side_file_bytes: ByteSize = Field(ByteSize(64 * 1024**2),
                                      description="each config or tokenizer file")


class StandbyEntry(_Strict):
    like: str = Field(description="a model whose engine shape the standby engines have; they "
                      "start holding its weights")
    count: int = Field(1, ge=1, le=64)


class NodeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token_file: Path | None = Field(
        default=None, description="file holding the bearer token for mutating calls (0600); "
        f"default ${NODE_TOKEN_ENV}, else <state_dir>/token, made at first start")
    advertise: str | None = Field(
        default=None, description="the address other hosts reach this node and its replicas "
        "by (replica URLs use it); default: the bind address, or when that is 0.0.0.0 or ::, "
        "the first address of an interface that is up and not loopback")
    replica_port_range: tuple[int, int] | None = Field(
        default=None, description="replicas listen on free ports of this inclusive range "
        "(for a firewall or NetworkPolicy), e.g. [20000, 20999]; default: any free port")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="further names clients may use in the Host header "
        "(besides IP literals, localhost, the bind address and this machine's names); "
        "'*.example.com' matches subdomains, '*' any name")
    max_body_bytes: ByteSize = Field(ByteSize(64 * 1024),
                                     description="largest request body accepted")
    state_dir: Path = Field(default_factory=default_node_state_dir)
    dram: TierConfig | None = Field(default_factory=lambda: default_dram_tier())
    ssd: TierConfig = Field(default_factory=lambda: default_ssd_tier())
    devices: list[str] | None = Field(
        default=None, description="'cuda:N' or 'cpu:A-B' entries; default: detected")
    replica_command: list[str] = Field(default_factory=lambda: list(DEFAULT_REPLICA_COMMAND))
    replica_args: list[str] = Field(default_factory=list)
    replica_env: dict[str, str] = Field(default_factory=dict)
    prefork: bool = Field(
        False, description="start replicas by forking a helper that has imported vLLM once "
        "(when replica_command is `python -m MODULE` of this Python), instead of a new "
        "interpreter each time; the first replica waits for the helper's imports. Off by "
        "default: it removes the API server's imports, but through the node on the reference "
        "VM its cold starts were not faster (see docs/COLD_START.md)")
    ready_timeout_s: float = 900.0
    stop_timeout_s: float = 30.0
    calibration_bytes: ByteSize = ByteSize(256 * 1024**2)
    promote_on_start: bool = True
    remote_bandwidth_gbps: float | None = Field(
        default=None, description="first guess for remote fetches, until one is measured")
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    standby: list[StandbyEntry] = Field(
        default_factory=list, description="engines started at the node's start and kept idle "
        "for models of their shape: [{like: MODEL, count: N}]")
    standby_on_expiry: bool = Field(
        True, description="a replica the router stops for its keep-alive becomes a standby "
        "(keeps its process and weights) instead of stopping, within the bounds below")
    standby_max: int | None = Field(
        None, ge=0, description="standby engines kept at once (least recently used stopped "
        "first); default: the node's device count")
    standby_memory: ByteSize | None = Field(
        None, description="host memory standby engines may hold together (their processes' "
        "proportional set size); default: half the machine's memory")
    swap_timeout_s: float = Field(600.0, gt=0, description="longest weight swap")

    _names = field_validator("models")(check_model_names)

    @field_validator("standby")
    @classmethod
    def _standby_names(cls, entries: list[StandbyEntry]) -> list[StandbyEntry]:
        check_model_names({e.like: e for e in entries})
        return entries

    _replica_args = field_validator("replica_args")(_no_api_key)

    @field_validator("replica_env")
    @classmethod
    def _no_api_key_env(cls, env: dict[str, str]) -> dict[str, str]:
        if "VLLM_API_KEY" in env:
            _no_api_key(["--api-key"])
        return env

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, advertise: str | None) -> str | None:
        from .addresses import check_advertise

        return None if advertise is None else check_advertise(advertise)

    @field_validator("replica_port_range")
    @classmethod
    def _port_range(cls, ports: tuple[int, int] | None) -> tuple[int, int] | None:
        if ports is not None and not 1024 <= ports[0] <= ports[1] <= 65535:
            raise ValueError(f"replica_port_range {list(ports)}: give [LOW, HIGH] with "
                             "1024 <= LOW <= HIGH <= 65535")
        return ports

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[str] | None) -> list[str] | None:
        from .replicas import cpu_cores, parse_device

        usable = os.sched_getaffinity(0)
        for d in devices or []:
            missing = cpu_cores([parse_device(d)]) - usable
            if missing:
                raise ValueError(f"device {d!r}: cores {sorted(missing)} are not available to "
                                 f"this process (it may use {sorted(usable)})")
        return devices


def _user_dir(env: str, fallback: str) -> Path:
    return Path(os.environ.get(env) or Path.home() / fallback)


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_dram_tier() -> TierConfig | None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return None
    return TierConfig(path=shm / f"sllm-node-{os.getuid()}", capacity=ByteSize(memory_bytes() // 4))


def default_ssd_tier() -> TierConfig:
    path = _user_dir("XDG_CACHE_HOME", ".cache") / "sllm_plugin" / "node" / "ssd"
    probe = path
    while not probe.exists():
        probe = probe.parent
    return TierConfig(path=path, capacity=ByteSize(shutil.disk_usage(probe).free // 2))


def load_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Read the YAML file (if any), apply the flags that were given, validate everything."""
    raw = read_mapping(path)
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:  # "ssd.path" -> raw["ssd"]["path"]
            head, tail = key.split(".", 1)
            section = raw.get(head) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{key}: {head!r} in the file is not a mapping")
            raw[head] = {**_default_section(head), **section, tail: value}
        else:
            raw[key] = value
    if "token" in raw:  # the value is never echoed
        raise ConfigError(f"{path or 'flags'}: 'token' is not read from the configuration (a "
                          "configuration file is no place for a secret); put the token in a "
                          "file only you can read and set 'token_file', or set "
                          f"${NODE_TOKEN_ENV}")
    return validate(NodeConfig, raw, path, "node")


def resolve_token(config: NodeConfig, state_dir: Path) -> tuple[str, str]:
    """The node's bearer token and where it came from (for the start-up log; never the token).

    `token_file`, else $SLLM_NODE_TOKEN, else `<state_dir>/token` (made 0600 on first use,
    so that mutating calls are authenticated even when nobody configured a token). Raises
    TokenError naming the file and what is wrong with it.
    """
    token = token_from(config.token_file, NODE_TOKEN_ENV)
    if token is not None:
        where = str(config.token_file) if config.token_file else f"${NODE_TOKEN_ENV}"
        return token, where
    token, path = ensure_node_token(state_dir)
    return token, str(path)


def _default_section(name: str) -> dict[str, Any]:
    default = {"dram": default_dram_tier, "ssd": default_ssd_tier}.get(name)
    tier = default() if default else None
    return tier.model_dump() if tier else {}
