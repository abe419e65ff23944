"""vLLM replica processes: device inventory, launch, phases, health, reaping.

A replica is one OpenAI-compatible vLLM server process started with `--load-format sllm` on a
tier's copy of the checkpoint, on a port the daemon picks, with the devices it assigns: GPU
ids through CUDA_VISIBLE_DEVICES (and the matching tensor-parallel size), or a CPU core set
through VLLM_CPU_OMP_THREADS_BIND with the whole process tree confined to those cores. Its
output is kept in a private log file (0600, in the daemon's 0700 state directory) and a short
tail, with the values of secret-bearing flags hidden; the loader's own summary line gives the
load phase and feeds the tier's bandwidth estimate.

Its command line is the replica command, the API caller's flags (checked by `replicaargs`),
the operator's flags, then the daemon's own (`--model`, `--host`, `--port`, ...): vLLM keeps
the last value of a flag, so the daemon's win, then the operator's.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..vllm.guard import CONTROL_KEY_ENV, KEY_ENV, MIDDLEWARE, MODEL_ENV
from ..vllmlog import RootCause
from .addresses import is_unspecified_host, url_host
from .replicaargs import has_flag, redact
from .standby import SWAP_ENV, SWAP_EXTENSION, ReplicaControl, sleeps
from .statedir import private_dir, read_private, remove_stale_temporaries, write_atomic

logger = logging.getLogger("sllm_plugin.store")
_ids = itertools.count(1)
GROUP_GRACE_S = 5.0  # for what is left of a replica's process group after its leader
# The loader's summary line (sllm_plugin.vllm.loader._log).
LOAD_LINE = re.compile(r"sllm: loaded (?P<gb>[\d.]+) GB in (?P<s>[\d.]+) s .*?tier (?P<tier>\w+)")
_CPU_SET = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


class ReplicaError(Exception):
    status = 409


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "cpu"
    spec: str  # GPU index, or a CPU core list such as "0-7"

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.spec}"


def parse_device(text: str) -> Device:
    kind, _, spec = text.partition(":")
    if kind == "cuda" and spec.isdigit():
        return Device("cuda", spec)
    if kind == "cpu" and _CPU_SET.fullmatch(spec):
        return Device("cpu", spec)
    raise ValueError(f"invalid device {text!r}: use 'cuda:N' or 'cpu:A-B' (a core list)")


def detect_devices() -> list[Device]:
    """The machine's GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi), else all CPU cores as one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [Device("cuda", i.strip()) for i in visible.split(",") if i.strip().isdigit()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
        if out.returncode == 0 and gpus:
            return [Device("cuda", str(i)) for i in range(len(gpus))]
    except (OSError, subprocess.SubprocessError):
        pass
    cores = sorted(os.sched_getaffinity(0))
    return [Device("cpu", f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0],
                                                                            cores[-1] + 1))
                   else ",".join(map(str, cores)))]


def cpu_cores(devices: list[Device]) -> set[int]:
    """The cores of the CPU devices among `devices` ("cpu:0-3,6" -> {0, 1, 2, 3, 6})."""
    cores: set[int] = set()
    for device in devices:
        if device.kind != "cpu":
            continue
        for part in device.spec.split(","):
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
    return cores


