"""Hosts made of Linux network namespaces, for tests of a fleet on one machine.

A `Network` is one bridge in the root namespace and one namespace per `Host`, each joined to the
bridge by a veth pair (its end inside is `eth0`), loopback up. Addresses come from the RFC 2544
benchmarking range (nothing routes them off the bridge): each Network takes the first free
198.18.N.0/24 (N = 0 when it is alone on the machine, so two test runs at once never clash),
hosts get .1, .2, ... in the order they are made, and the root namespace gets .254 on the bridge,
so the test process itself reaches every host directly. `Network.dns()` adds a host running
dnsmasq that answers the test zone `sllm.test` from records the test sets.

    require_netns(dns=True)            # skip (or fail, under SLLM_REQUIRE_NETNS=1) if unusable
    with Network() as net:
        a, b = net.host("a"), net.host("b")
        dns = net.dns()
        dns.set_records("b.sllm.test", [b.address])
        b.use_dns(dns)                 # before starting the processes that should use it
        server = a.popen([sys.executable, "-m", "http.server", "--bind", a.address, "8000"])
        status, body = b.http("GET", f"http://{a.address}:8000/")  # from inside b

Every name carries a random session id, and everything a Network makes is recorded in a
marker directory (/run/sllm-netns/<id>/, with the owning process); a later Network removes what
a killed earlier run left behind, but only what such a marker lists and only once its owner is
dead. Teardown (leaving the `with`, even on an exception) ends the processes still inside the
namespaces and removes the namespaces, links, bridge and /etc/netns/<namespace>.

Nothing here sleeps to synchronise: waits poll a real condition (a DNS answer).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import ipaddress
import json as jsonlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUIRE_ENV = "SLLM_REQUIRE_NETNS"
ZONE = "sllm.test"
REGISTRY = Path("/run/sllm-netns")
SUBNETS = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: for benchmarking, never routed
ROOT_HOST = 254
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,4}")  # interface names are 15 characters at most
_HOST = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


class NetnsError(RuntimeError):
    """A command that builds or tears down the network failed; says which and why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


# -- availability -------------------------------------------------------------------------------

