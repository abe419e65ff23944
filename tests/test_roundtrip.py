"""save_state_dict -> load_state_dict round trips, compared bit for bit with the source."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_bit_equal, tensor_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_plugin import iter_state_dict, load_state_dict, save_state_dict
from sllm_plugin.format.spec import DTYPE_ITEMSIZE
from sllm_plugin.loader import LoadStats

TORCH_DTYPES = [name for name in DTYPE_ITEMSIZE if isinstance(getattr(torch, name, None),
                                                               torch.dtype)]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4), (4097,), (3, 1500)]


def random_tensor(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of any dtype (NaNs included: comparisons are on bytes)."""
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * DTYPE_ITEMSIZE[dtype_name],), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def test_torch_has_every_format_dtype_we_claim():
    # The format lists torch's model dtypes; this torch must have all but possibly the newest.
    missing = set(DTYPE_ITEMSIZE) - set(TORCH_DTYPES)
    assert missing <= {"float4_e2m1fn_x2", "float8_e8m0fnu"}, missing


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_every_dtype_and_shape_round_trips(tmp_path, dtype):
    state = {f"t{i}": random_tensor(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)
             if not (dtype == "float4_e2m1fn_x2" and shape == (3, 1500))}
    path = save_state_dict(state, tmp_path / "ck", chunk_bytes=8192)
    assert_bit_equal(state, load_state_dict(path))
    assert_bit_equal(state, load_state_dict(path, verify=True, threads=1))


def test_layout_on_disk_is_aligned_and_padded(tmp_path):
    state = {"a": random_tensor("float16", (3,)), "b": random_tensor("int8", (5000,)),
             "c": random_tensor("float32", (2, 2))}
    path = save_state_dict(state, tmp_path / "ck")
    index = json.loads((path / "sllm-index.json").read_text())
    data = (path / "data-00000.bin").read_bytes()
    assert len(data) % 4096 == 0 and index["files"][0]["bytes"] == len(data)
    for entry in index["tensors"]:
        assert entry["offset"] % 4096 == 0
        raw = data[entry["offset"] : entry["offset"] + entry["bytes"]]
        assert raw == tensor_bytes(state[entry["name"]]).numpy().tobytes()
    # The padding between tensors is zeros.
    a_end = index["tensors"][0]["bytes"]
    assert data[a_end:4096] == bytes(4096 - a_end)


def test_tied_weights_are_stored_once_and_load_shared(tmp_path):
    emb = random_tensor("bfloat16", (64, 32))
    state = {"embed.weight": emb, "lm_head.weight": emb, "other": random_tensor("float32", (4,))}
    path = save_state_dict(state, tmp_path / "ck")
    index = json.loads((path / "sllm-index.json").read_text())
    assert [t["name"] for t in index["tensors"]] == ["embed.weight", "other"]
    assert index["aliases"] == {"lm_head.weight": "embed.weight"}
    loaded = load_state_dict(path)
    assert_bit_equal(state, loaded)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_views_and_non_contiguous_tensors_are_saved_by_value(tmp_path):
    base = torch.randn(8, 6)
    state = {
        "base": base,
        "transposed": base.t(),
        "row_slice": base[2:5],
        "strided": base[:, ::2],
        "expanded": torch.randn(1, 4, dtype=torch.float16).expand(3, 4),
    }
    path = save_state_dict(state, tmp_path / "ck")
    index = json.loads((path / "sllm-index.json").read_text())
    assert index["aliases"] == {}
    loaded = load_state_dict(path)
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name
        assert loaded[name].is_contiguous()


def test_partitions_split_files_and_never_split_a_tensor(tmp_path):
    state = {f"w{i}": random_tensor("float32", (3000,), seed=i) for i in range(5)}
    path = save_state_dict(state, tmp_path / "ck", partition_bytes=3 * 4096 * 2)
    index = json.loads((path / "sllm-index.json").read_text())
    assert len(index["files"]) >= 2
    for t in index["tensors"]:
        size = next(f["bytes"] for f in index["files"] if f["name"] == t["file"])
        assert t["offset"] + t["bytes"] <= size
    assert_bit_equal(state, load_state_dict(path, verify=True))