@contextlib.contextmanager
def children_confined_to(cores: set[int]):
    """Processes this thread starts inside the block may run on `cores` only.

    VLLM_CPU_OMP_THREADS_BIND binds only a CPU replica's compute threads; its API server and
    engine-core processes would float over every core. Each replica runs in its own session
    (hence its own scheduler autogroup), and there those floating processes starved another
    replica's compute thread on its own core: a 34-token prefill on an idle replica took over
    5.8 s in 3 of 8 trials beside a decoding one, never over 0.1 s with both trees confined
    (benchmarks/bench_replica_cores.py, 2-vCPU VM). A child inherits the CPU mask of the
    thread that forks it, so the calling thread takes `cores` for the spawn and its own mask
    back after; the daemon's other threads are untouched.
    """
    if not cores:
        yield
        return
    own = os.sched_getaffinity(0)  # 0: the calling thread
    try:
        os.sched_setaffinity(0, cores)
    except OSError as e:
        error = ReplicaError(f"cannot run a replica on cores {sorted(cores)}: {e.strerror} "
                             f"(this daemon may use cores {sorted(own)})")
        error.status = 400
        raise error from None
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def free_port(host: str = "127.0.0.1", ports: tuple[int, int] | None = None) -> int:
    """A port free on `host` now: any (the kernel's pick), or the first free one of the
    inclusive range `ports` (for a firewall or NetworkPolicy that names the replica ports)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = range(ports[0], ports[1] + 1) if ports else [0]
    for port in candidates:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    error = ReplicaError(f"no free port for a replica in {ports[0]}-{ports[1]}"
                         if ports else f"no free port on {host}")
    error.status = 503
    raise error


@dataclass
class Replica:
    model: str  # the model whose weights it holds (changes when a swap gives it another)
    devices: list[Device]
    id: int = field(default_factory=lambda: next(_ids))
    # queued|fetching|starting|ready|failed|stopping|stopped|exited, and for a kept engine:
    # standby (idle, serving nothing) | swapping (being given a model)
    state: str = "queued"
    tier: str | None = None
    path: str | None = None
    port: int | None = None
    pid: int | None = None
    created: float = field(default_factory=time.time)
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    marks: dict[str, float] = field(default_factory=dict)  # event -> wall time
    error: str | None = None
    returncode: int | None = None
    loaded_gb: float | None = None  # from the loader's summary line
    holds_tier: bool = False  # its tier copy is marked in use (until it has loaded)
    log_path: str | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    # The exception behind a failure, from the whole output (vLLM prints the engine core's
    # tens of lines before its last words, which only point "above").
    cause: RootCause = field(default_factory=RootCause, repr=False)
    output_done: threading.Event = field(default_factory=threading.Event, repr=False)
    ready: threading.Event = field(default_factory=threading.Event, repr=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    host: str = "127.0.0.1"  # the node's advertised address (`addresses.advertised_host`)
    local_host: str = "127.0.0.1"  # where the node itself connects to the replica
    # Its two keys (see sllm_plugin.vllm.guard): the serving key goes to the router over the
    # node's token-protected API; the control key never leaves the node. Neither is in
    # `describe()`, a log line or the command line.
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    control_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    # Standby engines and swaps (see standby.py): the name the engine serves under (its first
    # model's; the router maps), its engine key, how its current model came to it, since when
    # it is a standby, the flags it was started with (a claim must match them), whether it can
    # take a swap at all, and the node's control connection to it.
    served_name: str = ""
    shape: str | None = None
    started_via: str = "cold"  # cold | swap | standby
    standby_since: float | None = None
    launch_args: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    swappable: bool = False
    sleeps: bool = False  # a GPU replica with --enable-sleep-mode: its standby sleeps
    asleep: bool = False
    control: ReplicaControl | None = field(default=None, repr=False)
    note: str = ""  # a decision worth showing (why it cold-started though standbys were kept)
    failing: bool = False  # being stopped because it failed (a swap): ends "failed"

    def __post_init__(self) -> None:
        self.served_name = self.served_name or self.model

    @property
    def url(self) -> str | None:
        """The URL other hosts reach the replica by."""
        return f"http://{url_host(self.host)}:{self.port}" if self.port else None

    @property
    def local_url(self) -> str | None:
        """The URL the node daemon itself uses (health checks, control calls)."""
        return f"http://{url_host(self.local_host)}:{self.port}" if self.port else None

    def mark(self, event: str) -> None:
        self.marks[event] = time.time()

    def describe(self) -> dict:
        return {
            "id": self.id, "model": self.model, "state": self.state, "tier": self.tier,
            "path": self.path, "url": self.url, "pid": self.pid,
            "devices": [d.name for d in self.devices], "created": self.created,
            "phases": dict(self.phases), "loaded_gb": self.loaded_gb, "error": self.error,
            "returncode": self.returncode, "log": self.log_path,
            "served_name": self.served_name, "shape": self.shape,
            "started_via": self.started_via, "standby_since": self.standby_since,
            "note": self.note,
        }

    def controller(self) -> ReplicaControl:
        """The node's keep-alive control connection to this replica (made on first use)."""
        if self.control is None:
            assert self.local_url is not None
            self.control = ReplicaControl(self.local_url, self.control_key)
        return self.control


