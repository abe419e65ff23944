"""Sources of the node's tiers against hostile input: real HTTP servers on loopback that
serve traversal names, oversized and endless bodies, slow drips, cross-host redirects and
error pages holding a secret; local checkpoints holding links, FIFOs and devices; malformed
safetensors answered by a real `sllm node` with a JSON 422."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from hostile import (
    SECRET,
    HostileServer,
    drip,
    edited_index,
    endless,
    files_of,
    make_checkpoint,
    make_engine_checkpoint,
    redirect,
    serve_bytes,
)
from node_daemon import NodeDaemon

from sllm_plugin.format.reader import open_model_checkpoints
from sllm_plugin.format.spec import INDEX_FILENAME, data_file_name
from sllm_plugin.store.bandwidth import Bandwidth
from sllm_plugin.store.sources import (
    FetchLimits,
    SourceError,
    SourceTimeout,
    copy_checkpoint,
    resolve_fetch,
)
from sllm_plugin.store.tiers import Tier, TierFull

MiB = 1024 * 1024
DATA = data_file_name(0)


def new_tier(root: Path, capacity: int = 1 << 40) -> Tier:
    return Tier("ssd", root / "ssd", capacity, Bandwidth())


def fetch_into(tier: Tier, source: str, name: str = "org/m", limits: FetchLimits | None = None):
    fetch = resolve_fetch(source, limits=limits or FetchLimits())
    return tier.store(name, fetch.nbytes, fetch.write)


def assert_tier_empty(tier: Tier) -> None:
    assert tier.entries() == []
    assert [p.name for p in tier.path.iterdir() if p.name != ".sllm-node-state.json"] == []


def assert_private(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        assert stat.S_IMODE(os.lstat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            mode = os.lstat(Path(dirpath) / name).st_mode
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600, (dirpath, name)


# -- URL sources: names --------------------------------------------------------------------------


@pytest.mark.parametrize("bad_name", ["../../escape.bin", "ABS/escape.bin", "sub/escape.bin",
                                      ".escape.bin"])
def test_a_url_index_naming_files_outside_the_checkpoint_writes_nothing(tmp_path, bad_name):
    good = make_checkpoint(tmp_path / "remote")
    outside = tmp_path / "outside"
    outside.mkdir()
    bad_name = bad_name.replace("ABS", str(outside))

    def edit(raw):
        raw["files"][0]["name"] = bad_name
        for t in raw["tensors"]:
            t["file"] = bad_name

    data = (good / DATA).read_bytes()
    tier = new_tier(tmp_path)
    with HostileServer() as server:
        server.routes["/m/" + INDEX_FILENAME] = serve_bytes(edited_index(good, edit))
        server.fallback = serve_bytes(data)  # whatever path the name turns into
        with pytest.raises(SourceError, match="sllm index that fails validation"):
            fetch_into(tier, f"{server.url}/m")
        assert [p for p in server.requests if p.endswith("escape.bin")] == []
    assert sorted(p.name for p in tmp_path.rglob("*escape.bin")) == []
    assert list(outside.iterdir()) == []
    assert_tier_empty(tier)


def test_an_engine_checkpoint_over_http_is_fetched_whole_and_validated_per_rank(tmp_path):
    engine = make_engine_checkpoint(tmp_path / "remote", ranks=2)
    tier = new_tier(tmp_path)
    with HostileServer() as server:
        server.serve_directory(engine, "/e")
        entry = fetch_into(tier, f"{server.url}/e", "org/engine")
        copy = tier.path_of("org/engine")
        assert files_of(copy) == files_of(engine)
        assert len(open_model_checkpoints(copy)) == 2
        assert entry.bytes == sum(len(b) for b in files_of(engine).values())
        assert_private(copy)

        # The URL of one rank (its index says layout 'engine'): refused, saying what to use.
        with pytest.raises(SourceError, match="one rank of an engine checkpoint"):
            resolve_fetch(f"{server.url}/e/rank-00000")

        # Rank 1's index names a file outside: refused before anything is downloaded.
        def edit(raw):
            raw["files"][0]["name"] = "../../../escape.bin"

        server.routes["/e/rank-00001/" + INDEX_FILENAME] = serve_bytes(
            edited_index(engine / "rank-00001", edit))
        with pytest.raises(SourceError, match="rank-00001/sllm-index.json .*fails validation"):
            resolve_fetch(f"{server.url}/e")

        # A rank claiming to be another rank, or a checkpoint with a rank missing.
        server.routes["/e/rank-00001/" + INDEX_FILENAME] = serve_bytes(
            (engine / "rank-00000" / INDEX_FILENAME).read_bytes())
        with pytest.raises(SourceError, match="not the index of rank 1"):
            resolve_fetch(f"{server.url}/e")
        del server.routes["/e/rank-00001/" + INDEX_FILENAME]
        with pytest.raises(SourceError, match="HTTP 404; the engine checkpoint has 2 ranks"):
            resolve_fetch(f"{server.url}/e")
    assert tier.entries()[0].name == "org/engine"


# -- URL sources: sizes and time ---------------------------------------------------------------


def test_an_endless_or_oversized_index_is_cut_off_at_its_cap(tmp_path):
    cap = FetchLimits().index_bytes
    with HostileServer() as server:
        server.routes["/a/" + INDEX_FILENAME] = endless(server, b'{"format": "sllm", "x": "')
        with pytest.raises(SourceError, match=f"more than {cap} bytes sent; stopped"):
            resolve_fetch(f"{server.url}/a")
        # What the server managed to push: the cap, plus what socket buffers took.
        assert server.sent["/a/" + INDEX_FILENAME] < cap + 32 * MiB

        server.routes["/b/" + INDEX_FILENAME] = lambda h: _announce(h, 10**12)
        with pytest.raises(SourceError, match=f"1000000000000 bytes announced, more than the "
                                              f"{cap} allowed"):
            resolve_fetch(f"{server.url}/b")


def _announce(h, length: int) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(length))
    h.end_headers()
    h.close_connection = True


def test_a_data_file_is_cut_off_at_the_size_its_index_lists(tmp_path):
    good = make_checkpoint(tmp_path / "remote")
    listed = (good / DATA).stat().st_size
    tier = new_tier(tmp_path)
    with HostileServer() as server:
        server.serve_directory(good, "/m")
        server.routes[f"/m/{DATA}"] = endless(server, (good / DATA).read_bytes())
        with pytest.raises(SourceError, match=f"more than {listed} bytes sent \\(the size its "
                                              "index lists\\); stopped"):
            fetch_into(tier, f"{server.url}/m")
        assert server.sent[f"/m/{DATA}"] < listed + 32 * MiB
        assert_tier_empty(tier)

        server.routes[f"/m/{DATA}"] = serve_bytes((good / DATA).read_bytes()[:-4096])
        with pytest.raises(SourceError, match=f"{listed - 4096} bytes received, the index "
                                              f"lists {listed}"):
            fetch_into(tier, f"{server.url}/m")
        assert_tier_empty(tier)


def test_side_files_are_capped_and_count_against_the_tier_capacity(tmp_path):
    good = make_checkpoint(tmp_path / "remote")
    cap = FetchLimits().side_file_bytes
    with HostileServer() as server:
        server.serve_directory(good, "/m")
        server.routes["/m/tokenizer.json"] = endless(server, b'{"x": "')
        tier = new_tier(tmp_path)
        with pytest.raises(SourceError, match=f"tokenizer.json: more than {cap} bytes sent"):
            fetch_into(tier, f"{server.url}/m")
        assert server.sent["/m/tokenizer.json"] < cap + 32 * MiB
        assert_tier_empty(tier)

        # A side file under its cap but larger than the fetch announced (it cannot know side
        # files' sizes up front): counted when it has arrived, and refused if it does not fit.
        big = json.dumps({"pad": "x" * (3 * MiB)}).encode()
        server.routes["/m/tokenizer.json"] = serve_bytes(big)
        fetch = resolve_fetch(f"{server.url}/m")
        small = Tier("dram", tmp_path / "small", fetch.nbytes + MiB, Bandwidth())
        with pytest.raises(TierFull, match="more than the .* its source announced"):
            small.store("org/m", fetch.nbytes, fetch.write)
        assert_tier_empty(small)
        assert small.used() == 0
        entry = fetch_into(tier, f"{server.url}/m")
        assert entry.bytes == sum(map(len, files_of(tier.path_of("org/m")).values()))
        assert entry.bytes > fetch.nbytes and tier.used() == entry.bytes


def test_a_slow_drip_is_stopped_by_the_whole_fetch_deadline(tmp_path):
    good = make_checkpoint(tmp_path / "remote")
    listed = (good / DATA).stat().st_size
    tier = new_tier(tmp_path)
    stop = threading.Event()
    limits = FetchLimits(deadline_s=1.5, index_deadline_s=1.5, read_timeout_s=10)
    try:
        with HostileServer() as server:
            server.serve_directory(good, "/m")
            server.routes[f"/m/{DATA}"] = drip(server, listed, stop=stop)
            started = time.monotonic()
            with pytest.raises(SourceTimeout, match="the download not finished within 1.5 s"):
                fetch_into(tier, f"{server.url}/m", limits=limits)
            # Every read returned within the read timeout: only the deadline could stop it.
            assert time.monotonic() - started < 10
            assert 0 < server.sent[f"/m/{DATA}"] < listed
            assert_tier_empty(tier)

            server.routes[f"/d/{INDEX_FILENAME}"] = drip(server, 10**6, stop=stop)
            with pytest.raises(SourceTimeout, match="fetching the index not finished"):
                resolve_fetch(f"{server.url}/d", limits=limits)
    finally:
        stop.set()


# -- URL sources: redirects and error pages --------------------------------------------------------


def test_redirects_stay_on_the_source_host_and_port(tmp_path):
    good = make_checkpoint(tmp_path / "remote")
    tier = new_tier(tmp_path)
    with HostileServer() as a, HostileServer("127.0.0.2") as b, HostileServer() as c:
        for other in (b, c):  # another host; the same host on another port
            other.serve_directory(good, "/m")
        a.serve_directory(good, "/real")
        for relative in files_of(good):  # within the origin: followed
            a.routes[f"/alias/{relative}"] = redirect(f"/real/{relative}")
        entry = fetch_into(tier, f"{a.url}/alias", "org/alias")
        assert files_of(tier.path_of("org/alias")) == files_of(good)
        assert entry.bytes > 0

        for other in (b, c):
            a.routes[f"/x/{INDEX_FILENAME}"] = redirect(f"{other.url}/m/{INDEX_FILENAME}")
            with pytest.raises(SourceError, match="redirected to another scheme, host or port"):
                resolve_fetch(f"{a.url}/x")
            # The index is fine, a data file is sent elsewhere.
            a.routes[f"/x/{INDEX_FILENAME}"] = serve_bytes((good / INDEX_FILENAME).read_bytes())
            a.routes[f"/x/{DATA}"] = redirect(f"{other.url}/m/{DATA}", 307)
            with pytest.raises(SourceError, match="redirected to another scheme, host or port"):
                fetch_into(tier, f"{a.url}/x", "org/x")
            assert other.requests == {}, other.requests
        # A redirect loop ends.
        a.routes[f"/loop/{INDEX_FILENAME}"] = redirect(f"/loop/{INDEX_FILENAME}")
        with pytest.raises(SourceError, match="more than 5 redirects"):
            resolve_fetch(f"{a.url}/loop")
    assert [e.name for e in tier.entries()] == ["org/alias"]


def _secret_pages(server: HostileServer, good: Path) -> dict[str, str]:
    """Sources whose answers hold SECRET, and what each one's error must say instead."""
    html = f"<html><body>internal page {SECRET}</body></html>".encode()
    server.routes[f"/html/{INDEX_FILENAME}"] = serve_bytes(html, 200, "text/html")
    server.routes[f"/error/{INDEX_FILENAME}"] = serve_bytes(html, 500, "text/html")
    server.routes[f"/json/{INDEX_FILENAME}"] = serve_bytes(
        json.dumps({"format": "nope", "token": SECRET}).encode(), 200, "application/json")
    server.routes[f"/claims/{INDEX_FILENAME}"] = serve_bytes(
        json.dumps({"format": "sllm", "version": 1, "layout": SECRET}).encode())
    server.routes[f"/sneaky/{INDEX_FILENAME}"] = serve_bytes(
        json.dumps({"format": "sllm", "version": 1, "layout": "hf", "alignment": 4096,
                    "checksum": {"chunk_bytes": 4096}, "files": [],
                    "tensors": [{"name": SECRET}]}).encode())
    server.serve_directory(good, "/denied")
    server.routes[f"/denied/{DATA}"] = serve_bytes(html, 403, f"text/html; x={SECRET}")
    server.routes[f"/away/{INDEX_FILENAME}"] = redirect(f"http://127.0.0.2:9/{SECRET}")
    return {
        "html": "is not JSON", "error": "HTTP 500 (text/html, ",
        "json": "is JSON, but not an sllm index",
        "claims": "is an sllm index that fails validation",
        "sneaky": "is an sllm index that fails validation",
        "denied": "HTTP 403 (text/html, ", "away": "redirected to another scheme, host or port",
    }


