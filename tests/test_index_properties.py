"""Property-based: a mutated checkpoint is refused with FormatError or loads the right bytes.

Each example copies one small checkpoint into a fresh sandbox, mutates it (its index as
JSON or as text, its data files, links and FIFOs in and out of it) and loads it every way
there is. Whatever the mutation:
- nothing raises but FormatError, and nothing hangs;
- nothing is opened outside the checkpoint (an audit hook sees every open);
- with verify, every tensor returned holds exactly the bytes its index checksum vouches for
  (an index unchanged in names, dtypes, shapes and checksums gives back the original tensors
  bit for bit);
- `verify_checkpoint` passes exactly when a verified load does.
Bounded to well under a minute on a slow 2-core machine (max_examples, no deadline).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import xxhash
from conftest import assert_bit_equal, deadline, tensor_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sllm_plugin import FormatError, load_state_dict, save_state_dict, verify_checkpoint
from sllm_plugin.format import open_checkpoint
from sllm_plugin.format.reader import open_model_checkpoints
from sllm_plugin.loader.targets import load_into, map_into

# -- watching every open --------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, Path)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # permanent for the process; records only inside `watching_opens`


@contextlib.contextmanager
def watching_opens():
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None



# -- the checkpoint and what a mutation may point at ----------------------------------------

#: Entries made in every sandboxed checkpoint for mutated names to land on.
SPECIAL = ["evil.bin", "loop.bin", "fifo.bin", "dir.bin", "inside.bin", "dangling.bin",
           "devzero.bin"]
#: Absolute paths outside the sandbox that a link or a name may aim at.
FORBIDDEN = ["/etc/passwd", "/dev/zero"]
EMPTY = xxhash.xxh3_64(b"").hexdigest()


def original_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    a = torch.randn(3, 1024, generator=g)
    return {
        "a": a,  # 12 KiB: three 4 KiB chunks, data-00000.bin
        "b": torch.randn(3, 1024, generator=g),  # the same size, data-00001.bin
        "c": torch.randn(5, generator=g).to(torch.bfloat16),
        "d": torch.empty(0, 4, dtype=torch.int64),
        "a_tied": a,  # stored once, as an alias of "a"
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    state = original_state()
    ckpt = save_state_dict(state, root / "base", chunk_bytes=4096, partition_bytes=16384)
    index = json.loads((ckpt / "sllm-index.json").read_text())
    assert len(index["files"]) == 2 and index["aliases"] == {"a_tied": "a"}
    return root, ckpt, state, index


NAMES = [
    "data-00000.bin", "data-00001.bin", *SPECIAL, "../outside/secret.bin", "/etc/passwd",
    "sllm-index.json", "sub/data-00000.bin", ".hidden.bin", "a", "b", "c", "d", "a_tied", "",
    EMPTY, "0" * 16, "xxh3-64", "hf", "engine", "float32", "int32", "bfloat16", "uint8",
    "float4_e2m1fn_x2", "float8_e8m0fnu",
]
HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 4095, 4096, 8192, 12288, 16384, 2**31, 2**32, 2**63 - 1, 2**63,
                     2**64, 10**30]),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.sampled_from(NAMES),
    st.lists(st.integers(min_value=-5, max_value=2**64), max_size=5),
    st.lists(st.sampled_from(NAMES), max_size=3),
    st.dictionaries(st.sampled_from(NAMES), st.sampled_from(NAMES), max_size=3),
)
TENSOR_FIELDS = ["name", "dtype", "shape", "file", "offset", "bytes", "checksum"]


def draw_path(data, raw) -> tuple[object, object]:
    """A random (container, key) in the JSON tree."""
    node = raw
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return None, None
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        return node, key


def mutate_index(data, raw: dict) -> None:
    """One structural edit of the index as JSON."""
    # Weighted towards edits that keep the index valid but point it at other bytes: those
    # are the ones only checksums can catch.
    op = data.draw(st.sampled_from(["set", "delete", "swap", "swap", "swap", "copy", "offset",
                                    "offset", "file", "checksums", "alias", "unknown"]))
    tensors = raw.get("tensors") if isinstance(raw.get("tensors"), list) else []
    tensors = [t for t in tensors if isinstance(t, dict)]
    pair = [t for t in tensors if t.get("name") in ("a", "b")]
    if op == "swap" and len(pair) == 2 and data.draw(st.booleans()):
        # The same-size pair: swapping where they lie passes every chunk checksum.
        x, y = pair
        field = data.draw(st.sampled_from(["offset", "file", "checksum"]))
        if field in x and field in y:
            x[field], y[field] = y[field], x[field]
        return
    if op in ("set", "delete"):
        node, key = draw_path(data, raw)
        if node is None:
            return
        if op == "delete" and isinstance(node, dict):
            del node[key]
        else:
            node[key] = data.draw(HOSTILE)
    elif op in ("swap", "copy") and len(tensors) >= 2:
        x, y = data.draw(st.lists(st.sampled_from(tensors), min_size=2, max_size=2))
        field = data.draw(st.sampled_from(TENSOR_FIELDS))
        if field in x and field in y:
            if op == "swap":
                x[field], y[field] = y[field], x[field]
            else:
                x[field] = y[field]
    elif op == "offset" and tensors:
        data.draw(st.sampled_from(tensors))["offset"] = 4096 * data.draw(st.integers(0, 5))
    elif op == "file":
        name = data.draw(st.sampled_from(NAMES))
        files = raw.get("files")
        if isinstance(files, list) and files and isinstance(files[0], dict):
            i = data.draw(st.integers(0, len(files) - 1))
            old = files[i].get("name") if isinstance(files[i], dict) else None
            if isinstance(files[i], dict):
                files[i]["name"] = name
            for t in tensors:
                if t.get("file") == old:
                    t["file"] = name
    elif op == "checksums":
        listed = raw.get("files") if isinstance(raw.get("files"), list) else []
        files = [f for f in listed if isinstance(f, dict)
                 and isinstance(f.get("checksums"), list) and f["checksums"]]
        if files:
            f, g = data.draw(st.sampled_from(files)), data.draw(st.sampled_from(files))
            i = data.draw(st.integers(0, len(f["checksums"]) - 1))
            j = data.draw(st.integers(0, len(g["checksums"]) - 1))
            f["checksums"][i], g["checksums"][j] = g["checksums"][j], f["checksums"][i]
    elif op == "alias":
        aliases = raw.get("aliases")
        if isinstance(aliases, dict):
            aliases[data.draw(st.sampled_from(NAMES))] = data.draw(st.sampled_from(NAMES))
    elif op == "unknown":
        node, _ = draw_path(data, raw)
        if isinstance(node, dict):
            node[data.draw(st.sampled_from(["surprise", "name", "engine", "layout"]))] = (
                data.draw(HOSTILE))


def mutate_text(data, text: str) -> bytes:
    """One edit of the index as text: truncation, deep nesting, huge numbers, stray bytes."""
    op = data.draw(st.sampled_from(["truncate", "deep", "bignum", "bytes"]))
    raw = text.encode()
    if op == "truncate":
        return raw[: data.draw(st.integers(0, len(raw)))]
    if op == "deep":
        depth = data.draw(st.sampled_from([10, 1000, 50_000]))
        return raw.replace(b"{", b'{"x": ' + b"[" * depth + b"]" * depth + b", ", 1)
    if op == "bignum":
        digits = data.draw(st.sampled_from([20, 400, 5000]))
        return raw.replace(b'"offset": 0', b'"offset": ' + b"9" * digits, 1)
    at = data.draw(st.integers(0, len(raw)))
    return raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at:]


def mutate_files(data, ckpt: Path, outside: Path) -> None:
    """One edit on disk: bytes, sizes, links, FIFOs, directories, rank directories."""
    op = data.draw(st.sampled_from(["flip", "flip-rehash", "truncate", "extend", "link-data",
                                    "link-index", "rank"]))
    name = data.draw(st.sampled_from(["data-00000.bin", "data-00001.bin"]))
    path = ckpt / name
    if op in ("flip", "flip-rehash"):
        content = bytearray(path.read_bytes())
        at = data.draw(st.integers(0, len(content) - 1))
        content[at] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(content)
        if op == "flip-rehash":  # chunk checksums recomputed: only tensor checksums can tell
            index_path = ckpt / "sllm-index.json"
            try:
                raw = json.loads(index_path.read_bytes())
                files = [f for f in raw["files"] if f["name"] == name]
            except (ValueError, RecursionError, LookupError, TypeError):
                return  # the index is broken already: nothing to rehash
            for f in files:
                f["checksums"] = [xxhash.xxh3_64(bytes(content[i : i + 4096])).hexdigest()
                                  for i in range(0, len(content), 4096)]
            index_path.write_text(json.dumps(raw))
    elif op in ("truncate", "extend"):
        size = path.stat().st_size
        os.truncate(path, size - 4096 if op == "truncate" else size + 4096)
    elif op == "link-data":
        target = data.draw(st.sampled_from(
            ["outside-copy", "outside-fifo", "other", "loop", "dangling", "fifo", "dir",
             *FORBIDDEN]))
        path.unlink()
        if target == "outside-copy":  # the very same bytes, but outside: must not be read
            path.symlink_to(outside / f"copy-{name}")
        elif target == "outside-fifo":
            path.symlink_to(outside / "fifo")
        elif target == "other":
            other = "data-00001.bin" if name == "data-00000.bin" else "data-00000.bin"
            path.symlink_to(other)
        elif target == "loop":
            path.symlink_to(name)
        elif target == "dangling":
            path.symlink_to("missing.bin")
        elif target == "fifo":
            os.mkfifo(path)
        elif target == "dir":
            path.mkdir()
        else:
            path.symlink_to(target)
    elif op == "link-index":
        index = ckpt / "sllm-index.json"
        target = data.draw(st.sampled_from(["outside-copy", "inside-copy", "fifo", "dir",
                                            "loop", *FORBIDDEN]))
        if target == "outside-copy":
            shutil.copyfile(index, outside / "index.json")
            index.unlink()
            index.symlink_to(outside / "index.json")
        elif target == "inside-copy":
            os.rename(index, ckpt / "dir.bin" / "index.json")
            index.symlink_to("dir.bin/index.json")
        else:
            index.unlink()
            if target == "fifo":
                os.mkfifo(index)
            elif target == "dir":
                index.mkdir()
            elif target == "loop":
                index.symlink_to("sllm-index.json")
            else:
                index.symlink_to(target)
    else:  # an engine rank directory that is a link, a file, or not a checkpoint
        rank = ckpt / data.draw(st.sampled_from(["rank-00000", "rank-00001"]))
        kind = data.draw(st.sampled_from(["link-self", "link-outside", "file", "empty-dir"]))
        if kind == "link-self":
            rank.symlink_to(".")
        elif kind == "link-outside":
            rank.symlink_to(outside)
        elif kind == "file":
            rank.write_text("{}")
        else:
            rank.mkdir()


def make_sandbox(root: Path, base_ckpt: Path) -> tuple[Path, Path, Path]:
    sandbox = Path(tempfile.mkdtemp(dir=root))
    ckpt = Path(shutil.copytree(base_ckpt, sandbox / "ckpt"))
    outside = sandbox / "outside"
    outside.mkdir()
    for f in ("data-00000.bin", "data-00001.bin"):
        shutil.copyfile(ckpt / f, outside / f"copy-{f}")
    shutil.copyfile(ckpt / "data-00000.bin", outside / "secret.bin")
    os.mkfifo(outside / "fifo")
    (ckpt / "evil.bin").symlink_to(outside / "secret.bin")
    (ckpt / "loop.bin").symlink_to("loop.bin")
    os.mkfifo(ckpt / "fifo.bin")
    (ckpt / "dir.bin").mkdir()
    (ckpt / "inside.bin").symlink_to("data-00001.bin")
    (ckpt / "dangling.bin").symlink_to("nowhere.bin")
    (ckpt / "devzero.bin").symlink_to("/dev/zero")
    return sandbox, ckpt, outside


# -- the property ---------------------------------------------------------------------------


def attempt(fn):
    """(result, None) or (None, the FormatError); anything else propagates and fails."""
    try:
        return fn(), None
    except FormatError as e:
        return None, e


def fitting_targets(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh tensors shaped like the originals, tied where they were tied."""
    made: dict[int, torch.Tensor] = {}
    return {name: made.setdefault(id(t), torch.zeros_like(t)) for name, t in state.items()}


