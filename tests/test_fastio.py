"""The compiled core: checksums agree with the xxhash package, errors carry errno/file/offset,
O_DIRECT falls back where the file system refuses it, and residency is measured."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
import xxhash
from conftest import mount_or_skip, unmount

from sllm_plugin import _fastio, load_state_dict, save_state_dict
from sllm_plugin.loader import LoadStats
from sllm_plugin.loader.bench import evict_page_cache, warm_page_cache
from sllm_plugin.loader.io_engine import FileSet


@pytest.mark.parametrize("size", [0, 1, 240, 4096, 1_000_003])
def test_xxh3_matches_the_reference_implementation(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert _fastio.xxh3_64(data.ctypes.data, size) == xxhash.xxh3_64_intdigest(data.tobytes())


def test_read_chunk_reads_and_hashes(tmp_path):
    payload = os.urandom(3 * 4096 + 17)
    (tmp_path / "f").write_bytes(payload)
    buf = np.zeros(len(payload) + 100, dtype=np.uint8)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        n, h = _fastio.read_chunk(fd, buf.ctypes.data, len(payload) + 100, 0, True)
        assert n == len(payload)  # end of file: a short count, not an error
        assert buf[:n].tobytes() == payload
        assert h == xxhash.xxh3_64_intdigest(payload)
        n, h = _fastio.read_chunk(fd, buf.ctypes.data, 10, 4096, False)
        assert (n, h) == (10, None) and buf[:10].tobytes() == payload[4096:4106]
    finally:
        os.close(fd)


def test_read_errors_carry_errno_path_and_offset(tmp_path):
    buf = np.zeros(4096, dtype=np.uint8)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: read() fails with EISDIR
    try:
        with pytest.raises(OSError) as info:
            _fastio.read_chunk(fd, buf.ctypes.data, 4096, 8192, False, "the/file")
    finally:
        os.close(fd)
    assert info.value.errno == errno.EISDIR
    assert "'the/file'" in str(info.value) and "offset 8192" in str(info.value)


@pytest.fixture
def ramfs(tmp_path):
    """ramfs refuses O_DIRECT at open() (tmpfs accepts it on recent kernels)."""
    mnt = mount_or_skip("ramfs", tmp_path / "ramfs")
    yield mnt
    unmount(mnt)


def test_direct_io_falls_back_to_buffered_where_refused(ramfs):
    state = {"w": torch.randn(5000)}
    path = save_state_dict(state, ramfs / "ck")
    with pytest.raises(OSError) as info:
        os.open(path / "data-00000.bin", os.O_RDONLY | os.O_DIRECT)
    assert info.value.errno == errno.EINVAL
    stats = LoadStats()
    loaded = load_state_dict(path, direct_io=True, verify=True, stats=stats)
    assert torch.equal(loaded["w"], state["w"])
    assert stats.direct_files == 0


def test_direct_io_is_used_where_supported(tmp_path):
    state = {"w": torch.randn(5000)}
    path = save_state_dict(state, tmp_path / "ck")
    try:
        os.close(os.open(path / "data-00000.bin", os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"{tmp_path} refuses O_DIRECT ({e}); the direct path is not testable here")
    stats = LoadStats()
    loaded = load_state_dict(path, direct_io=True, verify=True, stats=stats)
    assert torch.equal(loaded["w"], state["w"])
    assert stats.direct_files == 1


def test_auto_mode_follows_page_cache_residency(tmp_path):
    big = save_state_dict({"w": torch.randn(4 * 1024 * 1024)}, tmp_path / "ck")  # 16 MiB
    data = big / "data-00000.bin"
    warm_page_cache([data])
    fd = os.open(data, os.O_RDONLY)
    try:
        assert _fastio.resident_fraction(fd, data.stat().st_size) > 0.9
        evict_page_cache([data])
        cold = _fastio.resident_fraction(fd, data.stat().st_size)
    finally:
        os.close(fd)
    assert cold < 0.5
    with FileSet({"d": data}, direct=None) as files:
        cold_direct = files.direct_files
    warm_page_cache([data])
    with FileSet({"d": data}, direct=None) as files:
        assert files.direct_files == 0  # cached: read through the page cache
    with FileSet({"d": data}, direct=True) as files:
        supports_direct = files.direct_files
    assert cold_direct == supports_direct  # cold: O_DIRECT wherever the file system allows it


def test_host_buffers_are_huge_page_aligned():
    from sllm_plugin.loader.host_memory import HUGE_PAGE, allocate_host

    buf = allocate_host(5 * HUGE_PAGE + 123)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == 5 * HUGE_PAGE + 123