def test_errors_never_quote_what_the_source_sent(tmp_path):
    good = make_checkpoint(tmp_path / "remote")
    tier = new_tier(tmp_path)
    with HostileServer() as server:
        for path, expected in _secret_pages(server, good).items():
            with pytest.raises(SourceError) as caught:
                fetch_into(tier, f"{server.url}/{path}")
            assert expected in str(caught.value), (path, str(caught.value))
            assert SECRET not in str(caught.value), (path, str(caught.value))
    assert_tier_empty(tier)


def test_the_node_answers_bad_sources_with_a_json_422_that_quotes_nothing(tmp_path):
    """Through a real `sllm node`: URL sources serving secrets, and malformed safetensors
    sources (a FormatError and a header whose offsets are strings), all a JSON 422."""
    good = make_checkpoint(tmp_path / "remote")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text("{}")
    (truncated / "model.safetensors").write_bytes(b"\x10\x00")
    strings = tmp_path / "strings"
    strings.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}})
    (strings / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header.encode() + bytes(4))
    stop = threading.Event()
    with HostileServer() as server:
        expected = _secret_pages(server, good)
        server.routes[f"/drip/{INDEX_FILENAME}"] = drip(server, 10**6, stop=stop)
        config = {"dram": None, "ssd": {"path": str(tmp_path / "ssd"), "capacity": 1 << 30},
                  "calibration_bytes": 16 * MiB, "fetch": {"index_deadline_s": 1.5}}
        with NodeDaemon(tmp_path, config) as node:
            # The configured deadline reaches the fetch: a dripping index ends in a 504.
            node.ok("POST", "/models", {"name": "bad/drip", "source": f"{server.url}/drip"})
            r = node.call("POST", "/prefetch", {"model": "bad/drip", "wait": True,
                                                "timeout_s": 60})
            stop.set()
            assert r.status_code == 504, r.text
            assert "fetching the index not finished within 1.5 s" in r.json()["error"]["message"]
            # Credentials in a URL source are refused at once and never quoted back.
            r = node.call("POST", "/models", {"name": "bad/creds",
                                              "source": f"http://user:{SECRET}@{server.url[7:]}/m"})
            assert r.status_code == 400 and "may not carry credentials" in r.text, r.text
            assert SECRET not in r.text
            sources = {f"bad/{p}": f"{server.url}/{p}" for p in expected}
            sources |= {"bad/truncated": str(truncated), "bad/strings": str(strings)}
            expected |= {"truncated": "too short to be a safetensors file",
                         "strings": "not a valid safetensors model"}
            for name, source in sources.items():
                node.ok("POST", "/models", {"name": name, "source": source})
                r = node.call("POST", "/prefetch", {"model": name, "wait": True})
                assert r.status_code == 422, (name, r.status_code, r.text)
                assert r.headers["content-type"] == "application/json"
                assert expected[name.split("/")[1]] in r.json()["error"]["message"], r.text
                assert SECRET not in r.text
            status = node.client.get("/status").text
            assert SECRET not in status
            assert node.held("ssd") == []
            assert node.client.get("/health").status_code == 200


