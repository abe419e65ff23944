"""The CUDA target. Runs only where a GPU exists (benchmarks/gpu_check.sh runs it there)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_equal

from sllm_plugin import load_state_dict, save_state_dict
from sllm_plugin.loader import LoadStats

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (CPU-only torch)"
)


def test_cuda_load_matches_cpu_load_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1000, 257, generator=g).to(torch.bfloat16)
    state = {"emb": emb, "tied": emb, "f8": torch.randn(4099, generator=g).to(torch.float8_e4m3fn),
             "scalar": torch.tensor(3), "empty": torch.empty(0, 3),
             **{f"w{i}": torch.randn(300, 300, generator=g) for i in range(8)}}
    path = save_state_dict(state, tmp_path / "ck", chunk_bytes=64 * 1024)
    stats = LoadStats()
    on_gpu = load_state_dict(path, "cuda", threads=4, chunk_bytes=128 * 1024, verify=False,
                             stats=stats)
    assert all(t.is_cuda for t in on_gpu.values())
    assert on_gpu["tied"].data_ptr() == on_gpu["emb"].data_ptr()
    assert all(t.data_ptr() % 256 == 0 for t in on_gpu.values() if t.numel())
    assert_bit_equal(load_state_dict(path), {k: v.cpu() for k, v in on_gpu.items()})
    verified = load_state_dict(path, "cuda", verify=True)
    assert_bit_equal(state, {k: v.cpu() for k, v in verified.items()})
