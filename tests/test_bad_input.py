"""Every way a checkpoint can be wrong gets a FormatError naming the file and tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import deadline, edit_index, run_cli

from sllm_plugin import (
    CheckpointExistsError,
    FormatError,
    iter_state_dict,
    load_state_dict,
    save_state_dict,
    verify_checkpoint,
)
from sllm_plugin.format import open_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(64, 64, generator=g),  # 16 KiB: 4 chunks of 4 KiB
        "norm.weight": torch.randn(64, generator=g),
        "head.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
    }
    return save_state_dict(state, tmp_path / "ck", chunk_bytes=4096)


def entry(raw: dict, name: str) -> dict:
    return next(t for t in raw["tensors"] if t["name"] == name)


def test_truncated_data_file_names_file_and_tensor(ckpt):
    data = ckpt / "data-00000.bin"
    os.truncate(data, 4096 * 2)
    with pytest.raises(FormatError, match=r"data-00000.bin.*truncated.*'embed.weight'"):
        load_state_dict(ckpt)


def test_flipped_byte_is_caught_by_verify_and_load_verify(ckpt):
    raw = json.loads((ckpt / "sllm-index.json").read_text())
    offset = entry(raw, "head.weight")["offset"] + 100
    with open(ckpt / "data-00000.bin", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(FormatError, match=r"checksum mismatch.*'head.weight'"):
        load_state_dict(ckpt, verify=True)
    with pytest.raises(FormatError, match=r"(?s)1 corrupt chunk.*'head.weight'"):
        verify_checkpoint(ckpt)
    report = verify_checkpoint(ckpt, raise_on_error=False)
    assert len(report.errors) == 1 and "embed.weight" not in report.errors[0]
    # Without verify the load still validates structure but cannot see a flipped bit.
    load_state_dict(ckpt, verify=False)


def test_malformed_index_json(ckpt):
    (ckpt / "sllm-index.json").write_text('{"format": "sllm", "version": 1,')
    with pytest.raises(FormatError, match=r"sllm-index.json.*not valid JSON"):
        load_state_dict(ckpt)


def test_missing_index_is_not_a_checkpoint(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FormatError, match="no sllm index"):
        load_state_dict(tmp_path / "d")


@pytest.mark.parametrize("bad_name", ["../escape.bin", "/etc/passwd", "sub/data.bin", ".hidden.bin",
                                      "data-00000.bin\n", "sllm-index.json", "config.json"])
def test_file_names_escaping_the_directory(ckpt, bad_name):
    def edit(raw):
        raw["files"][0]["name"] = bad_name
        for t in raw["tensors"]:
            t["file"] = bad_name

    edit_index(ckpt, edit)
    with pytest.raises(FormatError, match="illegal data file name"):
        load_state_dict(ckpt)


def test_symlink_pointing_out_of_the_checkpoint(ckpt, tmp_path):
    outside = tmp_path / "outside.bin"
    os.rename(ckpt / "data-00000.bin", outside)
    os.symlink(outside, ckpt / "data-00000.bin")
    with pytest.raises(FormatError, match="resolves outside the checkpoint"):
        load_state_dict(ckpt)


def test_overlapping_extents(ckpt):
    edit_index(ckpt, lambda raw: entry(raw, "norm.weight").update(
        offset=entry(raw, "embed.weight")["offset"]))
    with pytest.raises(FormatError, match=r"tensors '(embed|norm).weight' and '(embed|norm).weight' overlap in 'data-00000.bin'"):
        load_state_dict(ckpt)


def test_out_of_range_extent(ckpt):
    edit_index(ckpt, lambda raw: entry(raw, "head.weight").update(offset=1 << 30))
    with pytest.raises(FormatError, match=r"'head.weight' extent .* lies outside"):
        load_state_dict(ckpt)


def test_unaligned_offset(ckpt):
    edit_index(ckpt, lambda raw: entry(raw, "norm.weight").update(offset=4096 * 4 + 8))
    with pytest.raises(FormatError, match=r"'norm.weight' offset .* not 4 KiB-aligned"):
        load_state_dict(ckpt)


@pytest.mark.parametrize("value", [4096.0, "4096", True])
def test_integers_must_be_integers(ckpt, value):
    edit_index(ckpt, lambda raw: entry(raw, "norm.weight").update(offset=value))
    with pytest.raises(FormatError, match=r"invalid index: tensors.'norm.weight'.offset: Input should be a valid integer"):
        load_state_dict(ckpt)


def test_engine_section_must_match_the_layout(ckpt):
    engine = {"engine": "vllm", "engine_version": "0.32.0", "tensor_parallel_size": 2,
              "rank": 0, "dtype": "bfloat16", "quantization": None, "model": None}
    edit_index(ckpt, lambda raw: raw.update(engine=engine))
    with pytest.raises(FormatError, match="required for layout 'engine' and only for it"):
        load_state_dict(ckpt)
    edit_index(ckpt, lambda raw: raw.update(layout="engine", engine={**engine, "rank": 2}))
    with pytest.raises(FormatError, match="engine rank 2 is out of range"):
        load_state_dict(ckpt)


def test_unknown_dtype(ckpt):
    edit_index(ckpt, lambda raw: entry(raw, "norm.weight").update(dtype="float7"))
    with pytest.raises(FormatError, match=r"'norm.weight' has unknown dtype 'float7'"):
        load_state_dict(ckpt)


def test_newer_format_version(ckpt):
    edit_index(ckpt, lambda raw: raw.update(version=2, new_field=True))
    with pytest.raises(FormatError, match="version 2 is newer than this reader supports"):
        load_state_dict(ckpt)


def test_unknown_field_in_current_version(ckpt):
    edit_index(ckpt, lambda raw: raw.update(surprise=1))
    with pytest.raises(FormatError, match="surprise"):
        load_state_dict(ckpt)


def test_missing_data_file(ckpt):
    os.remove(ckpt / "data-00000.bin")
    with pytest.raises(FormatError, match="data-00000.bin: data file listed in the index is missing"):
        load_state_dict(ckpt)


def test_shape_disagrees_with_extent(ckpt):
    edit_index(ckpt, lambda raw: entry(raw, "embed.weight").update(shape=[64, 65]))
    with pytest.raises(FormatError, match=r"'embed.weight': 16384 bytes recorded but .* need 16640"):
        load_state_dict(ckpt)


def test_wrong_checksum_count(ckpt):
    edit_index(ckpt, lambda raw: raw["files"][0]["checksums"].pop())
    with pytest.raises(FormatError, match="checksums, expected"):
        load_state_dict(ckpt)


def test_alias_to_unknown_tensor(ckpt):
    edit_index(ckpt, lambda raw: raw.update(aliases={"x": "nope"}))
    with pytest.raises(FormatError, match="alias 'x' points to unknown tensor 'nope'"):
        load_state_dict(ckpt)


def test_empty_state_dict_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty state dict"):
        save_state_dict({}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_index_without_tensors_is_invalid(ckpt):
    edit_index(ckpt, lambda raw: raw.update(tensors=[]))
    with pytest.raises(FormatError, match="holds no tensors"):
        open_checkpoint(ckpt)


def test_existing_checkpoint_is_not_overwritten_without_asking(ckpt):
    before = (ckpt / "sllm-index.json").read_bytes()
    with pytest.raises(CheckpointExistsError, match="already holds an sllm checkpoint"):
        save_state_dict({"x": torch.ones(3)}, ckpt)
    assert (ckpt / "sllm-index.json").read_bytes() == before
    save_state_dict({"x": torch.ones(3)}, ckpt, overwrite=True)
    assert list(load_state_dict(ckpt)) == ["x"]
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]


def test_non_checkpoint_directory_is_never_replaced(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointExistsError, match="not an sllm checkpoint"):
        save_state_dict({"x": torch.ones(3)}, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_unsupported_tensor_types_are_named(tmp_path):
    with pytest.raises(TypeError, match="'x' is a list"):
        save_state_dict({"x": [1, 2]}, tmp_path / "ck")
    with pytest.raises(ValueError, match="meta device"):
        save_state_dict({"m": torch.empty(3, device="meta")}, tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()


def test_cli_verify_exit_status_names_the_bad_tensor(ckpt):
    ok = run_cli("verify", str(ckpt))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    raw = json.loads((ckpt / "sllm-index.json").read_text())
    with open(ckpt / "data-00000.bin", "r+b") as f:
        f.seek(entry(raw, "norm.weight")["offset"])
        f.write(b"\xff\xff")
    bad = run_cli("verify", str(ckpt))
    assert bad.returncode == 1
    assert "'norm.weight'" in bad.stderr and "CORRUPT" in bad.stderr


# -- tensor checksums: an index pointing at the wrong bytes --------------------------------


@pytest.fixture
def twins(tmp_path):
    """Two same-size tensors, each spanning three 4 KiB chunks, between two others."""
    g = torch.Generator().manual_seed(5)
    state = {
        "first": torch.randn(100, generator=g),
        "a": torch.randn(3, 1024, generator=g),
        "b": torch.randn(3, 1024, generator=g),
        "last": torch.randn(7, generator=g).to(torch.float16),
    }
    return state, save_state_dict(state, tmp_path / "twins", chunk_bytes=4096)


def swap_offsets(ckpt, x: str, y: str) -> None:
    def edit(raw):
        ex, ey = entry(raw, x), entry(raw, y)
        ex["offset"], ey["offset"] = ey["offset"], ex["offset"]

    edit_index(ckpt, edit)


@pytest.mark.parametrize("threads", [1, 4])
def test_swapped_same_size_tensors_are_caught_by_every_verify(twins, threads):
    state, ckpt = twins
    swap_offsets(ckpt, "a", "b")
    # Every chunk checksum still passes: without verify the two load swapped.
    loaded = load_state_dict(ckpt, threads=threads)
    assert torch.equal(loaded["a"], state["b"]) and torch.equal(loaded["b"], state["a"])
    own = r"tensor '[ab]' \(bytes \d+-\d+\) does not match its own checksum"
    with pytest.raises(FormatError, match=own):
        load_state_dict(ckpt, verify=True, threads=threads)
    with pytest.raises(FormatError, match=own):
        dict(iter_state_dict(ckpt, verify=True, threads=threads))
    with pytest.raises(FormatError, match=r"(?s)2 tensor\(s\) failing their own checksum.*'a'.*'b'"):
        verify_checkpoint(ckpt, threads=threads)
    report = verify_checkpoint(ckpt, threads=threads, raise_on_error=False)
    assert report.bad_chunks == 0 and report.bad_tensors == ["a", "b"]


def test_cli_verify_names_a_tensor_the_index_misplaces(twins):
    _, ckpt = twins
    swap_offsets(ckpt, "a", "b")
    bad = run_cli("verify", str(ckpt))
    assert bad.returncode == 1, bad.stderr
    assert "tensor 'a'" in bad.stderr and "tensor 'b'" in bad.stderr
    assert "CORRUPT: 2 tensor(s) whose chunks pass fail their own checksum" in bad.stderr


def test_edited_bytes_with_rewritten_chunk_checksums_are_caught(twins):
    """Chunk checksums recomputed after an edit: only the tensor's own checksum sees it."""
    import xxhash

    _, ckpt = twins
    raw = json.loads((ckpt / "sllm-index.json").read_text())
    data = bytearray((ckpt / "data-00000.bin").read_bytes())
    data[entry(raw, "b")["offset"] + 5000] ^= 0x40
    (ckpt / "data-00000.bin").write_bytes(data)
    raw["files"][0]["checksums"] = [xxhash.xxh3_64(bytes(data[i : i + 4096])).hexdigest()
                                    for i in range(0, len(data), 4096)]
    (ckpt / "sllm-index.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"tensor 'b' .*does not match its own checksum"):
        load_state_dict(ckpt, verify=True)
    report = verify_checkpoint(ckpt, raise_on_error=False)
    assert report.bad_chunks == 0 and report.bad_tensors == ["b"]


def test_an_empty_tensor_with_a_wrong_checksum_fails_verify(tmp_path):
    ckpt = save_state_dict({"w": torch.ones(3), "e": torch.empty(0, 5)}, tmp_path / "ck")
    edit_index(ckpt, lambda raw: entry(raw, "e").update(checksum="0" * 16))
    load_state_dict(ckpt)  # not verified: nothing to read, nothing checked
    with pytest.raises(FormatError, match="tensor 'e' .*does not match its own checksum"):
        load_state_dict(ckpt, verify=True)
    assert verify_checkpoint(ckpt, raise_on_error=False).bad_tensors == ["e"]


# -- hostile indexes and directories: FormatError and nothing else, never a hang -----------



def replace_index_text(ckpt, old: str, new: str) -> None:
    path = ckpt / "sllm-index.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_deeply_nested_index_is_a_format_error(ckpt):
    depth = 100_000
    (ckpt / "sllm-index.json").write_text(
        '{"format": "sllm", "version": 1, "files": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(FormatError, match="not valid JSON"):
        open_checkpoint(ckpt)


def test_an_integer_too_long_to_parse_is_a_format_error(ckpt):
    offset = entry(json.loads((ckpt / "sllm-index.json").read_text()), "norm.weight")["offset"]
    replace_index_text(ckpt, f'"offset": {offset}', '"offset": ' + "9" * 5000)
    with pytest.raises(FormatError, match="not valid JSON"):
        open_checkpoint(ckpt)


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**64, 0], [2**40, 2**40, 0]])
def test_a_shape_torch_cannot_hold_is_refused_before_loading(ckpt, shape):
    """An empty tensor whose other dimensions overflow int64 (torch raises RuntimeError)."""
    edit_index(ckpt, lambda raw: entry(raw, "norm.weight").update(shape=shape, bytes=0))
    with pytest.raises(FormatError, match=r"'norm.weight' has too many elements for torch"):
        load_state_dict(ckpt)


