"""vLLM replica processes: device inventory, launch, phases, health, reaping.

A replica is one OpenAI-compatible vLLM server process started with `--load-format sllm` on a
tier's copy of the checkpoint, on a port the daemon picks, with the devices it assigns: GPU
ids through CUDA_VISIBLE_DEVICES (and the matching tensor-parallel size), or a CPU core set
through VLLM_CPU_OMP_THREADS_BIND with the whole process tree confined to those cores. Its
output is kept in a log file and a short tail; the loader's own summary line gives the load
phase and feeds the tier's bandwidth estimate.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("sllm_plugin.store")
_ids = itertools.count(1)
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    model: str
    devices: list[Device]
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued|fetching|starting|ready|failed|stopping|stopped|exited
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
    ready: threading.Event = field(default_factory=threading.Event, repr=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def mark(self, event: str) -> None:
        self.marks[event] = time.time()

    def describe(self) -> dict:
        return {
            "id": self.id, "model": self.model, "state": self.state, "tier": self.tier,
            "path": self.path, "url": self.url, "pid": self.pid,
            "devices": [d.name for d in self.devices], "created": self.created,
            "phases": dict(self.phases), "loaded_gb": self.loaded_gb, "error": self.error,
            "returncode": self.returncode, "log": self.log_path,
        }


def stderr_tail(replica: Replica, lines: int = 15) -> str:
    return "\n".join(list(replica.tail)[-lines:])


class Launcher:
    """Starts replica processes and watches them until they end."""

    def __init__(self, command: list[str], base_args: list[str], env: dict[str, str],
                 log_dir: Path, ready_timeout_s: float, stop_timeout_s: float,
                 on_load=None, on_end=None) -> None:
        self.command, self.base_args, self.env = command, base_args, env
        self.log_dir, self.ready_timeout_s = log_dir, ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.on_load = on_load  # (replica, gb, seconds, tier) after the loader's line
        self.on_end = on_end  # (replica) when the process has ended, whatever the reason
        log_dir.mkdir(parents=True, exist_ok=True)
        self._pids_lock = threading.Lock()

    def argv(self, replica: Replica, extra: list[str]) -> list[str]:
        cuda = [d for d in replica.devices if d.kind == "cuda"]
        args = [*self.command, "--model", str(replica.path), "--served-model-name",
                replica.model, "--load-format", "sllm",
                "--model-loader-extra-config", json.dumps({"tier": replica.tier}),
                "--host", "127.0.0.1", "--port", str(replica.port)]
        if len(cuda) > 1:
            args += ["--tensor-parallel-size", str(len(cuda))]
        return args + self.base_args + extra

    def environment(self, replica: Replica) -> dict[str, str]:
        env = {**os.environ, **self.env}
        cuda = [d.spec for d in replica.devices if d.kind == "cuda"]
        cpus = [d.spec for d in replica.devices if d.kind == "cpu"]
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)
        if cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cpus)
        return env

    def launch(self, replica: Replica, extra: list[str]) -> None:
        """Spawn the process; raises ReplicaError (400) if the command cannot run at all."""
        replica.port = free_port()
        replica.log_path = str(self.log_dir / f"replica-{replica.id}.log")
        argv = self.argv(replica, extra)
        log = open(replica.log_path, "w")  # noqa: SIM115 - closed by the reader thread
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        replica.mark("spawn")
        try:
            with children_confined_to(cpu_cores(replica.devices)):
                replica.process = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=self.environment(replica),
                    start_new_session=True, text=True, bufsize=1, errors="replace")
        except ReplicaError:
            log.close()
            raise
        except OSError as e:
            log.close()
            error = ReplicaError(f"replica command {argv[0]!r} cannot be started: {e.strerror}")
            error.status = 400
            raise error from None
        replica.pid, replica.state = replica.process.pid, "starting"
        self._remember(replica.pid, argv)
        threading.Thread(target=self._read_output, args=(replica, log), daemon=True,
                         name=f"sllm-replica-{replica.id}-log").start()
        threading.Thread(target=self._watch, args=(replica,), daemon=True,
                         name=f"sllm-replica-{replica.id}-health").start()

    def stop(self, replica: Replica) -> None:
        process = replica.process
        if process is None or process.poll() is not None:
            return
        replica.state = "stopping"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        replica.finished.wait(10)

    # -- replicas that outlived a killed daemon -------------------------------------------

    def _pids_path(self) -> Path:
        return self.log_dir / "replica-pids.json"

    def _pids(self) -> dict[str, str]:
        try:
            return json.loads(self._pids_path().read_text())
        except (OSError, ValueError):
            return {}

    def _write_pids(self, pids: dict[str, str]) -> None:
        tmp = self._pids_path().with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self._pids_path())

    def _remember(self, pid: int, argv: list[str]) -> None:
        with self._pids_lock:
            self._write_pids({**self._pids(), str(pid): " ".join(argv)})

    def _forget(self, pid: int) -> None:
        with self._pids_lock:
            pids = self._pids()
            pids.pop(str(pid), None)
            self._write_pids(pids)

    def reap_orphans(self) -> list[str]:
        """Stop replicas a previous daemon started and never stopped (it was killed): they
        hold devices this daemon is about to hand out again."""
        notes = []
        for pid_text, command in self._pids().items():
            pid = int(pid_text)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue  # gone already
            if cmdline.decode(errors="replace").strip() != command.strip():
                continue  # the pid was reused by something else
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            notes.append(f"stopped replica process {pid} left by a previous daemon")
            logger.warning("%s", notes[-1])
        self._write_pids({})
        return notes

    # -- threads ------------------------------------------------------------------------

    def _read_output(self, replica: Replica, log) -> None:
        assert replica.process is not None and replica.process.stdout is not None
        with log:
            for line in replica.process.stdout:
                log.write(line)
                log.flush()
                replica.tail.append(line.rstrip("\n"))
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

    def _watch(self, replica: Replica) -> None:
        import httpx

        process = replica.process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        stop = threading.Event()
        with httpx.Client(timeout=2.0) as client:
            while process.poll() is None and not replica.ready.is_set():
                if time.monotonic() > deadline:
                    replica.error = (f"not ready after {self.ready_timeout_s:.0f} s; stopped. "
                                     f"Last output:\n{stderr_tail(replica)}")
                    self.stop(replica)
                    break
                try:
                    if client.get(f"{replica.url}/health").status_code == 200:
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
        if replica.state == "stopping":
            replica.state = "stopped"
        elif not replica.ready.is_set():
            replica.state = "failed"
            replica.error = replica.error or (
                f"replica exited with code {returncode} before it was ready. Last output:\n"
                f"{stderr_tail(replica)}")
        else:
            replica.state = "exited"
            replica.error = (f"replica exited with code {returncode}. Last output:\n"
                             f"{stderr_tail(replica)}")
        replica.mark("end")
        self._forget(process.pid)
        if self.on_end:
            self.on_end(replica)
        replica.finished.set()
        replica.ready.set()  # wake anyone waiting for readiness: it will not come
