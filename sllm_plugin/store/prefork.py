"""A pre-imported forking launcher for replica processes.

A replica's API server spends its first seconds importing vLLM, torch and transformers (8.7 s
of a 33 s cold start on a busy 2-vCPU machine, see docs/COLD_START.md). `Prefork.start()`
runs a helper process that has imported them once; `Prefork.launch()` asks it to fork a child
that becomes the replica: a new session (its own process group, so `replicas.end_group` works
unchanged), the environment, working directory, CPU cores and argv the daemon gives, stdin
from /dev/null, stdout and stderr onto a pipe whose read end the daemon keeps, and then
`python -m MODULE ARGS` run in-process through `runpy` as the interpreter would. An argv that
is not `[this python, "-m", MODULE, ...]` is exec'd in the child instead, so any replica
command still works (only without the head start).

Why this is safe after the imports (checked by tests/test_prefork.py):
- the helper never runs a torch op, so no OpenMP/intra-op thread pool exists to be lost in the
  fork; it starts no threads and no event loop, and imports nothing that initialises CUDA;
- vLLM's engine core and worker are still *spawned* (the CPU platform forces `spawn`; CUDA
  needs it too), so the processes that compute start from a fresh interpreter with the
  replica's own environment (OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND, CUDA_VISIBLE_DEVICES);
- what is read from the environment at import time is the helper's: vLLM's logging setup
  (VLLM_CONFIGURE_LOGGING, VLLM_LOGGING_LEVEL) and torch's OpenMP defaults in the API server.
  Start the helper with the node's base replica environment; vLLM's other variables are read
  when its config is built, after the fork, from the replica's environment;
- the child resets the helper's SIGCHLD handler and wakeup fd, closes the helper's socket,
  makes stdout line-buffered (a Popen'd Python on a pipe is block-buffered; vLLM's log
  handler flushes each record either way), and leaves through the interpreter's own exit
  (threads joined, atexit handlers run), not `os._exit`.

The daemon talks to the helper over a private socketpair (no path, nothing to authenticate):
one JSON request per launch with the pipe's write end attached; the helper answers with the
child's pid and a pidfd (signals go through the pidfd, so a reused pid is never signalled),
and later with the child's exit status, which only the helper (its parent) can collect.
If the daemon goes away the helper exits; its children live on, as Popen'd replicas do.
"""

from __future__ import annotations

import array
import contextlib
import io
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_MAX_MESSAGE = 1 << 20  # one launch request: argv + environment


class PreforkError(Exception):
    """The helper could not start, or refused or failed a launch."""


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if len(data) > _MAX_MESSAGE:
        raise PreforkError(f"prefork message of {len(data)} bytes is over {_MAX_MESSAGE}")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and the fds that came with it; (None, []) at end of stream."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise PreforkError("prefork message truncated")
    if not data:
        return None, list(fds)
    try:
        return json.loads(data), list(fds)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


# -- the daemon's side ----------------------------------------------------------------------