def check_vouched_bytes(ckpt: Path, tensors: dict[str, torch.Tensor], by_checksum) -> None:
    """Every tensor holds exactly the original bytes its (mutated) index entry's checksum
    names: verify let through nothing the index does not vouch for."""
    index = open_checkpoint(ckpt).index
    entries = {t.name: t for t in index.tensors}
    entries.update({alias: entries[target] for alias, target in index.aliases.items()})
    for name, tensor in tensors.items():
        entry = entries[name]
        assert entry.checksum in by_checksum, f"{name}: checksum {entry.checksum} is nobody's"
        assert tensor_bytes(tensor).numpy().tobytes() == by_checksum[entry.checksum], name


def described(index) -> tuple:
    """What a load returns besides bytes: names, dtypes, shapes, checksums, aliases."""
    return ([(t.name, t.dtype, t.shape, t.checksum) for t in index.tensors],
            dict(index.aliases))


@settings(max_examples=400, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_checkpoints_fail_cleanly_or_load_the_right_bytes(base, data):
    root, base_ckpt, state, base_index = base
    by_checksum = {t["checksum"]: tensor_bytes(state[t["name"]]).numpy().tobytes()
                   for t in base_index["tensors"]}
    base_described = described(open_checkpoint(base_ckpt).index)
    sandbox, ckpt, outside = make_sandbox(root, base_ckpt)
    try:
        raw = json.loads(json.dumps(base_index))
        for _ in range(data.draw(st.integers(0, 2))):
            mutate_index(data, raw)
        text = json.dumps(raw, allow_nan=True)
        as_text = data.draw(st.integers(0, 4)) == 0  # most text edits break the JSON outright
        payload = mutate_text(data, text) if as_text else text.encode()
        (ckpt / "sllm-index.json").write_bytes(payload)
        if data.draw(st.booleans()):
            mutate_files(data, ckpt, outside)

        with deadline(30), watching_opens() as opened:
            attempt(lambda: open_model_checkpoints(ckpt))
            loaded, load_error = attempt(lambda: load_state_dict(ckpt, verify=True, threads=2))
            report, verify_error = attempt(lambda: verify_checkpoint(ckpt, threads=2))
            into = fitting_targets(state)
            _, into_error = attempt(lambda: load_into(ckpt, into, verify=True, threads=2))
            mapped = fitting_targets(state)
            _, map_error = attempt(lambda: map_into(ckpt, mapped, verify=True, threads=2))

        event("verified load " + ("succeeded" if load_error is None else "refused"))
        forbidden = [str(outside), *FORBIDDEN]
        escaped = [p for p in opened
                   if any(os.path.realpath(p).startswith(f) for f in forbidden)]
        assert not escaped, f"opened outside the checkpoint: {escaped}"

        if loaded is not None:
            check_vouched_bytes(ckpt, loaded, by_checksum)
            if described(open_checkpoint(ckpt).index) == base_described:
                assert_bit_equal(state, loaded)
        if into_error is None:
            check_vouched_bytes(ckpt, into, by_checksum)
        if map_error is None:
            check_vouched_bytes(ckpt, mapped, by_checksum)
        lacks_dtype = load_error is not None and "is not available in torch" in str(load_error)
        if not lacks_dtype:
            assert (load_error is None) == (verify_error is None), (load_error, verify_error)
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