def failure(replica: Replica, what: str) -> str:
    """A failed replica's error: what happened, its root cause, and its last output."""
    cause = replica.cause.result()
    return (what + (f" Root cause:\n{cause}" if cause else "")
            + f"\nLast output:\n{stderr_tail(replica)}")


def stderr_tail(replica: Replica, lines: int = 15) -> str:
    return "\n".join(list(replica.tail)[-lines:])


@contextlib.contextmanager
def _done(event: threading.Event):
    """Set `event` when the block ends, however it ends."""
    try:
        yield
    finally:
        event.set()


#: GiB of KV cache for a CPU replica that nothing else sizes (see Launcher.environment).
CPU_KV_CACHE_GIB = 1
_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


class Launcher:
    """Starts replica processes and watches them until they end."""

    def __init__(self, command: list[str], base_args: list[str], env: dict[str, str],
                 log_dir: Path, ready_timeout_s: float, stop_timeout_s: float,
                 on_load=None, on_end=None, bind_host: str = "127.0.0.1",
                 advertise_host: str = "127.0.0.1",
                 port_range: tuple[int, int] | None = None, prefork: bool = False) -> None:
        self.command, self.base_args, self.env = command, base_args, env
        # Replicas listen where the daemon listens (its bind address), are reported by its
        # advertised address, and are reached by the daemon itself through the bind address
        # (loopback when that is 0.0.0.0 or ::).
        self.bind_host, self.advertise_host, self.port_range = bind_host, advertise_host, \
            port_range
        self.local_host = ("::1" if ":" in bind_host else "127.0.0.1") \
            if is_unspecified_host(bind_host) else bind_host
        self.log_dir, self.ready_timeout_s = log_dir, ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.on_load = on_load  # (replica, gb, seconds, tier) after the loader's line
        self.on_end = on_end  # (replica) when the process has ended, whatever the reason
        private_dir(log_dir, "the replica log directory")
        remove_stale_temporaries(log_dir)
        self._pids_lock = threading.Lock()
        # The pre-imported forking launcher (prefork.py), started at the first launch that can
        # use it (a `python -m MODULE` command of this interpreter): that launch waits for its
        # imports (about what its own would have cost), every later one forks from it.
        self.use_prefork = prefork and _forkable(command)
        self._prefork = None
        self._prefork_lock = threading.Lock()

    def _forker(self):
        """The prefork helper, started on first use; None where it cannot be (logged once)."""
        from .prefork import Prefork, PreforkError

        with self._prefork_lock:
            if self.use_prefork and self._prefork is None:
                try:
                    self._prefork = Prefork.start(env={**os.environ, **self.env},
                                                  preload=(self.command[2],))
                    logger.info("replicas fork from a pre-imported %s (pid %d)",
                                self.command[2], self._prefork.pid)
                except PreforkError as e:
                    self.use_prefork = False
                    logger.warning("replicas start as new processes: %s", e)
            return self._prefork

    def close(self) -> None:
        """Stop the prefork helper (the replicas it forked are not touched)."""
        with self._prefork_lock:
            if self._prefork is not None:
                self._prefork.close()
                self._prefork = None

    def _spawn(self, replica: Replica, argv: list[str]):
        """The replica's process: forked by the prefork helper where there is one, else a new
        process (Popen) confined to the replica's cores. OSError if the command cannot run."""
        from .prefork import PreforkError

        cores = cpu_cores(replica.devices)
        env = self.environment(replica, argv)
        forker = self._forker() if argv[: len(self.command)] == self.command else None
        if forker is not None:
            try:
                return forker.launch(argv, env=env, cpus=cores or None)
            except PreforkError as e:
                logger.warning("replica %d: the prefork helper failed (%s); starting a new "
                               "process", replica.id, e)
        with children_confined_to(cores):
            return subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True, text=True,
                bufsize=1, errors="replace")

    def argv(self, replica: Replica, untrusted: list[str], trusted: list[str]) -> list[str]:
        """The replica's command line: `untrusted` (the API caller's flags, already checked)
        first, then the operator's (`base_args`, then the model's `trusted`), then the
        daemon's own, so that for any flag given twice the later one counts."""
        cuda = [d for d in replica.devices if d.kind == "cuda"]
        own = ["--model", str(replica.path), "--served-model-name", replica.served_name,
               "--load-format", "sllm",
               "--model-loader-extra-config", json.dumps({"tier": replica.tier}),
               "--host", self.bind_host, "--port", str(replica.port),
               "--middleware", MIDDLEWARE]
        if len(cuda) > 1:
            own += ["--tensor-parallel-size", str(len(cuda))]
        if swappable(untrusted, self.base_args, trusted):
            own += ["--worker-extension-cls", SWAP_EXTENSION]
        return [*self.command, *untrusted, *self.base_args, *trusted, *own]

    def environment(self, replica: Replica, argv: list[str] | None = None) -> dict[str, str]:
        """The replica's environment: the daemon's, the configured `replica_env`, and its
        devices. A CPU replica whose memory nobody sized (no VLLM_CPU_KVCACHE_SPACE, no
        --kv-cache-memory-bytes or --gpu-memory-utilization in `argv`) gets a KV cache of
        CPU_KV_CACHE_GIB: vLLM's CPU default reserves 0.92 of the NUMA node's memory for one
        replica, which fails outright where the node is smaller than the machine (a 24 GiB
        VM whose node 0 reports 16 GiB) and leaves nothing for a second replica."""
        env = {**os.environ, **self.env}
        cuda = [d.spec for d in replica.devices if d.kind == "cuda"]
        cpus = [d.spec for d in replica.devices if d.kind == "cpu"]
        env[KEY_ENV], env[CONTROL_KEY_ENV] = replica.api_key, replica.control_key
        env[MODEL_ENV] = replica.model
        if replica.swappable:
            env.update(SWAP_ENV)
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)
        if cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cpus)
            sized = any(a.split("=", 1)[0] in _MEMORY_FLAGS for a in argv or [])
            if not sized and not env.get("VLLM_CPU_KVCACHE_SPACE"):
                env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
        return env

    def launch(self, replica: Replica, untrusted: list[str], trusted: list[str]) -> None:
        """Spawn the process; raises ReplicaError (400) if the command cannot run at all."""
        replica.host, replica.local_host = self.advertise_host, self.local_host
        replica.port = free_port(self.bind_host, self.port_range)
        log_path = self.log_dir / f"replica-{replica.id}.log"
        replica.log_path = str(log_path)
        argv = self.argv(replica, untrusted, trusted)
        replica.swappable = SWAP_EXTENSION in argv
        replica.sleeps = sleeps(argv, any(d.kind == "cuda" for d in replica.devices))
        replica.launch_args = (tuple(untrusted), tuple(trusted))
        shown, hidden = redact(argv)
        hidden += [replica.api_key, replica.control_key]  # should the replica ever echo one
        log = _new_log(log_path)
        log.write("$ " + " ".join(shown) + "\n")
        log.flush()
        replica.mark("spawn")
        try:
            replica.process = self._spawn(replica, argv)
        except ReplicaError:
            log.close()
            raise
        except OSError as e:
            log.close()
            error = ReplicaError(f"replica command {argv[0]!r} cannot be started: {e.strerror}")
            error.status = 400
            raise error from None
        replica.pid, replica.state = replica.process.pid, "starting"
        self._remember(replica.pid, argv,
                       forked=not isinstance(replica.process, subprocess.Popen))
        threading.Thread(target=self._read_output, args=(replica, log, hidden), daemon=True,
                         name=f"sllm-replica-{replica.id}-log").start()
        threading.Thread(target=self._watch, args=(replica,), daemon=True,
                         name=f"sllm-replica-{replica.id}-health").start()

    def stop(self, replica: Replica) -> None:
        """Stop the replica: SIGTERM to its first process (vLLM's API server), which stops
        its engine; SIGKILL to that process alone after `stop_timeout_s`. What is left of its
        process group is then ended by `end_group` (from `_watch`), which spares the shared
        memory the replica's processes leave. Returns once the whole group has gone."""
        process = replica.process
        if process is None or process.poll() is not None:
            return
        replica.state = "stopping"
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        replica.finished.wait(2 * GROUP_GRACE_S + 10)

    # -- replicas that outlived a killed daemon -------------------------------------------

    def _pids_path(self) -> Path:
        return self.log_dir / "replica-pids.json"

    def _pids(self) -> dict[str, str]:
        """pid -> SHA-256 of its command line (older daemons kept the command line itself)."""
        try:
            raw = json.loads(read_private(self._pids_path()) or b"{}")
        except (OSError, ValueError):
            return {}
        return ({str(k): v for k, v in raw.items() if isinstance(v, str)}
                if isinstance(raw, dict) else {})

    def _write_pids(self, pids: dict[str, str]) -> None:
        write_atomic(self._pids_path(), json.dumps(pids).encode())

    def _remember(self, pid: int, argv: list[str], forked: bool = False) -> None:
        # A digest, not the command line: that may hold an operator's secret flag. Of the
        # command line /proc will show, which is what `reap_orphans` compares: the argv of a
        # new process, the prefork helper's for a forked one (read from the helper: a process
        # read just after it was spawned can still show an empty command line).
        digest = _cmdline_digest(argv)
        if forked and self._prefork is not None:
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{self._prefork.pid}/cmdline").read_bytes()
                digest = hashlib.sha256(raw).hexdigest() if raw else digest
        with self._pids_lock:
            self._write_pids({**self._pids(), str(pid): digest})

    def _forget(self, pid: int) -> None:
        with self._pids_lock:
            pids = self._pids()
            pids.pop(str(pid), None)
            self._write_pids(pids)

    def reap_orphans(self) -> list[str]:
        """Stop replicas a previous daemon started and never stopped (it was killed): they
        hold devices this daemon is about to hand out again."""
        notes = []
        for pid_text, recorded in self._pids().items():
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # gone already
            if recorded not in (hashlib.sha256(raw).hexdigest(),  # else the pid was reused
                                raw.replace(b"\0", b" ").decode(errors="replace").strip()):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # as `stop` does, not SIGKILL to the group:
            if not _wait_gone(pid, self.stop_timeout_s):  # that leaked its shared memory
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            end_group(pid)
            notes.append(f"stopped replica process {pid} left by a previous daemon")
            logger.warning("%s", notes[-1])
        self._write_pids({})
        return notes

    # -- threads ------------------------------------------------------------------------

    def _read_output(self, replica: Replica, log, hidden: list[str]) -> None:
        assert replica.process is not None and replica.process.stdout is not None
        with log, _done(replica.output_done):
            for line in replica.process.stdout:
                for secret in hidden:  # vLLM logs its non-default arguments
                    line = line.replace(secret, "***")
                log.write(line)
                log.flush()
                replica.tail.append(line.rstrip("\n"))
                replica.cause.feed(line)
                match = LOAD_LINE.search(line)
                if match:
                    seconds = float(match["s"])
                    replica.mark("loaded")
                    replica.phases["load"] = seconds
                    replica.loaded_gb = float(match["gb"])
                    replica.phases["process_start"] = max(
                        0.0, replica.marks["loaded"] - seconds - replica.marks["spawn"])
                    if self.on_load:
                        self.on_load(replica, float(match["gb"]), seconds, match["tier"])

    @staticmethod
    def _unguarded(client, replica: Replica) -> str | None:
        """Why the replica is not safe to hand out: it serves without its key (a replica
        command that ignores `--middleware`, or a vLLM without that flag). Fail closed."""
        import httpx

        try:
            status = client.get(f"{replica.local_url}/v1/models").status_code
        except httpx.HTTPError as e:
            return f"the replica's key check could not be confirmed ({type(e).__name__}); stopped."
        if status != 401:
            return (f"the replica answered /v1/models without its key (HTTP {status}): its "
                    f"command ignores `--middleware {MIDDLEWARE}`; stopped.")
        return None

    def _watch(self, replica: Replica) -> None:
        import httpx

        process = replica.process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        stop = threading.Event()
        with httpx.Client(timeout=2.0) as client:
            while process.poll() is None and not replica.ready.is_set():
                if time.monotonic() > deadline:
                    replica.error = failure(
                        replica, f"not ready after {self.ready_timeout_s:.0f} s; stopped.")
                    self.stop(replica)
                    break
                try:
                    if client.get(f"{replica.local_url}/health").status_code == 200:
                        unguarded = self._unguarded(client, replica)
                        if unguarded:  # ends as "failed" below, with this error
                            replica.error = failure(replica, unguarded)
                            with contextlib.suppress(ProcessLookupError):
                                process.send_signal(signal.SIGTERM)
                            break
                        replica.mark("ready")
                        loaded = replica.marks.get("loaded", replica.marks["spawn"])
                        replica.phases["engine_init"] = replica.marks["ready"] - loaded
                        replica.phases["total"] = replica.marks["ready"] - replica.created
                        replica.state = "ready"
                        replica.ready.set()
                        break
                except httpx.HTTPError:
                    pass
                stop.wait(0.25)  # poll interval while the server comes up
        returncode = process.wait()
        replica.returncode = returncode
        end_group(process.pid)  # what the API server left (an engine core it did not stop)
        replica.output_done.wait(5)  # the error below names the last lines it printed
        if replica.state == "stopping":
            replica.state = "failed" if replica.failing else "stopped"
        elif not replica.ready.is_set():
            replica.state = "failed"
            replica.error = replica.error or failure(
                replica, f"replica exited with code {returncode} before it was ready.")
        else:
            replica.state = "exited"
            replica.error = failure(replica, f"replica exited with code {returncode}.")
        replica.mark("end")
        if replica.control is not None:
            replica.control.close()
        self._forget(process.pid)
        if self.on_end:
            self.on_end(replica)
        replica.finished.set()
        replica.ready.set()  # wake anyone waiting for readiness: it will not come