@pytest.mark.parametrize("direct_io", [None, True, False])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_io_modes_and_threads_give_identical_bytes(tmp_path, direct_io, threads):
    state = {f"w{i}": random_tensor("bfloat16", (257, 129), seed=i) for i in range(6)}
    path = save_state_dict(state, tmp_path / "ck", chunk_bytes=4096 * 3)
    stats = LoadStats()
    loaded = load_state_dict(path, threads=threads, direct_io=direct_io, chunk_bytes=8192,
                             stats=stats)
    assert_bit_equal(state, loaded)
    assert stats.bytes == json.loads((path / "sllm-index.json").read_text())["files"][0]["bytes"]
    if direct_io is False:
        assert stats.direct_files == 0


def test_metadata_and_source_are_recorded(tmp_path):
    path = save_state_dict({"x": torch.ones(2)}, tmp_path / "ck", metadata={"purpose": "test"})
    index = json.loads((path / "sllm-index.json").read_text())
    assert index["metadata"] == {"purpose": "test"}
    assert index["source"]["converter"].startswith("sllm_plugin ")
    assert index["version"] == 1 and index["format"] == "sllm" and index["layout"] == "hf"


def test_iter_state_dict_streams_every_tensor_once(tmp_path):
    emb = random_tensor("float16", (300, 40))
    state = {"a": emb, "tied": emb, **{f"w{i}": random_tensor("float32", (1000,), seed=i)
                                       for i in range(10)}}
    path = save_state_dict(state, tmp_path / "ck", chunk_bytes=4096)
    names = []
    for name, tensor in iter_state_dict(path, threads=4, chunk_bytes=4096):
        names.append(name)
        assert torch.equal(tensor_bytes(tensor), tensor_bytes(state[name]))
    assert sorted(names) == sorted(state)


def test_stopping_iteration_early_joins_the_workers(tmp_path):
    import threading

    state = {f"w{i}": random_tensor("float32", (4096,), seed=i) for i in range(20)}
    path = save_state_dict(state, tmp_path / "ck", chunk_bytes=4096)
    it = iter_state_dict(path, threads=4, chunk_bytes=4096)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sllm-io-")]


_dtype = st.sampled_from([d for d in TORCH_DTYPES if d != "float4_e2m1fn_x2"])
_shape = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.lists(st.tuples(_dtype, _shape), min_size=1, max_size=8),
    chunk_pages=st.integers(1, 4),
    partition_pages=st.integers(1, 6),
    threads=st.integers(1, 4),
    tie=st.booleans(),
)
def test_property_any_state_dict_round_trips(tmp_path_factory, spec, chunk_pages,
                                             partition_pages, threads, tie):
    state = {f"p{i}.w": random_tensor(d, s, seed=i) for i, (d, s) in enumerate(spec)}
    if tie and state["p0.w"].numel():
        state["tied"] = state["p0.w"]
    path = save_state_dict(state, tmp_path_factory.mktemp("prop") / "ck",
                           chunk_bytes=4096 * chunk_pages, partition_bytes=4096 * partition_pages)
    assert_bit_equal(state, load_state_dict(path, threads=threads, verify=True))


def test_zero_copy_maps_cached_and_cold_checkpoints(tmp_path):
    from sllm_plugin.loader.bench import evict_page_cache, warm_page_cache

    emb = random_tensor("bfloat16", (300, 40))
    state = {"emb": emb, "tied": emb, "w": random_tensor("float32", (5000,), seed=1)}
    path = save_state_dict(state, tmp_path / "ck")
    data = list(path.glob("*.bin"))
    warm_page_cache(data)
    stats = LoadStats()
    mapped = dict(iter_state_dict(path, zero_copy=True, stats=stats))
    assert stats.extra.get("mode") == "mapped"
    assert_bit_equal(state, mapped)
    assert mapped["tied"] is mapped["emb"]
    mapped["w"].fill_(0)  # private mapping: writes never reach the file
    assert_bit_equal(state, load_state_dict(path))
    del mapped  # mapped pages cannot leave the page cache
    evict_page_cache(data)
    # Cold: still mapped, the pages read in by the workers as the tensors are handed out.
    stats = LoadStats()
    cold = dict(iter_state_dict(path, zero_copy=True, stats=stats, threads=3, chunk_bytes=8192))
    assert stats.extra.get("mode") == "mapped"
    assert_bit_equal(state, cold)
    # Asked for verification or O_DIRECT: read into memory of its own instead.
    for kwargs in ({"verify": True}, {"direct_io": True}):
        stats = LoadStats()
        assert_bit_equal(state, dict(iter_state_dict(path, zero_copy=True, stats=stats, **kwargs)))
        assert "mode" not in stats.extra
