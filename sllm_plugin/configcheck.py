"""`sllm node --check-config` and `sllm router --check-config`: what a start would refuse, found
without starting anything.

A deployment (a Kubernetes ConfigMap, a systemd unit) is easier to trust when its configuration
can be checked where it is written: these checks take the same configuration a start takes
(the file, then the flags) and apply the checks a start makes that need no network and change
nothing. Token files are read with the same rules (a regular file of this user, mode 0600 or
stricter, a well-formed token); directories the daemon would create or adopt are inspected
with the rules of `store.private.ensure_private_dir`, but never created, chmodded or locked;
no port is bound. What only a start can tell (another daemon holding the state directory, a
port in use, a GPU that is missing) is not checked.

Small and dependency-light: the router's check imports no torch, no FastAPI.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from . import tokens

if TYPE_CHECKING:  # the node's and the router's configurations, each imported where used
    from .router.config import RouterConfig
    from .store.config import NodeConfig


class CheckError(ValueError):
    """The configuration would not start; the message names the setting or file and why."""


def check_dir(path: Path, what: str) -> str:
    """Whether the daemon could create `path` 0700 or adopt it (ensure_private_dir's rules),
    without creating it. Returns a short description; raises CheckError saying why not."""
    path = Path(path).expanduser()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise CheckError(f"{what} {path} does not exist and cannot be created: {ancestor} "
                             "is not a directory this user may write") from None
        _check_parent(path, what)
        return f"{path} (created at start)"
    except OSError as e:
        raise CheckError(f"{what} {path} cannot be inspected ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckError(f"{what} {path} is a symbolic link; it must be a real directory "
                         "(configure the path it points to instead)")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckError(f"{what} {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise CheckError(f"{what} {path} belongs to uid {st.st_uid}, not to this user "
                         f"({os.geteuid()}); remove it or configure another path")
    if st.st_mode & 0o022:
        raise CheckError(f"{what} {path} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); check what it holds, then chmod 700 "
                         "it")
    _check_parent(path, what)
    return str(path)


def _check_parent(path: Path, what: str) -> None:
    try:
        parent = os.stat(path.parent)
    except OSError:
        return  # a parent made at start is made by us, 0755
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise CheckError(f"{what} {path}: its parent {path.parent} is writable by everyone "
                         "without the sticky bit, so anyone could replace it there; use another "
                         "path")


def check_node(config: NodeConfig) -> str:
    """The checks `sllm node` makes at start that need no network and change nothing; returns
    a one-line summary (never a token)."""
    from .store.config import NODE_TOKEN_ENV

    state = check_dir(config.state_dir, "the node's state directory")
    try:
        if config.token_file is not None or os.environ.get(NODE_TOKEN_ENV):
            tokens.token_from(config.token_file, NODE_TOKEN_ENV)
            token_where = str(config.token_file or f"${NODE_TOKEN_ENV}")
        else:
            own = tokens.node_token_path(config.state_dir)
            if own.exists() or own.is_symlink():
                tokens.read_token_file(own)
                token_where = str(own)
            else:
                token_where = f"{own} (made at start)"
    except tokens.TokenError as e:
        raise CheckError(str(e)) from None
    tiers = []
    for name in ("dram", "ssd"):
        tier = getattr(config, name)
        if tier is None:
            continue
        if tier.huge_pages and name != "dram":
            raise CheckError(f"{name}.huge_pages: only the dram tier can use it")
        check_dir(tier.path, f"the {name} tier")
        tiers.append(f"{name} {tier.path} ({tier.capacity.human_readable(decimal=False)})")
    devices = ", ".join(config.devices) if config.devices else "detected at start"
    from .store.addresses import AddressError, advertised_host

    try:
        advertised = advertised_host(config.host, config.advertise)
    except AddressError as e:
        raise CheckError(str(e)) from None
    where = f"{config.host}:{config.port} (replicas reported as {advertised})"
    return (f"node on {where}; state {state}; token from {token_where}; "
            f"{'; '.join(tiers) or 'no tiers'}; devices {devices}; "
            f"{len(config.models)} model(s)")


def check_router(config: RouterConfig, node_token_file: str | None = None) -> str:
    """What `sllm router` checks at start beyond load_config (which already read every token
    file): the token file discovered nodes will be called with. Returns a one-line summary."""
    if config.discover is not None:
        try:
            tokens.token_from(node_token_file, tokens.NODE_TOKEN_ENV)
        except tokens.TokenError as e:
            raise CheckError(str(e)) from None
    nodes = f"{len(config.nodes)} node(s)"
    if config.discover is not None:
        nodes += f" and those {config.discover} names"
    admin = "on" if config.admin_token is not None else "off (no admin token)"
    return (f"router on {config.host}:{config.port}; {nodes}; {len(config.models)} model(s); "
            f"admin API {admin}")