# -- local sources ------------------------------------------------------------------------------


def test_a_local_checkpoint_holding_links_fifos_or_devices_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    tier = new_tier(tmp_path)
    kinds = {"notes.txt": ("a symbolic link", lambda p: p.symlink_to(secret)),
             "notes.fifo": ("a FIFO", os.mkfifo)}
    if os.geteuid() == 0:  # /dev/null's numbers: reading it would end at once, not hang
        kinds["null"] = ("a device file",
                         lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    for i, (name, (kind, make)) in enumerate(kinds.items()):
        source = make_checkpoint(tmp_path / f"src{i}", i)
        sub = source / "extra"
        sub.mkdir()
        make(sub / name)
        with pytest.raises(SourceError, match=f"extra/{name} is {kind}"):
            resolve_fetch(str(source))
        with pytest.raises(SourceError, match=f"extra/{name} is {kind}"):
            tier.store(f"org/m{i}", 1, lambda dst, s=source: copy_checkpoint(s, dst))
        assert_tier_empty(tier)


def test_checkpoints_copied_and_converted_into_a_tier_are_private(tmp_path):
    from sllm_plugin.testing import make_random_model

    tier = new_tier(tmp_path)
    source = make_checkpoint(tmp_path / "src")
    fetch_into(tier, str(source), "org/copied")
    assert files_of(tier.path_of("org/copied")) == files_of(source)
    assert_private(tier.path_of("org/copied"))

    model = make_random_model(tmp_path / "hf", "tiny-llama")
    fetch_into(tier, str(model), "org/converted")
    assert_private(tier.path_of("org/converted"))
    open_model_checkpoints(tier.path_of("org/converted"))


def test_a_fifo_among_the_weights_is_refused_without_opening_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    fifo = model / "model.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def resolve():
        try:
            resolve_fetch(str(model))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # stuck opening the FIFO: let it go, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(60)
        pytest.fail("resolving the source opened the FIFO and hung")
    assert isinstance(outcome[0], SourceError), outcome
    assert re.search(r"model\.safetensors: (weight file is )?not a regular file", str(outcome[0]))