class ForkedProcess:
    """A replica the helper forked: the parts of `subprocess.Popen` the node's Launcher uses
    (pid, stdout, poll, wait, send_signal, terminate, kill, returncode)."""

    def __init__(self, args: list[str], pid: int, pidfd: int, stdout: IO[str]) -> None:
        self.args, self.pid, self.stdout = args, pid, stdout
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()  # the pidfd is never used after it is closed
        self._ended = threading.Event()

    def _exited(self, returncode: int) -> None:
        with self._lock:
            self.returncode = returncode
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the child through its pidfd; nothing once it has ended (as Popen)."""
        with self._lock:
            if self._pidfd is None:
                return
            with contextlib.suppress(ProcessLookupError):  # ended; its exit notice is coming
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class _Pending:
    args: list[str]
    stdout: IO[str]
    done: threading.Event
    process: ForkedProcess | None = None
    error: str | None = None


class Prefork:
    """The daemon's handle on one helper. Thread-safe: launches are serialised."""

    def __init__(self, helper: subprocess.Popen, sock: socket.socket) -> None:
        self._helper, self._sock = helper, sock
        self._lock = threading.Lock()  # one request on the wire at a time
        self._ids = iter(range(1, 1 << 62))
        self._pending: dict[int, _Pending] = {}
        self._live: dict[int, ForkedProcess] = {}
        self._state = threading.Lock()
        self._gone = False  # the helper ended (under _state)
        self._reader = threading.Thread(target=self._read, daemon=True, name="sllm-prefork")

    @classmethod
    def start(cls, env: dict[str, str] | None = None,
              preload: tuple[str, ...] = (API_SERVER_MODULE,), python: str = sys.executable,
              timeout_s: float = 600.0, stderr: int | None = subprocess.DEVNULL) -> Prefork:
        """Start a helper that imports `preload` (with environment `env`), and wait until it
        has: PreforkError (with the helper's reason) if it cannot."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            helper = subprocess.Popen(
                [python, "-m", __name__, str(theirs.fileno()), *preload], env=env,
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)
        ours.settimeout(timeout_s)
        try:
            ready, fds = _receive(ours)
        except (OSError, ValueError) as e:
            helper.kill()
            helper.wait()
            ours.close()
            raise PreforkError(f"the prefork helper did not get ready: {e}") from None
        for fd in fds:
            os.close(fd)
        if not ready or "ready" not in ready:
            helper.wait()
            ours.close()
            why = (ready or {}).get("error", f"it exited with code {helper.returncode}")
            raise PreforkError(f"the prefork helper could not preload {list(preload)}: {why}")
        ours.settimeout(None)
        self = cls(helper, ours)
        self._reader.start()
        return self

    @property
    def pid(self) -> int:
        return self._helper.pid

    def launch(self, argv: list[str], env: dict[str, str], cwd: str | None = None,
               cpus: set[int] | None = None) -> ForkedProcess:
        """Fork a replica running `argv` (see the module docstring); its stdout+stderr are the
        returned process's `stdout` (text, lines, undecodable bytes replaced). OSError (as
        Popen raises) if the command cannot run; PreforkError if the helper is gone."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        stdout = open(read_end, encoding="utf-8", errors="replace")  # noqa: SIM115
        pending = _Pending(list(argv), stdout, threading.Event())
        try:
            with self._lock:
                request_id = next(self._ids)
                with self._state:
                    if self._gone:
                        raise OSError("it ended")
                    self._pending[request_id] = pending
                _send(self._sock, {"id": request_id, "argv": list(argv), "env": dict(env),
                                   "cwd": cwd, "cpus": sorted(cpus) if cpus else None},
                      [write_end])
        except OSError as e:
            stdout.close()
            raise PreforkError(f"the prefork helper is gone: {e}") from None
        finally:
            os.close(write_end)  # the child holds its own copy now
        pending.done.wait()
        if pending.process is None:
            stdout.close()
            if pending.error and pending.error.startswith("ENOENT"):
                raise FileNotFoundError(2, "No such file or directory", argv[0])
            raise PreforkError(pending.error or "the prefork helper is gone")
        return pending.process

    def close(self) -> None:
        """Stop the helper (its children are not touched)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._helper.wait()
        self._reader.join(10)
        self._sock.close()

    def _read(self) -> None:
        while True:
            try:
                message, fds = _receive(self._sock)
            except (OSError, ValueError, PreforkError):
                message, fds = None, []
            if message is None:
                break
            if "exited" in message:
                with self._state:
                    process = self._live.pop(message["exited"], None)
                if process is not None:
                    process._exited(message["returncode"])
                continue
            with self._state:
                pending = self._pending.pop(message.get("id"), None)
            if pending is None:
                for fd in fds:
                    os.close(fd)
                continue
            if "pid" in message and fds:
                process = ForkedProcess(pending.args, message["pid"], fds[0], pending.stdout)
                with self._state:
                    self._live[process.pid] = process
                pending.process = process
            else:
                pending.error = str(message.get("error", "no answer"))
            pending.done.set()
        self._helper_gone()

    def _helper_gone(self) -> None:
        """The helper ended: launches in flight fail; a live child's exit status is lost (its
        parent is gone), so each is watched through its pidfd and ends with code -1."""
        with self._state:
            self._gone = True
            pending, self._pending = list(self._pending.values()), {}
            live, self._live = list(self._live.values()), {}
        for item in pending:
            item.error = "the prefork helper ended"
            item.done.set()
        for process in live:
            threading.Thread(target=_watch_orphan, args=(process,), daemon=True).start()


def _watch_orphan(process: ForkedProcess) -> None:
    with process._lock:
        pidfd = None if process._pidfd is None else os.dup(process._pidfd)
    if pidfd is not None:
        with selectors.DefaultSelector() as sel, contextlib.suppress(OSError, ValueError):
            sel.register(pidfd, selectors.EVENT_READ)
            sel.select()  # a pidfd turns readable when its process ends
        os.close(pidfd)
    process._exited(-1)


# -- the helper's side ----------------------------------------------------------------------


@dataclass
class _Job:
    """What a forked child is to become."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    cpus: list[int] | None
    stdout_fd: int

    def in_process_module(self) -> str | None:
        """MODULE when argv is `[this python, -m, MODULE, ...]`: run in the forked child
        (what the helper preloaded is already imported; anything else is imported there)."""
        if (len(self.argv) >= 3 and self.argv[1] == "-m" and self.argv[2]
                and os.path.realpath(self.argv[0]) == os.path.realpath(sys.executable)):
            return self.argv[2]
        return None


