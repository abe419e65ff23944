"""The router's configuration: a YAML file, then flags; defaults that run on one machine.

Tokens never come from the command line (every user of the machine can read `ps`): the admin
token from `admin_token_file` (`--admin-token-file`) or $SLLM_ROUTER_TOKEN, a node's from its
`token_file` (`--node-token-file`), $SLLM_NODE_TOKEN, or, for a node on this host, the token
that node made in its state directory. An inline `token` / `admin_token` in the YAML file is
accepted too (the file should then be private). Token values are `SecretStr`: they never show
in a repr, a log line or an error message.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .. import tokens
from ..configfile import ConfigError, read_mapping, validate
from ..store.names import InvalidModelName, check_model_name, check_model_names

DEFAULT_PORT = 8080


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def split_address_url(url: str, schemes: tuple[str, ...]) -> tuple[SplitResult, int | None,
                                                                    str | None]:
    """`url` split, its port, and what is wrong with it as `scheme://host[:port]` (None if
    nothing): a node URL and a discovery URL share these rules."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in range
    except ValueError as e:
        return urlsplit(""), None, str(e)
    problem = None
    if parts.scheme not in schemes:
        problem = f"the scheme must be {' or '.join(schemes)}"
    elif not parts.hostname:
        problem = "it names no host name"
    elif parts.username is not None or parts.password is not None:
        problem = "it may not carry credentials (use a token file)"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "it may not have a path, query or fragment"
    return parts, port, problem


def check_node_url(url: str) -> str:
    """`http(s)://host[:port]` (a trailing slash is dropped), else ValueError saying so."""
    parts, port, problem = split_address_url(url, ("http", "https"))
    if problem:
        raise ValueError(f"node URL {url!r} is not http(s)://host[:port]: {problem}")
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


def is_loopback(url: str) -> bool:
    """Whether the node URL names this host (localhost or a loopback address)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header_safe(token: SecretStr | None) -> SecretStr | None:
    """An inline token goes in an HTTP header: printable ASCII, no spaces (never echoed)."""
    if token is not None and not all(33 <= ord(c) <= 126 for c in token.get_secret_value()):
        raise ValueError("a token may hold printable ASCII characters only, no spaces")
    return token


class NodeRef(_Strict):
    name: str = Field(min_length=1, max_length=100)
    url: str = Field(description="the node daemon, http(s)://host[:port], e.g. "
                     "http://10.0.0.5:8073")
    token: SecretStr | None = Field(None, description="the node daemon's bearer token (prefer "
                                    "token_file)")
    token_file: Path | None = Field(None, description="a file (0600) holding the node's token")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return check_node_url(url)

    _token = field_validator("token")(_header_safe)

    @model_validator(mode="after")
    def _one_token(self) -> NodeRef:
        if self.token is not None and self.token_file is not None:
            raise ValueError(f"node {self.name!r}: give token or token_file, not both")
        return self


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
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within "
                                  "this long (408 otherwise)")
    max_connections: int = Field(1024, ge=1, description="open client connections (idle ones "
                                 "included); past it, 503")
    max_tokens: int = 4096
    max_queue: int = Field(64, description="requests waiting for a replica, per model")
    start_timeout_s: float = 900.0
    upstream_timeout_s: float = 600.0
    migration_gap_tokens: int = Field(
        8, description="stop warming the destination when fewer new tokens than this remain")
    migration_rounds: int = 3


def _default_nodes() -> list[NodeRef]:
    return [NodeRef(name="local", url="http://127.0.0.1:8073")]


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_token: SecretStr | None = Field(None, description="the admin API's bearer token "
                                          "(prefer admin_token_file)")
    admin_token_file: Path | None = Field(None, description="a file (0600) holding the admin "
                                          "token")
    nodes: list[NodeRef] = Field(default_factory=_default_nodes)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    poll_interval_s: float = Field(1.0, gt=0, description="how often each node's status is "
                                   "read")
    node_timeout_s: float = Field(2.0, gt=0, description="a node's status call must answer "
                                  "within this")
    unhealthy_after_s: float = Field(
        5.0, gt=0, description="a node unanswered this long is lost: its replicas are "
        "forgotten and their streams fail over; it is re-admitted when it answers again. A "
        "lost node is noticed within unhealthy_after_s + node_timeout_s + poll_interval_s")
    discover: str | None = Field(None, description="find nodes in DNS: dns://NAME:PORT, every "
                                 "A/AAAA record of NAME is a node at http://ADDRESS:PORT")
    discover_interval_s: float = Field(5.0, gt=0, description="how often `discover` is looked "
                                       "up again")
    discover_token_file: Path | None = Field(None, description="a file (0600) holding the "
                                             "discovered nodes' token (default "
                                             "$SLLM_NODE_TOKEN)")

    _admin_token = field_validator("admin_token")(_header_safe)

    _model_names = field_validator("models")(check_model_names)

    @model_validator(mode="before")
    @classmethod
    def _no_default_node_when_discovering(cls, data: Any) -> Any:
        # With discovery and no nodes listed, the nodes are the discovered ones only (not
        # also the default local node).
        if isinstance(data, dict) and data.get("discover") and "nodes" not in data:
            data = {**data, "nodes": []}
        return data

    @field_validator("discover")
    @classmethod
    def _discover(cls, url: str | None) -> str | None:
        from .discovery import parse_discover_url

        return None if url is None else parse_discover_url(url).url

    @model_validator(mode="after")
    def _checks(self) -> RouterConfig:
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("give admin_token or admin_token_file, not both")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        return self


def load_config(path: str | Path | None = None, **overrides: Any) -> RouterConfig:
    """Read the YAML file (if any), apply the flags that were given, validate everything,
    and resolve the admin token (ConfigError naming the file if it cannot be read)."""
    raw = read_mapping(path)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "admin_token_file" in given:  # the flag replaces whatever the file said
        raw.pop("admin_token", None)
    raw.update(given)
    config = validate(RouterConfig, raw, path, "router")
    try:
        if config.admin_token is None:
            admin = tokens.token_from(config.admin_token_file, tokens.ROUTER_TOKEN_ENV)
            config.admin_token = SecretStr(admin) if admin is not None else None
        for node in config.nodes:
            explicit_node_token(node)  # unreadable or unsafe token files fail here, at start
        if config.discover is not None:
            tokens.token_from(config.discover_token_file, tokens.NODE_TOKEN_ENV)
    except tokens.TokenError as e:
        raise ConfigError(f"{path or 'flags'}: {e}") from None
    return config


def explicit_node_token(node: NodeRef) -> str | None:
    """The token configured for `node` (inline, its token file, or $SLLM_NODE_TOKEN)."""
    if node.token is not None:
        return node.token.get_secret_value()
    return tokens.token_from(node.token_file, tokens.NODE_TOKEN_ENV)


__all__ = ["ConfigError", "InvalidModelName", "Limits", "ModelSpec", "NodeRef", "RouterConfig",
           "check_model_name", "check_node_url", "explicit_node_token", "is_loopback",
           "load_config"]
