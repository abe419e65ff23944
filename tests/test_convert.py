"""The converter: sources, completeness, bounded memory, atomicity, and a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, mount_or_skip, run_cli, unmount
from safetensors.torch import load_file, save_file

from sllm_plugin import (
    CheckpointExistsError,
    CheckpointWriteError,
    FormatError,
    convert,
    load_state_dict,
)
from sllm_plugin.format import CheckpointWriter, open_checkpoint


def test_sharded_directory_with_tokenizer(tiny_model, tiny_model_state, tmp_path):
    shards = sorted(p.name for p in tiny_model.glob("*.safetensors"))
    assert len(shards) >= 2, "fixture must be sharded"
    out = convert(tiny_model, tmp_path / "out", quiet=True)
    assert_bit_equal(tiny_model_state, load_state_dict(out, verify=True))
    for side in ["config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"]:
        assert (out / side).read_bytes() == (tiny_model / side).read_bytes(), side
    assert not list(out.glob("*.safetensors"))
    assert not (out / "model.safetensors.index.json").exists()
    # The result is a complete model directory: transformers reads its config and tokenizer.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    source = json.loads((out / "sllm-index.json").read_text())["source"]
    assert source["converted_from"] == "safetensors" and source["model_id"] == str(tiny_model)


def test_single_safetensors_file_with_every_safetensors_dtype(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "f8e4": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(16, generator=g).to(torch.float8_e5m2),
        "i8": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-1000, 1000, (4,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-1000, 1000, (4,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-1000, 1000, (2, 2), dtype=torch.int64, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(10, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    save_file(state, tmp_path / "weights.safetensors", metadata={"format": "pt"})
    out = convert(tmp_path / "weights.safetensors", tmp_path / "out", quiet=True)
    assert_bit_equal(state, load_state_dict(out))
    assert json.loads((out / "sllm-index.json").read_text())["metadata"] == {"format": "pt"}


def test_hub_id_through_the_offline_cache(tiny_model, tiny_model_state, tmp_path):
    """A hub id resolves through huggingface_hub's own cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny" / "snapshots" / commit
    shutil.copytree(tiny_model, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = run_cli("convert", "acme/tiny", str(tmp_path / "out"), "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert_bit_equal(tiny_model_state, load_state_dict(tmp_path / "out"))
    source = json.loads((tmp_path / "out" / "sllm-index.json").read_text())["source"]
    assert source == {**source, "model_id": "acme/tiny", "revision": commit}
    missing = run_cli("convert", "acme/absent", str(tmp_path / "out2"), "--quiet", env=env)
    assert missing.returncode == 4
    assert "acme/absent" in missing.stderr and "hub could not provide it" in missing.stderr


def test_directory_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"no .safetensors weights.*pytorch_model.bin"):
        convert(tmp_path / "m", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b'{"w": {"dtype": "F3')
    with pytest.raises(FormatError, match="bad.safetensors: safetensors header"):
        convert(bad, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_destination_exists_needs_overwrite(tiny_model, tmp_path):
    out = convert(tiny_model, tmp_path / "out", quiet=True)
    with pytest.raises(CheckpointExistsError):
        convert(tiny_model, out, quiet=True)
    cli = run_cli("convert", str(tiny_model), str(out), "--quiet")
    assert cli.returncode == 3 and "--overwrite" in cli.stderr
    cli = run_cli("convert", str(tiny_model), str(out), "--quiet", "--overwrite")
    assert cli.returncode == 0, cli.stderr
    open_checkpoint(out)


def _make_big_safetensors(path: Path, total_mb: int, tensors: int = 8) -> None:
    g = torch.Generator().manual_seed(2)
    per = total_mb * 1024 * 1024 // tensors // 2
    save_file({f"w{i}": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(tensors)},
              path)


def test_memory_stays_bounded_while_converting(tmp_path):
    """Peak RSS of a converter process stays far below the model size."""
    src = tmp_path / "big.safetensors"
    _make_big_safetensors(src, 400)
    size = src.stat().st_size
    # VmHWM is this process image's own peak (ru_maxrss would carry the forking parent's).
    code = ("import sys; from sllm_plugin import convert; "
            "convert(sys.argv[1], sys.argv[2], quiet=True); "
            "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:')][0])")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    peak = int(done.stdout.strip())
    assert peak < size * 0.4, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
    assert_bit_equal(load_file(src), load_state_dict(tmp_path / "out"))


def test_killed_converter_leaves_nothing_valid_and_next_run_succeeds(tmp_path):
    src = tmp_path / "big.safetensors"
    _make_big_safetensors(src, 300, tensors=30)
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sllm_plugin.cli", "convert", str(src), str(dst), "--quiet",
         "--partition-size", "20MiB"],
    )
    deadline = time.monotonic() + 60
    staged: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.glob(".out.sllm-tmp-*") if len(list(p.glob("*.bin"))) >= 2]
        if staged:
            break
    assert staged, "converter finished before it could be killed; make the model bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    with pytest.raises(FormatError):
        open_checkpoint(staged[0])
    out = convert(src, dst, quiet=True)
    assert_bit_equal(load_file(src), load_state_dict(out))
    assert not list(tmp_path.glob(".out.sllm-*")), "stale staging directory was not removed"


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs: a real full disk. Needs root and mount (CI has both)."""
    mnt = mount_or_skip("tmpfs", tmp_path / "small", "size=2m")
    yield mnt
    unmount(mnt)


def test_full_disk_is_refused_up_front_and_leaves_nothing(tiny_fs, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(1024 * 1024)}, src)  # 4 MiB
    with pytest.raises(CheckpointWriteError, match="not enough space"):
        convert(src, tiny_fs / "out", quiet=True)
    assert list(tiny_fs.iterdir()) == []
    cli = run_cli("convert", str(src), str(tiny_fs / "out"), "--quiet")
    assert cli.returncode == 4 and "not enough space" in cli.stderr


def test_disk_filling_up_mid_write_leaves_nothing(tiny_fs):
    """No size known up front (streaming writer): ENOSPC mid-write is a clean error."""
    piece = bytes(512 * 1024)
    with pytest.raises(CheckpointWriteError, match="No space left on device"), \
            CheckpointWriter(tiny_fs / "out") as writer:
        writer.add_tensor("w", "uint8", [len(piece) * 8], [piece] * 8)
        writer.commit()
    assert list(tiny_fs.iterdir()) == []


def test_killed_between_renames_restores_the_old_checkpoint(tiny_model, tmp_path):
    """A replaced checkpoint set aside by a writer that then died is put back, not lost."""
    out = convert(tiny_model, tmp_path / "out", quiet=True)
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".out.sllm-old-{dead_pid}-abcd"
    os.rename(out, aside)
    with pytest.raises(CheckpointExistsError):
        convert(tiny_model, out, quiet=True)
    assert open_checkpoint(out) and not aside.exists()