@functools.cache
def netns_available() -> str | None:
    """None if network namespaces can be made here, else why not (for a skip message)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (this process runs as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"sllmprobe{secrets.token_hex(3)}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    r = _ip("link", "add", probe, "type", "bridge", check=False)
    if r.returncode != 0:
        return f"cannot make a bridge here: {r.stderr.strip()}"
    _ip("link", "del", probe, check=False)
    return None


def dns_available() -> str | None:
    """None if `Network.dns()` can run (dnsmasq and getent are installed), else why not."""
    for tool, package in (("dnsmasq", "dnsmasq-base"), ("getent", "libc-bin")):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (install {package})"
    return None


def require_netns(dns: bool = False) -> None:
    """Skip the calling test with the reason when namespaces (and dnsmasq, if `dns`) are not
    usable here; but when $SLLM_REQUIRE_NETNS=1 (CI), fail it instead: there a missing
    prerequisite is a broken build, not a reason to test less."""
    import pytest

    reason = netns_available() or (dns_available() if dns else None)
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# -- markers of what a run made -----------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _kill_inside(netns: str) -> None:
    """End every process still inside `netns` (a namespace of ours: only our tests run there)."""
    r = _ip("netns", "pids", netns, check=False)
    pids = [int(p) for p in r.stdout.split()] if r.returncode == 0 else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reap our own children; others are gone once the kill lands
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _remove(resources: list[tuple[str, str]], sid: str) -> list[str]:
    """Remove what a marker lists (namespaces first, then links, then files); the names must
    carry the session id. Returns the problems, if any."""
    problems = []
    order = {"netns": 0, "link": 1, "bridge": 2, "etc": 3}
    for kind, name in sorted(resources, key=lambda kv: order.get(kv[0], 9)):
        if sid not in name or "/" in name:
            problems.append(f"not removing {kind} {name!r}: not of session {sid}")
            continue
        if kind == "netns":
            if Path(f"/run/netns/{name}").exists():
                _kill_inside(name)
                r = _ip("netns", "del", name, check=False)
                if r.returncode != 0:
                    problems.append(f"ip netns del {name}: {r.stderr.strip()}")
        elif kind in ("link", "bridge"):
            if Path(f"/sys/class/net/{name}").exists():
                r = _ip("link", "del", name, check=False)
                if r.returncode != 0 and Path(f"/sys/class/net/{name}").exists():
                    problems.append(f"ip link del {name}: {r.stderr.strip()}")
        elif kind == "etc":
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    return problems


def _marker_resources(marker: Path) -> list[tuple[str, str]]:
    try:
        lines = (marker / "resources").read_text().splitlines()
    except OSError:
        return []
    return [tuple(line.split(" ", 1)) for line in lines if " " in line]  # type: ignore[misc]


def clean_stale() -> list[str]:
    """Remove what earlier runs left behind: only sessions with a marker whose owning process
    is gone (pid and start time), and only the resources that marker lists. Returns the
    session ids removed."""
    removed = []
    if not REGISTRY.is_dir():
        return removed
    for marker in REGISTRY.iterdir():
        if not marker.is_dir() or not re.fullmatch(r"[0-9a-f]{6}", marker.name):
            continue
        try:
            pid, started = (marker / "owner").read_text().split()
        except (OSError, ValueError):
            continue  # being written right now, or not ours
        if _start_time(int(pid)) == started:
            continue  # its run is still going
        _remove(_marker_resources(marker), marker.name)
        shutil.rmtree(marker, ignore_errors=True)
        removed.append(marker.name)
    return removed


@contextlib.contextmanager
def _registry_lock():
    REGISTRY.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(REGISTRY / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    used = set()
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", out):
        addr = ipaddress.ip_address(match.group(1))
        if addr in SUBNETS:
            used.add(ipaddress.ip_network(f"{addr}/24", strict=False))
    return used


# -- the network --------------------------------------------------------------------------------

class Host:
    """One namespace on the bridge: its `address` is what other hosts and the tests reach."""

    def __init__(self, network: Network, name: str, index: int, address: str) -> None:
        self.network, self.name, self.address = network, name, address
        self.netns = f"{network.prefix}-{network.sid}-{name}"
        self.link = f"{network.prefix}{network.sid}v{index:x}"  # the bridge's end of the veth

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    def _argv(self, argv: list[str]) -> list[str]:
        return [*self.exec_prefix(), *argv]

    def exec_prefix(self) -> list[str]:
        """The words that run a command inside this host (for a Popen made elsewhere)."""
        return ["ip", "netns", "exec", self.netns]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside this host's namespace (`ip netns exec` execs it: the Popen's pid
        is the program's own). Its /etc/resolv.conf is the one `use_dns` set, if any."""
        return subprocess.Popen(self._argv(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(argv), **kwargs)

    def link_down(self) -> None:
        """Cut this host off the bridge (a partition): nothing reaches it, nor it anything."""
        _ip("link", "set", self.link, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.link, "up")

    def use_dns(self, dns: Dns) -> None:
        """Resolve names with `dns` from now on: /etc/netns/<netns>/resolv.conf, which `ip netns
        exec` mounts over /etc/resolv.conf for programs started after this call."""
        etc = Path("/etc/netns") / self.netns
        etc.mkdir(parents=True, exist_ok=True)
        self.network._record("etc", self.netns)
        # A short timeout: a test that partitions the server waits seconds, not tens of them.
        (etc / "resolv.conf").write_text(f"nameserver {dns.address}\n"
                                         "options timeout:1 attempts:2\n")

    def http(self, method: str, url: str, headers: dict[str, str] | None = None,
             json: object = None, timeout: float = 10) -> tuple[int, bytes]:
        """Make one HTTP request from inside this host (a small Python process in the
        namespace): for checks of what an outsider on the network can and cannot do.
        Returns (status, body); ConnectionError when no answer came (refused, timed out)."""
        request = {"method": method, "url": url, "headers": headers or {}, "json": json,
                   "timeout": timeout}
        r = self.run([sys.executable, "-c", _HTTP_CHILD], input=jsonlib.dumps(request),
                     capture_output=True, text=True, timeout=timeout + 30)
        if r.returncode != 0:
            raise NetnsError(f"the HTTP helper in {self.name} failed ({r.returncode}): "
                             f"{r.stderr.strip()[-2000:]}")
        answer = jsonlib.loads(r.stdout)
        if "error" in answer:
            raise ConnectionError(f"{method} {url} from {self.name}: {answer['error']}")
        return answer["status"], base64.b64decode(answer["body"])


# Run inside a namespace: no proxy from the environment (it could not be reached there anyway).
_HTTP_CHILD = """
import base64, json, sys
import httpx
req = json.load(sys.stdin)
kwargs = {"json": req["json"]} if req["json"] is not None else {}
try:
    with httpx.Client(trust_env=False, timeout=req["timeout"]) as client:
        r = client.request(req["method"], req["url"], headers=req["headers"], **kwargs)
    out = {"status": r.status_code, "body": base64.b64encode(r.content).decode()}
except httpx.HTTPError as e:
    out = {"error": f"{type(e).__name__}: {e}"}
json.dump(out, sys.stdout)
"""


class Dns:
    """A dnsmasq on its own host, answering the test zone `sllm.test` from records the test
    sets (and NXDOMAIN for any other name in the zone); nothing is forwarded anywhere."""

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host, self.address = host, host.address
        self.hosts_file = workdir / "hosts"
        self.records: dict[str, list[str]] = {}
        self.log_path = workdir / "dnsmasq.log"
        # The server answers itself: the readiness and record checks resolve through it.
        host.use_dns(self)
        self._write({"dnsmasq-ready." + ZONE: [self.address]})
        with open(self.log_path, "w") as log:
            self.proc = host.popen(
                ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                 f"--addn-hosts={self.hosts_file}", f"--listen-address={self.address}",
                 "--bind-interfaces", "--port=53", f"--local=/{ZONE}/", "--domain-needed",
                 "--user=root", "--group=root", "--pid-file", "--cache-size=0",
                 "--local-ttl=0", "--no-negcache", "--log-facility=-"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait({"dnsmasq-ready." + ZONE: [self.address]})  # before any SIGHUP

    def _write(self, records: dict[str, list[str]]) -> None:
        lines = [f"{addr} {name}" for name, addrs in sorted(records.items()) for addr in addrs]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.hosts_file)

    def answer(self, name: str) -> set[str]:
        """The addresses the server answers for `name` now (empty: NXDOMAIN or no records)."""
        r = self.host.run(["getent", "ahosts", name], capture_output=True, text=True,
                          timeout=30)
        return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}

    def _wait(self, records: dict[str, list[str]], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for name, addrs in records.items():
            want = {str(ipaddress.ip_address(a)) for a in addrs}
            while (got := self.answer(name)) != want:
                if self.proc.poll() is not None:
                    raise NetnsError(f"dnsmasq exited with {self.proc.returncode}: "
                                     f"{self.log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise NetnsError(f"dnsmasq answers {sorted(got)} for {name}, not "
                                     f"{sorted(want)}, after {timeout} s")
                time.sleep(0.05)  # polling interval for the condition above

    def set_records(self, name: str, addresses: list[str]) -> None:
        """Make `name` answer exactly `addresses` (A and AAAA; none: NXDOMAIN), and return once
        the server answers that set."""
        if not name.endswith("." + ZONE):
            raise ValueError(f"{name!r} is not in the test zone {ZONE}")
        for addr in addresses:
            ipaddress.ip_address(addr)  # ValueError for anything but an address
        if addresses:
            self.records[name] = list(addresses)
        else:
            self.records.pop(name, None)
        self._write({"dnsmasq-ready." + ZONE: [self.address], **self.records})
        self.proc.send_signal(signal.SIGHUP)  # dnsmasq rereads --addn-hosts
        self._wait({name: addresses})


class Network:
    """A bridge and the hosts on it; a context manager that removes everything it made."""

    def __init__(self, prefix: str = "sllm") -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r}: 1 to 5 lowercase letters or digits, starting "
                             "with a letter (interface names are 15 characters at most)")
        self.prefix = prefix
        self.sid = secrets.token_hex(3)
        self.bridge = f"{prefix}br{self.sid}"
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.root_address: str | None = None
        self.marker = REGISTRY / self.sid
        self.workdir: Path | None = None
        self._dns: Dns | None = None

    def _record(self, kind: str, name: str) -> None:
        line = f"{kind} {name}\n"
        path = self.marker / "resources"
        if line not in (path.read_text() if path.exists() else ""):
            with open(path, "a") as f:
                f.write(line)

    def __enter__(self) -> Network:
        reason = netns_available()
        if reason is not None:
            raise NetnsError(reason)
        try:
            with _registry_lock():
                clean_stale()
                self.marker.mkdir(mode=0o700)
                (self.marker / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
                used = _used_subnets()
                self.subnet = next(s for s in SUBNETS.subnets(new_prefix=24) if s not in used)
                self._record("bridge", self.bridge)
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("link", "set", self.bridge, "alias", f"sllm-netns test bridge {self.sid}")
                self.root_address = str(self.subnet[ROOT_HOST])
                _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            self.workdir = Path(tempfile.mkdtemp(prefix=f"sllm-netns-{self.sid}-"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except NetnsError:
            if exc is None:
                raise
            # The test's own failure is the one to see; what teardown left is cleaned by the
            # next run (its marker stays).
            import warnings

            warnings.warn("network teardown after a failure left things behind", stacklevel=2)

    def host(self, name: str) -> Host:
        """Make a host: a namespace on the bridge with the next address (.1, .2, ...)."""
        if self.subnet is None:
            raise NetnsError("use the Network as a context manager (`with Network() as net`)")
        if not _HOST.fullmatch(name):
            raise ValueError(f"host name {name!r}: lowercase letters, digits and '-'")
        if name in self.hosts:
            raise ValueError(f"there is a host {name!r} already")
        index = len(self.hosts) + 1
        if index >= ROOT_HOST:
            raise NetnsError(f"a Network holds {ROOT_HOST - 1} hosts at most")
        host = Host(self, name, index, str(self.subnet[index]))
        peer = f"{self.prefix}{self.sid}p{index:x}"
        self._record("netns", host.netns)
        self._record("link", host.link)
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", host.netns)
        _ip("-n", host.netns, "link", "set", peer, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("link", "set", host.link, "master", self.bridge)
        _ip("link", "set", host.link, "up")
        self.hosts[name] = host
        return host

    def dns(self) -> Dns:
        """The network's DNS server (made on first call, on a host named `dns`)."""
        if self._dns is None:
            reason = dns_available()
            if reason is not None:
                raise NetnsError(reason)
            assert self.workdir is not None
            workdir = self.workdir / "dns"
            workdir.mkdir()
            self._dns = Dns(self.host("dns"), workdir)
        return self._dns

    def close(self) -> None:
        """Remove everything this network made (what its marker lists), then the marker."""
        if self._dns is not None and self._dns.proc.poll() is None:
            self._dns.proc.kill()
            self._dns.proc.wait()
        problems = _remove(_marker_resources(self.marker), self.sid) \
            if self.marker.is_dir() else []
        if problems:
            raise NetnsError("teardown left things behind: " + "; ".join(problems))
        shutil.rmtree(self.marker, ignore_errors=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
