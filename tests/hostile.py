"""Test helpers for hostile sources and tiers: small real checkpoints written with the format's
own writer, and a real HTTP server on loopback whose every answer a test scripts."""

from __future__ import annotations

import collections
import http.server
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sllm_plugin.format.index import EngineInfo
from sllm_plugin.format.spec import INDEX_FILENAME
from sllm_plugin.format.writer import CheckpointWriter

SECRET = "SECRET-MARKER-7f3a9c"  # content a source serves that must never reach the caller
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def make_checkpoint(directory: Path, seed: int = 0, *, layout: str = "hf",
                    engine: EngineInfo | None = None, side_files: bool = True) -> Path:
    """A small, valid sllm checkpoint (two tensors, a few KiB) with a config.json beside it."""
    rng = bytes((seed * 31 + i * 7) % 251 for i in range(4096 * 3))
    with CheckpointWriter(directory, layout=layout, engine=engine) as writer:
        writer.add_tensor("a.weight", "float32", [1024], [rng[:4096]])
        writer.add_tensor("b.weight", "uint8", [5000], [rng[4096:9096]])
        writer.commit()
    if side_files:
        (directory / "config.json").write_text(json.dumps({**CONFIG, "seed": seed}))
    return directory


def make_engine_checkpoint(directory: Path, ranks: int = 2, seed: int = 0) -> Path:
    """An `engine` layout checkpoint: rank-NNNNN/ sub-checkpoints, config.json at the top."""
    directory.mkdir(parents=True)
    for rank in range(ranks):
        info = EngineInfo(engine_version="0.0-test", tensor_parallel_size=ranks, rank=rank,
                          dtype="float32")
        make_checkpoint(directory / f"rank-{rank:05d}", seed + rank, layout="engine",
                        engine=info, side_files=False)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (relative path -> bytes), links not followed."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def edited_index(checkpoint: Path, edit: Callable[[dict], None]) -> bytes:
    raw = json.loads((checkpoint / INDEX_FILENAME).read_bytes())
    edit(raw)
    return json.dumps(raw).encode()


Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class HostileServer:
    """A real HTTP/1.1 server on loopback. `routes` maps a path to a handler that writes the
    whole answer; other paths get a 404. `requests` counts what was asked for, and `sent`
    how many body bytes each path's handler managed to send before the client went away."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Handler] = {}
        self.fallback: Handler | None = None  # for paths not in `routes` (default: 404)
        self.requests: collections.Counter[str] = collections.Counter()
        self.sent: collections.Counter[str] = collections.Counter()
        outer = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - the standard library's name
                outer.requests[self.path] += 1
                handler = outer.routes.get(self.path, outer.fallback)
                try:
                    if handler is None:
                        reply(self, 404, b"not here")
                    else:
                        handler(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer((host, 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve_directory(self, directory: Path, prefix: str = "") -> None:
        """Serve every regular file under `directory` at `prefix/relative`."""
        for relative, data in files_of(directory).items():
            self.routes[f"{prefix}/{relative}"] = serve_bytes(data)

    def count(self, path: str, n: int) -> None:
        self.sent[path] += n

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
          content_type: str = "application/octet-stream",
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def serve_bytes(data: bytes, status: int = 200,
                content_type: str = "application/octet-stream") -> Handler:
    return lambda h: reply(h, status, data, content_type)


def redirect(location: str, status: int = 302) -> Handler:
    return lambda h: reply(h, status, b"", headers={"Location": location})


def endless(server: HostileServer, prefix: bytes = b"", total: int = 256 * 1024 * 1024,
            content_length: int | None = None) -> Handler:
    """`prefix`, then zeros up to `total` bytes, without a Content-Length unless one is given
    (the connection's end marks the body's): the client must stop reading by itself. The sent
    count shows how far it read."""

    def handler(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        if content_length is not None:
            h.send_header("Content-Length", str(content_length))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.wfile.write(prefix)
        server.count(h.path, len(prefix))
        block = bytes(1024 * 1024)
        left = total - len(prefix)
        while left > 0:
            piece = block[: min(left, len(block))]
            h.wfile.write(piece)
            server.count(h.path, len(piece))
            left -= len(piece)

    return handler


def drip(server: HostileServer, length: int, every_s: float = 0.05,
         stop: threading.Event | None = None) -> Handler:
    """Announce `length` bytes, then send one byte every `every_s` seconds: each read returns
    quickly, so only a deadline on the whole fetch ends it."""

    def handler(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        for _ in range(length):
            if stop is not None and stop.is_set():
                break
            h.wfile.write(b"\0")
            h.wfile.flush()
            server.count(h.path, 1)
            time.sleep(every_s)  # pacing the drip, not synchronising the test

    return handler
