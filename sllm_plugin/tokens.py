"""Bearer tokens of the daemons: where they live, how they are made and read.

Tokens never travel on a command line (every user of the machine can read `ps`): they come
from a file or from the environment. A node daemon with no token configured makes one in its
state directory (0600, created with O_EXCL|O_NOFOLLOW), so mutating calls are always
authenticated; `sllm router` and `sllm node-token` on the same host find it there.

Small and dependency-free on purpose: the router imports it, and the router imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

NODE_TOKEN_ENV = "SLLM_NODE_TOKEN"
ROUTER_TOKEN_ENV = "SLLM_ROUTER_TOKEN"
TOKEN_FILENAME = "token"
_MAX_TOKEN_BYTES = 4096


class TokenError(ValueError):
    """A token file is missing, unsafe or malformed; the message names the file and why."""


def default_node_state_dir() -> Path:
    """The node daemon's state directory when none is configured (XDG_STATE_HOME)."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "sllm_plugin" / "node"


def node_token_path(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir or default_node_state_dir()).expanduser() / TOKEN_FILENAME


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace removed).

    The file must be a regular file (not a link), owned by this user, and readable by nobody
    else: a token others can read is no secret, and one they could write is not ours.
    """
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TokenError(f"{path}: no such token file") from None
    except OSError as e:
        raise TokenError(f"{path}: cannot open the token file ({e.strerror}; it must be a "
                         "regular file, not a symbolic link)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"{path}: the token file is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenError(f"{path}: the token file belongs to uid {st.st_uid}, not to this "
                             f"user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise TokenError(f"{path}: the token file is readable or writable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        raw = f.read(_MAX_TOKEN_BYTES + 1)
    if len(raw) > _MAX_TOKEN_BYTES:
        raise TokenError(f"{path}: the token file is larger than {_MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the token file is not ASCII text") from None
    check_token(token, str(path))
    return token


def check_token(token: str, where: str) -> str:
    """A token is 16 to 4096 printable ASCII characters without spaces (it goes in a header)."""
    if not 16 <= len(token) <= _MAX_TOKEN_BYTES:
        raise TokenError(f"{where}: a token must be 16 to {_MAX_TOKEN_BYTES} characters, "
                         f"not {len(token)}")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise TokenError(f"{where}: a token may hold printable ASCII characters only, no spaces")
    return token


def write_new_token(path: str | Path) -> str:
    """Make a fresh random token in `path` (0600, never through a link, never replacing a
    file: O_EXCL). Returns it."""
    path = Path(path).expanduser()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return token


def ensure_node_token(state_dir: str | Path) -> tuple[str, Path]:
    """The node's own token in `state_dir`, made on first use. Returns (token, path)."""
    path = node_token_path(state_dir)
    try:
        return write_new_token(path), path
    except FileExistsError:
        return read_token_file(path), path


def local_node_token(state_dir: str | Path | None = None) -> str | None:
    """The token of a node daemon of this user on this host, if it made one (else None)."""
    path = node_token_path(state_dir)
    if not path.exists() and not path.is_symlink():
        return None
    return read_token_file(path)


def token_from(file: str | Path | None, env: str) -> str | None:
    """A token from `file` if given, else from the environment variable `env`, else None."""
    if file is not None:
        return read_token_file(file)
    value = os.environ.get(env)
    return check_token(value.strip(), f"${env}") if value else None