def _validate(message: dict) -> _Job | str:
    argv, env = message.get("argv"), message.get("env")
    cwd, cpus = message.get("cwd"), message.get("cpus")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        return "argv must be a non-empty list of strings"
    if not (isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return "env must map strings to strings"
    if cwd is not None and not isinstance(cwd, str):
        return "cwd must be a string"
    if cpus is not None and not (isinstance(cpus, list) and cpus
                                 and all(isinstance(c, int) and c >= 0 for c in cpus)):
        return "cpus must be a non-empty list of core numbers"
    return _Job(argv, env, cwd, cpus, -1)


def _serve(sock: socket.socket) -> _Job | None:
    """The helper's loop. Returns None when the daemon has gone, or, in a forked child, the
    job that child is to become (the loop's resources are released on the way out)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # so that set_wakeup_fd sees it
    signal.set_wakeup_fd(wake_w)
    with contextlib.ExitStack() as stack:
        sel = stack.enter_context(selectors.DefaultSelector())
        wake = stack.enter_context(open(wake_r, "rb"))
        stack.callback(os.close, wake_w)  # (after set_wakeup_fd(-1) in a child)
        sel.register(sock, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is wake:
                    with contextlib.suppress(BlockingIOError):
                        wake.read(4096)
                    _reap(sock)
                    continue
                try:
                    message, fds = _receive(sock)
                except (ValueError, PreforkError) as e:
                    _send(sock, {"id": None, "error": f"unreadable request: {e}"})
                    continue
                if message is None:
                    return None
                if not isinstance(message, dict):
                    message = {}
                job = _validate(message) if len(fds) == 1 else "one stdout fd expected"
                if isinstance(job, str):
                    for fd in fds:
                        os.close(fd)
                    _send(sock, {"id": message.get("id"), "error": job})
                    continue
                job.stdout_fd = fds[0]
                if job.in_process_module() is None and shutil.which(
                        job.argv[0], path=job.env.get("PATH", os.defpath)) is None:
                    os.close(job.stdout_fd)
                    _send(sock, {"id": message.get("id"),
                                 "error": f"ENOENT: {job.argv[0]!r} not found"})
                    continue
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    return job
                os.close(job.stdout_fd)
                pidfd = os.pidfd_open(pid)
                try:
                    _send(sock, {"id": message.get("id"), "pid": pid}, [pidfd])
                finally:
                    os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            _send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _become(job: _Job) -> int:
    """In the forked child: take the job's session, cores, stdio, cwd and environment, then
    run it. Returns the exit code for the interpreter's normal exit."""
    import runpy

    os.setsid()
    if job.cpus:
        os.sched_setaffinity(0, job.cpus)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(job.stdout_fd, 1)
    os.dup2(job.stdout_fd, 2)
    os.close(devnull)
    os.close(job.stdout_fd)
    if job.cwd:
        path0 = os.getcwd()
        os.chdir(job.cwd)
        if sys.path and sys.path[0] == path0:  # `python -m` puts the cwd first
            sys.path[0] = os.getcwd()
    os.environ.clear()
    os.environ.update(job.env)
    module = job.in_process_module()
    if module is None:
        os.execvpe(job.argv[0], job.argv, job.env)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    sys.argv = [job.argv[0], *job.argv[3:]]
    # Run from a fresh module object as `python -m` does (its imports stay loaded); runpy
    # warns about a module already in sys.modules, and it would share the helper's globals.
    sys.modules.pop(module, None)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """`python -m sllm_plugin.store.prefork FD MODULE...`: preload, then serve on socket FD."""
    import importlib
    import traceback

    sock = socket.socket(fileno=int(argv[0]))
    preloaded = argv[1:]
    try:
        for module in preloaded:
            importlib.import_module(module)
    except BaseException as e:  # noqa: BLE001 - reported to the daemon, then exit
        traceback.print_exc()
        _send(sock, {"error": f"{type(e).__name__} importing {module}: {e}"})
        return 1
    _send(sock, {"ready": True, "pid": os.getpid()})
    job = _serve(sock)
    sock.close()
    if job is None:
        return 0
    return _become(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