def test_data_file_symlink_loop(ckpt):
    os.remove(ckpt / "data-00000.bin")
    os.symlink("loop.bin", ckpt / "data-00000.bin")
    os.symlink("data-00000.bin", ckpt / "loop.bin")
    with pytest.raises(FormatError, match="data-00000.bin: data file cannot be resolved: .*loop"):
        load_state_dict(ckpt)


@pytest.mark.parametrize("kind", ["fifo", "directory", "loop", "outside", "dangling"])
def test_the_index_must_be_a_regular_file_inside_the_checkpoint(ckpt, tmp_path, kind):
    index = ckpt / "sllm-index.json"
    outside = tmp_path / "outside.json"
    os.rename(index, outside)
    expected = {
        "fifo": r"index file is not a regular file \(a FIFO\)",
        "directory": r"index file is not a regular file \(a directory\)",
        "loop": "index file cannot be resolved: .*loop",
        "outside": "index file resolves outside the checkpoint",
        "dangling": r"index file is missing \(a dangling symlink\)",
    }[kind]
    if kind == "fifo":
        os.mkfifo(index)
    elif kind == "directory":
        index.mkdir()
    elif kind == "loop":
        os.symlink("sllm-index.json", index)
    elif kind == "outside":
        os.symlink(outside, index)
    else:
        os.symlink("gone.json", index)
    with deadline(10), pytest.raises(FormatError, match=expected):
        open_checkpoint(ckpt)


