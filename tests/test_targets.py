"""Loading into an existing module's tensors: `load_into` (copy) and `map_into` (zero-copy)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_equal
from torch import nn

from sllm_plugin import FormatError, load_state_dict, save_state_dict
from sllm_plugin.loader.bench import evict_page_cache, warm_page_cache
from sllm_plugin.loader.targets import live_state, load_into, map_into


class TinyNet(nn.Module):
    """Parameters of several dtypes, a persistent buffer, and an optional tied pair."""

    def __init__(self, seed: int, tie: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(300, 48, dtype=torch.bfloat16)
        self.proj = nn.Linear(48, 5000, dtype=torch.float32)
        self.head = nn.Linear(48, 300, bias=False, dtype=torch.bfloat16)
        if tie:
            self.head.weight = self.emb.weight
        self.register_buffer("steps", torch.arange(7, dtype=torch.int64) * seed)


def saved(model: nn.Module, path):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, save_state_dict(model.state_dict(), path)


@pytest.mark.parametrize("warm", [True, False], ids=["page-cached", "evicted"])
def test_map_into_makes_parameters_views_of_the_file(tmp_path, warm):
    state, path = saved(TinyNet(seed=1), tmp_path / "ck")
    data = list(path.glob("*.bin"))
    (warm_page_cache if warm else evict_page_cache)(data)
    model = TinyNet(seed=2)
    params_before = dict(model.named_parameters())
    stats = map_into(path, live_state(model), threads=3, chunk_bytes=8192, verify=True)
    assert stats.extra["mode"] == "mapped" and stats.bytes > 0
    assert_bit_equal(state, model.state_dict())
    # The module keeps its Parameter objects (and whatever attributes the engine set on them).
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert model.head.weight is model.emb.weight
    # Writes are private: the file, and a second model mapping it, never see them.
    other = TinyNet(seed=3)
    map_into(path, live_state(other))
    with torch.no_grad():
        model.proj.weight.fill_(0)
    assert_bit_equal(state, other.state_dict())
    assert_bit_equal(state, load_state_dict(path))


def test_map_into_copies_a_tied_pair_the_model_keeps_apart(tmp_path):
    state, path = saved(TinyNet(seed=1), tmp_path / "ck")  # stored once, aliased
    model = TinyNet(seed=2, tie=False)
    map_into(path, live_state(model))
    assert_bit_equal(state, model.state_dict())
    assert model.head.weight.data_ptr() != model.emb.weight.data_ptr()
    with torch.no_grad():
        model.emb.weight.fill_(0)
    assert torch.equal(model.head.weight, state["head.weight"])


@pytest.mark.parametrize("fill", [load_into, map_into], ids=["load_into", "map_into"])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tmp_path, fill):
    _, path = saved(TinyNet(seed=1), tmp_path / "ck")
    model = TinyNet(seed=2)
    model.proj = nn.Linear(48, 4000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match=r"'proj.weight': checkpoint has float32 \[5000, 48\], "
                                          r"the model expects float32 \[4000, 48\]"):
        fill(path, live_state(model))
    assert_bit_equal(before, model.state_dict())


def test_load_into_fills_existing_memory(tmp_path):
    state, path = saved(TinyNet(seed=1), tmp_path / "ck")
    model = TinyNet(seed=2)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    load_into(path, live_state(model), threads=2, chunk_bytes=8192, verify=True)
    assert_bit_equal(state, model.state_dict())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("fill", [load_into, map_into], ids=["load_into", "map_into"])
def test_verify_names_the_corrupt_tensor(tmp_path, fill):
    _, path = saved(TinyNet(seed=1), tmp_path / "ck")
    from sllm_plugin import open_checkpoint

    entry = next(t for t in open_checkpoint(path).index.tensors if t.name == "proj.bias")
    data = path / entry.file
    with open(data, "r+b") as f:
        f.seek(entry.offset + 3)
        byte = f.read(1)
        f.seek(entry.offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FormatError, match=r"corrupt tensor\(s\): 'proj.bias'"):
        fill(path, live_state(TinyNet(seed=2)), verify=True)


@pytest.mark.parametrize("fill", [load_into, map_into], ids=["load_into", "map_into"])
@pytest.mark.parametrize("head", [(300, torch.float32), (200, torch.bfloat16)],
                         ids=["other-dtype", "other-shape"])
def test_an_alias_is_checked_against_the_model_like_any_name(tmp_path, fill, head):
    """head.weight is stored as an alias of emb.weight: the model's head.weight must fit it."""
    _, path = saved(TinyNet(seed=1), tmp_path / "ck")
    model = TinyNet(seed=2, tie=False)
    rows, dtype = head
    model.head = nn.Linear(48, rows, bias=False, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = str(dtype).removeprefix("torch.")
    with pytest.raises(FormatError, match=(
            rf"'head.weight' \(an alias of 'emb.weight'\): checkpoint has bfloat16 \[300, 48\], "
            rf"the model expects {want} \[{rows}, 48\]")):
        fill(path, live_state(model))
    assert_bit_equal(before, model.state_dict())
    assert model.head.weight.dtype == dtype and model.head.weight.shape == (rows, 48)


@pytest.mark.parametrize("fill", [load_into, map_into], ids=["load_into", "map_into"])
def test_verify_catches_swapped_same_size_tensors(tmp_path, fill):
    """An index swapping two same-size tensors' offsets passes every chunk checksum."""
    import json

    from conftest import edit_index

    model = TinyNet(seed=1, tie=False)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(300, 48))  # emb.weight and head.weight: same size
    _, path = saved(model, tmp_path / "ck")

    def swap(raw):
        a, b = (next(t for t in raw["tensors"] if t["name"] == n)
                for n in ("emb.weight", "head.weight"))
        a["offset"], b["offset"] = b["offset"], a["offset"]

    edit_index(path, swap)
    assert json.loads((path / "sllm-index.json").read_text())  # still a valid index
    target = TinyNet(seed=2, tie=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FormatError, match=r"corrupt tensor\(s\): 'emb.weight', 'head.weight'"):
        fill(path, live_state(target), verify=True)
    if fill is map_into:  # checked on the mapping before any parameter changed
        assert_bit_equal(before, target.state_dict())
