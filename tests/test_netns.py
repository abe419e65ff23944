"""The network-namespace fixture library (tests/netns.py) itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import pytest
from netns import REGISTRY, Network, require_netns

TESTS = Path(__file__).parent


def netns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def serve_http(host, directory: Path, port: int = 8000) -> subprocess.Popen:
    """Python's http.server inside `host`, ready (it answers from the test) when returned."""
    server = host.popen([sys.executable, "-m", "http.server", "--bind", host.address,
                         "--directory", str(directory), str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with httpx.Client(trust_env=False, timeout=5) as client:
        for _ in range(200):
            try:
                client.get(f"http://{host.address}:{port}/")
                return server
            except httpx.ConnectError:
                if server.poll() is not None:
                    raise AssertionError(f"http.server exited with {server.returncode}") \
                        from None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(0.05)  # polling interval while it starts
    raise AssertionError("http.server never answered")


def test_hosts_talk_across_the_bridge_and_teardown_removes_everything(tmp_path):
    require_netns()
    with Network() as net:
        a, b = net.host("a"), net.host("b")
        assert a.address != b.address and net.subnet is not None
        assert {a.address, b.address} <= {str(x) for x in net.subnet.hosts()}
        server = serve_http(a, tmp_path)
        try:
            status, body = b.http("GET", f"http://{a.address}:8000/")  # from inside b
            assert status == 200 and b"Directory listing" in body
            # Each host has its own loopback: a's server is not on b's 127.0.0.1.
            with pytest.raises(ConnectionError, match="ConnectError"):
                b.http("GET", "http://127.0.0.1:8000/", timeout=5)
            a.link_down()  # a partition: b's connect fails
            with pytest.raises(ConnectionError):
                b.http("GET", f"http://{a.address}:8000/", timeout=2)
            a.link_up()
            assert b.http("GET", f"http://{a.address}:8000/")[0] == 200
        finally:
            server.kill()
            server.wait()
        made = [h.netns for h in net.hosts.values()]
        assert all(name in netns_names() for name in made)
        assert net.bridge in links()
    assert not any(name in netns_names() for name in made)
    assert net.bridge not in links() and net.sid not in links()
    assert not (REGISTRY / net.sid).exists()


def test_dns_answers_the_records_set_and_a_host_resolves_through_it(tmp_path):
    require_netns(dns=True)
    with Network() as net:
        a, b = net.host("a"), net.host("b")
        dns = net.dns()
        b.use_dns(dns)
        dns.set_records("web.sllm.test", [a.address])
        server = serve_http(a, tmp_path)
        try:
            assert b.http("GET", "http://web.sllm.test:8000/")[0] == 200
            dns.set_records("web.sllm.test", [a.address, b.address, "2001:db8::1"])
            assert dns.answer("web.sllm.test") == {a.address, b.address, "2001:db8::1"}
            dns.set_records("web.sllm.test", [])
            assert dns.answer("web.sllm.test") == set()
            with pytest.raises(ConnectionError):
                b.http("GET", "http://web.sllm.test:8000/", timeout=5)
        finally:
            server.kill()
            server.wait()
        etc = Path("/etc/netns") / b.netns
        assert (etc / "resolv.conf").read_text().startswith(f"nameserver {dns.address}\n")
    assert not etc.exists()
    with pytest.raises(ValueError, match="not in the test zone"):
        dns.set_records("web.example.com", [])


def test_a_killed_run_is_cleaned_up_by_the_next_and_a_live_one_is_not():
    require_netns()
    script = textwrap.dedent("""
        import sys, netns
        net = netns.Network().__enter__()
        net.host("left")
        print(net.sid, net.bridge, net.hosts["left"].netns, flush=True)
        sys.stdin.read()  # until killed
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(TESTS)})
    sid, bridge, left = child.stdout.readline().split()
    with Network() as live:  # the child is alive: its network stays
        live.host("x")
        assert left in netns_names() and (REGISTRY / sid).is_dir()
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()
        with Network() as later:  # the child is dead: cleaned; `live` is not touched
            assert left not in netns_names() and bridge not in links()
            assert not (REGISTRY / sid).exists()
            assert live.hosts["x"].netns in netns_names() and later.subnet != live.subnet


def test_without_root_it_skips_or_fails_when_required():
    """As an unprivileged user: skipped with the reason, or failed under SLLM_REQUIRE_NETNS=1."""
    require_netns()  # setpriv needs root
    work = Path(tempfile.mkdtemp())
    try:
        work.chmod(0o755)
        (work / "test_x.py").write_text("from netns import require_netns\n\n\n"
                                        "def test_x():\n    require_netns()\n")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(work / "test_x.py")]
        env = {k: v for k, v in os.environ.items() if k != "SLLM_REQUIRE_NETNS"}
        env["PYTHONPATH"] = str(TESTS)
        skipped = subprocess.run(argv, capture_output=True, text=True, cwd=work, env=env)
        assert "1 skipped" in skipped.stdout, skipped.stdout + skipped.stderr
        assert "network namespaces need root" in skipped.stdout
        failed = subprocess.run(argv, capture_output=True, text=True, cwd=work,
                                env={**env, "SLLM_REQUIRE_NETNS": "1"})
        assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout
        assert "SLLM_REQUIRE_NETNS=1 but network namespaces need root" in failed.stdout
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)
