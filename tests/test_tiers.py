"""Tiers against hostile neighbours and hostile contents: a tier directory someone else
created (the default DRAM tier is in world-writable /dev/shm) is refused, never adopted; the
state file and calibration file are never written through a planted link; and a real `sllm node`
starts over a tier seeded with every kind of bad entry, notes each, and serves the good ones."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

import pytest
from hostile import SECRET, files_of, make_checkpoint, make_engine_checkpoint
from node_daemon import NodeDaemon

from sllm_plugin.format.spec import INDEX_FILENAME, data_file_name
from sllm_plugin.store.bandwidth import Bandwidth, calibrate_read
from sllm_plugin.store.tiers import STATE_FILE, Tier, UnsafeTier

MiB = 1024 * 1024
OTHER_UID = 65534  # nobody


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_tier_directory_is_created_private_and_an_old_readable_one_tightened(tmp_path):
    Tier("ssd", tmp_path / "a" / "ssd", MiB, Bandwidth())
    assert mode_of(tmp_path / "a" / "ssd") == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)  # as earlier versions left it: ours, readable by all
    Tier("ssd", old, MiB, Bandwidth())
    assert mode_of(old) == 0o700


def _foreign(path: Path) -> str:
    path.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    os.chown(path, OTHER_UID, OTHER_UID)
    return f"belongs to uid {OTHER_UID}, not to this user"


def _world_writable(path: Path) -> str:
    path.mkdir()
    os.chmod(path, 0o1777)  # /dev/shm's own mode: anyone may create names in it
    return "is writable by group or others (mode 1777)"


def _link(path: Path) -> str:
    target = path.parent / "real"
    target.mkdir(mode=0o700)
    path.symlink_to(target)
    return "is a symbolic link"


def _file(path: Path) -> str:
    path.write_text("x")
    return "exists and is not a directory"


def _open_parent(path: Path) -> str:
    os.chmod(path.parent, 0o777)  # anyone could rename ours away and put theirs in its place
    return "writable by everyone without the sticky bit"


@pytest.mark.parametrize("make", [_foreign, _world_writable, _link, _file, _open_parent])
def test_a_tier_directory_that_is_not_safely_ours_is_refused(tmp_path, make):
    path = tmp_path / "parent" / "tier" if make is _open_parent else tmp_path / "tier"
    path.parent.mkdir(exist_ok=True)
    reason = make(path)
    with pytest.raises(UnsafeTier) as caught:
        Tier("dram", path, MiB, Bandwidth())
    assert f"the dram tier {path}" in str(caught.value) and reason in str(caught.value)


def test_sllm_node_will_not_start_on_a_dram_tier_someone_else_created_in_dev_shm(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    planted = shm / f"sllm-test-{uuid.uuid4().hex[:8]}"
    try:
        make_checkpoint(planted / "org--m0", seed=9)  # a planted checkpoint, under a model name
        os.chmod(planted, 0o1777)
        reason = "is writable by group or others"
        if os.geteuid() == 0:
            os.chown(planted, OTHER_UID, OTHER_UID)
            reason = f"belongs to uid {OTHER_UID}"
        config = {"dram": {"path": str(planted), "capacity": 64 * MiB},
                  "ssd": {"path": str(tmp_path / "ssd"), "capacity": 64 * MiB},
                  "calibration_bytes": 16 * MiB}
        node = NodeDaemon(tmp_path, config)
        try:
            with pytest.raises(RuntimeError, match="node exited with 2"):
                node.start(timeout=120)
        finally:
            node.stop()
        log = node.log_path.read_text()
        assert f"sllm node: error: the dram tier {planted} {reason}" in log, log[-3000:]
        assert "Traceback" not in log
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_the_state_file_is_written_privately_never_through_a_planted_link(tmp_path):
    tier = Tier("ssd", tmp_path / "ssd", 64 * MiB, Bandwidth())
    make_checkpoint(tier.path / "org--m")
    assert tier.rediscover() == []
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # The temporary name the state used to be written to: predictable, and followed.
    (tier.path / f"{STATE_FILE}.{os.getpid()}.tmp").symlink_to(victim)
    tier.pin("org/m", True)
    assert victim.read_text() == "precious"
    state = tier.path / STATE_FILE
    assert stat.S_ISREG(os.lstat(state).st_mode) and mode_of(state) == 0o600
    again = Tier("ssd", tier.path, 64 * MiB, Bandwidth())
    again.rediscover()
    assert [(e.name, e.pinned) for e in again.entries()] == [("org/m", True)]


def test_calibration_never_writes_through_a_planted_link(tmp_path):
    directory = tmp_path / "tier"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = directory / f".sllm-calibrate-{os.getpid()}-{threading.get_ident()}"
    planted.symlink_to(victim)
    assert calibrate_read(directory, 16 * MiB, direct=False) > 0
    assert victim.read_text() == "precious"
    assert [p.name for p in directory.iterdir()] == [planted.name]


def test_a_state_file_that_is_a_directory_or_garbage_never_stops_the_tier(tmp_path):
    tier_path = tmp_path / "ssd"
    tier = Tier("ssd", tier_path, 64 * MiB, Bandwidth())
    make_checkpoint(tier_path / "org--m")
    (tier_path / STATE_FILE).mkdir()
    notes = tier.rediscover()
    assert any("state file" in n for n in notes), notes
    assert [e.name for e in tier.entries()] == ["org/m"]
    assert stat.S_ISREG(os.lstat(tier_path / STATE_FILE).st_mode)
    for garbage in (b"[1, 2]", b'{"org/m": []}', b'{"org/m": {"last_used": "soon"}}',
                    b"\xff\xfe", b"[" * 100_000):
        (tier_path / STATE_FILE).write_bytes(garbage)
        tier = Tier("ssd", tier_path, 64 * MiB, Bandwidth())
        notes = tier.rediscover()
        assert any("state file" in n and "malformed" in n for n in notes), (garbage, notes)
        assert [e.name for e in tier.entries()] == ["org/m"]


def _seed_hostile_tier(tmp_path: Path, ssd: Path) -> dict[str, str]:
    """A tier with two good checkpoints among every kind of bad entry; returns, for each bad
    entry, what its start-up note must say."""
    ssd.mkdir(mode=0o700)
    make_checkpoint(ssd / "org--good", seed=1)
    make_engine_checkpoint(ssd / "org--engine", ranks=2, seed=3)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    outside = make_checkpoint(tmp_path / "outside", seed=5)
    expect = {}

    def broken_index(name: str, index: bytes, note: str) -> None:
        make_checkpoint(ssd / name, seed=7)
        (ssd / name / INDEX_FILENAME).write_bytes(index)
        expect[name] = note

    broken_index("org--notjson", b"not json {", "removed org--notjson")
    broken_index("org--deep", b"[" * 100_000 + b"]" * 100_000, "removed org--deep")
    broken_index("org--bigint", b'{"format": "sllm", "version": ' + b"1" * 5000 + b"}",
                 "removed org--bigint")
    good_index = json.loads((ssd / "org--good" / INDEX_FILENAME).read_text())
    good_index["files"][0]["name"] = "../org--good/" + data_file_name(0)
    broken_index("org--traversal", json.dumps(good_index).encode(), "removed org--traversal")

    (ssd / "org--link").symlink_to(outside)  # a whole planted checkpoint, through a link
    expect["org--link"] = "removed org--link: a symbolic link"
    make_checkpoint(ssd / "org--sidelink", seed=11)
    (ssd / "org--sidelink" / "config.json").unlink()
    (ssd / "org--sidelink" / "config.json").symlink_to(secret)
    expect["org--sidelink"] = "config.json, a symbolic link"
    make_checkpoint(ssd / "org--fifo", seed=13)
    os.mkfifo(ssd / "org--fifo" / "notes")
    expect["org--fifo"] = "notes, a FIFO"
    (ssd / "org--file").write_text("a file where a checkpoint directory belongs")
    expect["org--file"] = "removed org--file: not a directory"
    (ssd / "org--indexdir" / INDEX_FILENAME).mkdir(parents=True)
    expect["org--indexdir"] = "removed org--indexdir"
    (ssd / "org--locked").mkdir()
    (ssd / "org--locked" / "x").write_text("x")
    os.chmod(ssd / "org--locked", 0)
    expect["org--locked"] = "removed org--locked"
    # Hidden entries with our tags: one naming no model (recovering it would reach outside
    # the tier), and an evicted copy left by a daemon that died mid-eviction.
    (ssd / "..sllm-tmp-999999-deadbeef").mkdir()
    expect["..sllm-tmp-999999-deadbeef"] = "removed ..sllm-tmp-999999-deadbeef"
    make_checkpoint(ssd / ".org--ghost.sllm-evicted-999999-deadbeef", seed=17)
    (ssd / STATE_FILE).write_text(json.dumps({"org/good": [], "org/engine": "x"}))
    expect[STATE_FILE] = "state file .sllm-node-state.json is malformed"
    # Not ours: left alone, noted.
    (ssd / "admin notes.txt").write_text("the admin's")
    (ssd / "lost+found").mkdir()
    expect["admin notes.txt"] = "admin notes.txt is not a checkpoint of this node"
    expect["lost+found"] = "lost+found is not a checkpoint of this node"
    return expect


def test_sllm_node_starts_over_a_hostile_tier_notes_every_bad_entry_and_serves_the_good(
        tmp_path):
    ssd = tmp_path / "ssd"
    expect = _seed_hostile_tier(tmp_path, ssd)
    # What a wrong recovery of "..sllm-tmp-..." would remove: a dead writer's staging
    # directory of the tier directory itself, beside the tier.
    beside = tmp_path / ".ssd.sllm-tmp-999999-deadbeef"
    beside.mkdir()
    good = {name: files_of(ssd / name) for name in ("org--good", "org--engine")}
    outside = files_of(tmp_path / "outside")
    config = {"dram": None, "ssd": {"path": str(ssd), "capacity": 64 * MiB},
              "calibration_bytes": 16 * MiB}
    with NodeDaemon(tmp_path, config) as node:
        status = node.status()
        notes = status["notes"]
        for what in expect.values():
            assert any(what in n for n in notes), (what, notes)
        assert sorted(node.held("ssd")) == ["org/engine", "org/good"]
        for model in ("org/good", "org/engine"):
            assert node.ok("POST", "/prefetch", {"model": model}) == {"state": "present"}
        assert sorted(p.name for p in ssd.iterdir()) == [
            STATE_FILE, "admin notes.txt", "lost+found", "org--engine", "org--good"]
        for name, files in good.items():
            assert files_of(ssd / name) == files
        assert SECRET not in json.dumps(status)
    assert files_of(tmp_path / "outside") == outside  # the link went, not what it pointed to
    assert (tmp_path / "secret.txt").read_text() == SECRET
    assert beside.is_dir()


def test_a_huge_page_tmpfs_the_node_mounts_is_private(tmp_path):
    from conftest import mount_or_skip, unmount

    from sllm_plugin.store.hugetmpfs import ensure_huge_tmpfs

    unmount(mount_or_skip("tmpfs", tmp_path / "probe"))  # skips where mounting is not allowed
    dram = tmp_path / "dram"
    try:
        assert ensure_huge_tmpfs(dram, 64 * MiB)
        st = os.lstat(dram)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        Tier("dram", dram, 64 * MiB, Bandwidth())  # adopted: it is ours and private
    finally:
        unmount(dram)
