"""Every way a checkpoint can be wrong gets a FormatError naming the file and tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import edit_index, run_cli

from sllm_plugin import (
    CheckpointExistsError,
    FormatError,
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
