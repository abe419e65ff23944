"""The converter: sources, completeness, bounded memory, atomicity, and a full disk."""

from __future__ import annotations

import contextlib
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
from conftest import assert_bit_equal, deadline, mount_or_skip, run_cli, unmount
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
    metadata = json.loads((out / "sllm-index.json").read_text())["metadata"]
    # the source's safetensors metadata is kept; the converter adds the engine shape
    assert metadata.pop("engine_shape_version") == "1" and len(metadata.pop("engine_shape")) == 64
    assert metadata == {"format": "pt"}


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


# -- links, FIFOs and permissions in the source --------------------------------------------



@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("the daemon's private key\n")
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_side_file_linking_out_of_the_source_is_refused(model_copy, secret, tmp_path):
    (model_copy / "notes.txt").symlink_to(secret)
    with pytest.raises(FormatError, match=r"notes.txt: side file \(a symlink\) resolves outside "
                                          r"the source directory"):
        convert(model_copy, tmp_path / "out", quiet=True)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("how", ["outside", "index-shard-outside", "fifo"])
def test_weight_files_must_be_regular_files_inside_the_source(model_copy, tmp_path, how):
    shard = sorted(model_copy.glob("*.safetensors"))[0]
    if how == "fifo":
        os.mkfifo(model_copy / "model-extra.safetensors")
        (model_copy / "model.safetensors.index.json").unlink()  # globbed: the FIFO is listed
        expected = r"model-extra.safetensors: weight file is not a regular file \(a FIFO\)"
    else:
        moved = tmp_path / shard.name
        os.rename(shard, moved)
        shard.symlink_to(moved)
        if how == "outside":
            (model_copy / "model.safetensors.index.json").unlink()
        expected = rf"{shard.name}: weight file resolves outside the source directory"
    with deadline(10), pytest.raises(FormatError, match=expected):
        convert(model_copy, tmp_path / "out", quiet=True)
    assert_nothing_written(tmp_path / "out")


def test_links_inside_the_source_are_copied_as_files(model_copy, tmp_path):
    (model_copy / "shared").mkdir()
    os.rename(model_copy / "tokenizer.json", model_copy / "shared" / "tokenizer.json")
    (model_copy / "tokenizer.json").symlink_to("shared/tokenizer.json")
    os.mkfifo(model_copy / "pipe.txt")  # not a side file: passed over, never opened
    with deadline(30):
        out = convert(model_copy, tmp_path / "out", quiet=True)
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (model_copy / "tokenizer.json").read_bytes()
    assert not (out / "pipe.txt").exists() and not (out / "shared").exists()


def test_a_hub_cache_snapshot_links_into_its_blobs(tiny_model, tiny_model_state, secret,
                                                   tmp_path):
    """The hub cache's layout: snapshots/<commit>/<name> -> ../../blobs/<hash>."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--linked"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(tiny_model.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i:04d}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i:04d}")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = run_cli("convert", "acme/linked", str(tmp_path / "out"), "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert_bit_equal(tiny_model_state, load_state_dict(tmp_path / "out", verify=True))
    config = tmp_path / "out" / "config.json"
    assert not config.is_symlink() and config.read_bytes() == (tiny_model / "config.json").read_bytes()
    # A link out of the model's cache directory is refused all the same.
    (snapshot / "notes.txt").symlink_to(secret)
    bad = run_cli("convert", "acme/linked", str(tmp_path / "out2"), "--quiet", env=env)
    assert bad.returncode == 1 and "resolves outside the source directory" in bad.stderr
    assert_nothing_written(tmp_path / "out2")


def test_copy_file_copies_regular_files_only(tmp_path, secret):
    (tmp_path / "link.txt").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo.txt")
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add_tensor("w", "uint8", [3], [b"abc"])
        with pytest.raises(FormatError, match="link.txt: side file is a symbolic link"):
            writer.copy_file(tmp_path / "link.txt")
        with deadline(10), pytest.raises(FormatError, match=r"fifo.txt: side file is not a "
                                                            r"regular file \(a FIFO\)"):
            writer.copy_file(tmp_path / "fifo.txt")
        writer.copy_file(secret, "notes.txt")  # a regular file named explicitly is fine
        out = writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["data-00000.bin", "notes.txt",
                                                     "sllm-index.json"]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    found = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    return {".": directory.stat().st_mode & 0o777, **found}


@pytest.mark.parametrize(("source", "mask", "file", "directory"), [
    (0o600, 0o022, 0o600, 0o700),  # a private model stays private
    (0o644, 0o022, 0o644, 0o755),
    (0o644, 0o077, 0o600, 0o700),  # never more open than the umask either
], ids=["private", "public", "umask"])
def test_a_converted_checkpoint_keeps_its_source_permissions(model_copy, tmp_path, source,
                                                             mask, file, directory):
    for p in model_copy.iterdir():
        p.chmod(source)
    model_copy.chmod(0o700 if source == 0o600 else 0o755)
    with umask(mask):
        out = convert(model_copy, tmp_path / "out", quiet=True)
    found = modes(out)
    assert found.pop(".") == directory
    assert found == {name: file for name in found}, found
    assert "config.json" in found and "data-00000.bin" in found and "sllm-index.json" in found


# -- refusing early, and plainly -----------------------------------------------------------


def test_converting_onto_an_existing_checkpoint_refuses_before_any_progress(tiny_model,
                                                                            tmp_path):
    out = convert(tiny_model, tmp_path / "out", quiet=True)
    done = run_cli("convert", str(tiny_model), str(out))  # not --quiet: a bar would show
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        f"sllm convert: error: {out} already holds an sllm checkpoint; pass overwrite=True "
        "(--overwrite) to replace it"]


@pytest.mark.parametrize("layout", ["hf", "engine"])
def test_converting_an_sllm_checkpoint_says_it_already_is_one(tiny_model, tmp_path, layout):
    from sllm_plugin import save_state_dict
    from sllm_plugin.format.index import EngineInfo

    if layout == "hf":
        ckpt = convert(tiny_model, tmp_path / "ck", quiet=True)
    else:
        ckpt = tmp_path / "ck"
        save_state_dict({"w": torch.ones(3)}, ckpt / "rank-00000", layout="engine",
                        engine=EngineInfo(engine_version="0", tensor_parallel_size=1, rank=0,
                                          dtype="float32"))
    done = run_cli("convert", str(ckpt), str(tmp_path / "out"))
    assert done.returncode == 1
    assert f"{ckpt} is already an sllm checkpoint ({layout} layout); there is nothing to " \
           "convert" in done.stderr
    assert "save_pretrained" not in done.stderr and "%|" not in done.stderr
    assert_nothing_written(tmp_path / "out")


def test_a_single_file_named_as_the_source_may_be_a_link(tmp_path):
    """The file named is the caller's choice, as a source directory is."""
    (tmp_path / "store").mkdir()
    save_file({"w": torch.arange(6.0)}, tmp_path / "store" / "blob")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").symlink_to(tmp_path / "store" / "blob")
    out = convert(tmp_path / "m" / "w.safetensors", tmp_path / "out", quiet=True)
    assert torch.equal(load_state_dict(out)["w"], torch.arange(6.0))