def _forkable(command: list[str]) -> bool:
    """A command the prefork helper can run in-process: `THIS_PYTHON -m MODULE`."""
    return len(command) == 3 and command[1] == "-m" and \
        os.path.realpath(command[0]) == os.path.realpath(sys.executable)


def swappable(*arg_lists: list[str]) -> bool:
    """Whether the daemon adds its swap extension: not where someone gave a worker extension
    of their own (vLLM takes one; theirs wins, and that replica never takes a swap)."""
    return not any(has_flag(args, "--worker-extension-cls") for args in arg_lists)


def _cmdline_digest(argv: list[str]) -> str:
    """SHA-256 of the command line as /proc/PID/cmdline shows it (NUL after each argument)."""
    return hashlib.sha256(b"".join(os.fsencode(a) + b"\0" for a in argv)).hexdigest()


def _new_log(path: Path):
    """A fresh replica log, 0600, created with O_EXCL|O_NOFOLLOW (an old log of the same name
    is removed first: replica ids start again at 1 with each daemon)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    return os.fdopen(fd, "w")


def _state(stat_text: str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return stat_text.rsplit(")", 1)[1].split()


def _group_members(pgid: int) -> dict[int, bool]:
    """Live (not zombie) processes of group `pgid` -> whether each is a multiprocessing
    resource tracker."""
    members = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _state(stat_path.read_text())
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cmdline = (stat_path.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        members[int(stat_path.parent.name)] = b"multiprocessing.resource_tracker" in cmdline
    return members


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process `pid` (not a child of ours) has ended; False after `timeout`."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        try:
            if _state(Path(f"/proc/{pid}/stat").read_text())[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        tick.wait(0.05)  # nothing to block on for a process that is not our child
    return False


def _wait_group(pgid: int, timeout: float, trackers_too: bool) -> dict[int, bool]:
    """Wait until group `pgid` has no members (but resource trackers, unless `trackers_too`);
    returns the members left after `timeout`."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while True:
        left = {pid: tracker for pid, tracker in _group_members(pgid).items()
                if trackers_too or not tracker}
        if not left or time.monotonic() >= deadline:
            return left
        tick.wait(0.05)  # the members are not our children: nothing to block on


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def end_group(pgid: int, grace_s: float = GROUP_GRACE_S) -> None:
    """End what is left of a replica's process group `pgid` once its leader has gone.

    The shared memory (`/dev/shm/psm_*`) vLLM's engine and workers map is removed by
    Python's multiprocessing resource tracker, a process of the same group that ignores
    SIGTERM and cleans up when the processes it serves have exited. A SIGKILL to the whole
    group killed it too and left two segments (400 MB with vLLM's defaults) per replica. So:
    SIGTERM to the group; SIGKILL after `grace_s` to what is left but the tracker; SIGKILL to
    the tracker only if it is still there `grace_s` later. The group id cannot be taken by a
    new process while any member lives, so this never signals strangers.
    """
    if not _group_members(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    _signal(list(_wait_group(pgid, grace_s, trackers_too=False)), signal.SIGKILL)
    _signal(list(_wait_group(pgid, grace_s, trackers_too=True)), signal.SIGKILL)