def test_an_index_symlinked_inside_the_checkpoint_is_fine(ckpt):
    (ckpt / "meta").mkdir()
    os.rename(ckpt / "sllm-index.json", ckpt / "meta" / "index.json")
    os.symlink("meta/index.json", ckpt / "sllm-index.json")
    assert set(load_state_dict(ckpt, verify=True)) == {"embed.weight", "norm.weight",
                                                       "head.weight"}


def test_an_index_over_the_size_cap_is_refused_unread(ckpt):
    from sllm_plugin.format.spec import MAX_INDEX_BYTES

    os.truncate(ckpt / "sllm-index.json", MAX_INDEX_BYTES + 1)  # sparse: nothing to read
    with pytest.raises(FormatError, match=rf"index file is {MAX_INDEX_BYTES + 1} bytes, "
                                          rf"over the {MAX_INDEX_BYTES}-byte limit"):
        open_checkpoint(ckpt)


@pytest.fixture
def engine_ckpt(tmp_path):
    from sllm_plugin.format.index import EngineInfo

    top = tmp_path / "engine"
    for rank in range(2):
        save_state_dict({"w": torch.full((4,), float(rank))}, top / f"rank-{rank:05d}",
                        layout="engine",
                        engine=EngineInfo(engine_version="0.0", tensor_parallel_size=2,
                                          rank=rank, dtype="float32"))
    return top


def test_engine_rank_directories_must_be_real_directories(engine_ckpt, tmp_path):
    from sllm_plugin.format.reader import open_model_checkpoints

    assert len(open_model_checkpoints(engine_ckpt)) == 2
    rank1 = engine_ckpt / "rank-00001"
    os.rename(rank1, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", rank1)
    with pytest.raises(FormatError, match="rank-00001: rank directory is a symbolic link"):
        open_model_checkpoints(engine_ckpt)
    rank1.unlink()
    rank1.write_text("not a directory")
    with pytest.raises(FormatError, match="rank-00001: rank directory is not a directory"):
        open_model_checkpoints(engine_ckpt)


def test_engine_rank_directory_must_hold_its_own_rank(engine_ckpt):
    from sllm_plugin.format.reader import open_model_checkpoints

    edit_index(engine_ckpt / "rank-00001", lambda raw: raw["engine"].update(rank=0))
    with pytest.raises(FormatError, match="the index of rank 1 of 2 says rank 0 of "
                                          "tensor_parallel_size 2"):
        open_model_checkpoints(engine_ckpt)
