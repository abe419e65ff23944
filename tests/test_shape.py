"""Engine shape: which checkpoints may share one vLLM engine (a weight swap), and which never.

Models are real Hugging Face directories made offline; variants are copies with one file edited,
so each test changes exactly one thing and checks the shape sees it (or rightly ignores it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import edit_index, run_cli

from sllm_plugin.format import FormatError, convert, read_index_file
from sllm_plugin.format.index import EngineInfo
from sllm_plugin.format.shape import (
    ENGINE_ARG_FIELDS,
    IDENTITY_FIELDS,
    METADATA_KEY,
    METADATA_VERSION_KEY,
    checkpoint_shape,
    engine_shape,
    explain_mismatch,
    shape_of_files,
    stored_shape,
)
from sllm_plugin.format.writer import CheckpointWriter


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two "fine-tunes" of one shape (seeds 0 and 1) and one model with 4 layers, converted."""
    from sllm_plugin.testing import make_random_model

    base = tmp_path_factory.mktemp("shape")
    out = {}
    for name, kw in (("a", dict(seed=0)), ("b", dict(seed=1)),
                     ("deep", dict(seed=0, num_hidden_layers=4))):
        hf = make_random_model(base / f"hf-{name}", "tiny-llama", **kw)
        out[f"hf-{name}"] = hf
        out[name] = convert(hf, base / name, quiet=True)
    return out


def variant(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of checkpoint `src` with file `name` passed through `edit(text) -> text`."""
    shutil.copytree(src, dst)
    path = dst / name
    path.write_text(edit(path.read_text() if path.exists() else ""))
    return dst


def edit_json(**changes):
    def edit(text: str) -> str:
        raw = json.loads(text)
        raw.update(changes)
        return json.dumps(raw, indent=2)
    return edit


def test_two_finetunes_share_a_shape(models):
    a, b = checkpoint_shape(models["a"]), checkpoint_shape(models["b"])
    # different weights (the checksums of the same tensor differ)...
    ta = {t.name: t.checksum for t in read_index_file(models["a"]).tensors}
    tb = {t.name: t.checksum for t in read_index_file(models["b"]).tensors}
    assert ta.keys() == tb.keys() and ta != tb
    # ...one shape
    assert a.digest == b.digest and len(a.digest) == 64
    assert explain_mismatch(a, b) == []
    assert a.components["dtype"] == "bfloat16"
    assert a.components["config"]["num_hidden_layers"] == 2
    assert a.components["chat_template"] is not None
    assert "tokenizer.json" in a.components["tokenizer"]


def test_a_config_field_changes_the_shape(models, tmp_path):
    a, deep = checkpoint_shape(models["a"]), checkpoint_shape(models["deep"])
    assert a.digest != deep.digest
    assert explain_mismatch(a, deep) == ["config field num_hidden_layers: 2 != 4"]

    def rope(text: str) -> str:
        raw = json.loads(text)
        raw["rope_parameters"]["rope_theta"] = 500000.0
        return json.dumps(raw)

    r = checkpoint_shape(variant(models["a"], tmp_path / "rope", "config.json", rope))
    assert r.digest != a.digest
    assert explain_mismatch(a, r) == [
        'config field rope_parameters: {"rope_theta": 10000.0, "rope_type": "default"} != '
        '{"rope_theta": 500000.0, "rope_type": "default"}'
    ]


def test_identity_fields_do_not_change_the_shape(models, tmp_path):
    assert set(IDENTITY_FIELDS) == {"_name_or_path", "_commit_hash", "transformers_version"}
    ident = dict(_name_or_path="/home/someone/ft-7", _commit_hash="0" * 40,
                 transformers_version="4.0.0")
    v = variant(models["a"], tmp_path / "v", "config.json", edit_json(**ident))
    (v / "generation_config.json").write_text(
        edit_json(transformers_version="4.0.0")((v / "generation_config.json").read_text()))
    (v / "tokenizer_config.json").write_text(
        edit_json(name_or_path="someone/ft-7")((v / "tokenizer_config.json").read_text()))
    assert checkpoint_shape(v).digest == checkpoint_shape(models["a"]).digest
    # and the same edit to a field that is not identity does change it
    w = variant(models["a"], tmp_path / "w", "config.json", edit_json(use_cache=False))
    assert explain_mismatch(checkpoint_shape(models["a"]), checkpoint_shape(w)) == [
        "config field use_cache: true != false"]


def test_a_tokenizer_change_changes_the_shape(models, tmp_path):
    a = checkpoint_shape(models["a"])

    def swap_two_tokens(text: str) -> str:
        raw = json.loads(text)
        vocab = raw["model"]["vocab"]
        (k1, i1), (k2, i2) = list(vocab.items())[10:12]
        vocab[k1], vocab[k2] = i2, i1
        return json.dumps(raw)

    t = checkpoint_shape(variant(models["a"], tmp_path / "t", "tokenizer.json", swap_two_tokens))
    assert t.digest != a.digest
    assert explain_mismatch(a, t) == ["tokenizer files differ: tokenizer.json"]
    # a tokenizer file that only one of them has
    s = checkpoint_shape(variant(models["a"], tmp_path / "s", "special_tokens_map.json",
                                 lambda _: '{"bos_token": "<s>"}'))
    assert explain_mismatch(a, s) == ["tokenizer files differ: special_tokens_map.json"]
    # a tokenizer_config field
    c = checkpoint_shape(variant(models["a"], tmp_path / "c", "tokenizer_config.json",
                                 edit_json(eos_token="<pad>")))
    assert explain_mismatch(a, c) == ["tokenizer files differ: tokenizer_config.json"]


def test_a_chat_template_change_changes_the_shape(models, tmp_path):
    a = checkpoint_shape(models["a"])
    j = checkpoint_shape(variant(models["a"], tmp_path / "j", "chat_template.jinja",
                                 lambda text: text.replace("<|assistant|>", "<|bot|>")))
    assert explain_mismatch(a, j) == ["chat template differs"]
    # a template kept in tokenizer_config.json counts as a template, not as a tokenizer file
    k = variant(models["a"], tmp_path / "k", "tokenizer_config.json", edit_json(chat_template="x"))
    k2 = variant(k, tmp_path / "k2", "tokenizer_config.json", edit_json(chat_template="y"))
    assert explain_mismatch(checkpoint_shape(k), checkpoint_shape(k2)) == ["chat template differs"]


def test_generation_defaults_change_the_shape(models, tmp_path):
    a = checkpoint_shape(models["a"])
    g = checkpoint_shape(variant(models["a"], tmp_path / "g", "generation_config.json",
                                 edit_json(temperature=0.6)))
    assert explain_mismatch(a, g) == ["generation_config field temperature only in the second"]


def test_conversion_stores_the_shape_recomputation_agrees(models):
    for name in ("a", "b", "deep"):
        index = read_index_file(models[name])
        assert index.metadata[METADATA_VERSION_KEY] == "1"
        assert stored_shape(index) == checkpoint_shape(models[name]).digest
    # the source model directory (same files, same dtypes) has that shape too
    hf = shape_of_files(models["hf-a"], {"bfloat16"})
    assert hf.digest == read_index_file(models["a"]).metadata[METADATA_KEY]


def test_inspect_shows_the_shape(models, tmp_path):
    digest = checkpoint_shape(models["a"]).digest
    r = run_cli("inspect", str(models["a"]))
    assert r.returncode == 0, r.stderr
    assert f"engine shape: {digest[:16]} (stored)" in r.stdout
    # an older checkpoint without the key: computed from the files
    old = shutil.copytree(models["a"], tmp_path / "old")
    edit_index(old, lambda raw: raw["metadata"].clear())
    r = run_cli("inspect", str(old))
    assert f"engine shape: {digest[:16]} (computed)" in r.stdout
    # a stored value the files no longer give: the files win, and inspect says so
    stale = shutil.copytree(models["a"], tmp_path / "stale")
    edit_index(stale, lambda raw: raw["metadata"].update({METADATA_KEY: "ab" * 32}))
    r = run_cli("inspect", str(stale))
    assert f"engine shape: {digest[:16]} (computed; the index records abababababababab" in r.stdout


@pytest.mark.parametrize("metadata, problem", [
    ({METADATA_KEY: "zz" * 32, METADATA_VERSION_KEY: "1"}, "not a SHA-256 hex digest"),
    ({METADATA_KEY: "ab" * 31, METADATA_VERSION_KEY: "1"}, "not a SHA-256 hex digest"),
    ({METADATA_KEY: "AB" * 32, METADATA_VERSION_KEY: "1"}, "not a SHA-256 hex digest"),
    ({METADATA_KEY: "ab" * 32, METADATA_VERSION_KEY: None}, "only one of"),
    ({METADATA_KEY: "ab" * 32, METADATA_VERSION_KEY: "one"}, "not a version number"),
])
def test_hostile_metadata_is_refused(models, tmp_path, metadata, problem):
    bad = shutil.copytree(models["a"], tmp_path / "bad")

    def edit(raw):
        raw["metadata"].update(metadata)
        raw["metadata"] = {k: v for k, v in raw["metadata"].items() if v is not None}

    edit_index(bad, edit)
    with pytest.raises(FormatError, match=problem):
        stored_shape(read_index_file(bad), str(bad))
    r = run_cli("inspect", str(bad))
    assert r.returncode == 1 and problem in r.stderr and "engine_shape" in r.stderr


def test_a_stored_shape_of_another_version_is_not_compared(models, tmp_path):
    other = shutil.copytree(models["a"], tmp_path / "v2")
    edit_index(other, lambda raw: raw["metadata"].update({METADATA_VERSION_KEY: "2"}))
    assert stored_shape(read_index_file(other)) is None


def test_hostile_model_files_are_refused(models, tmp_path):
    link = shutil.copytree(models["a"], tmp_path / "link")
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    os.unlink(link / "config.json")
    os.symlink(outside, link / "config.json")
    with pytest.raises(FormatError, match="config.json: model config .*outside"):
        checkpoint_shape(link)
    broken = variant(models["a"], tmp_path / "broken", "config.json", lambda _: "{not json")
    with pytest.raises(FormatError, match="config.json: model config is not valid JSON"):
        checkpoint_shape(broken)
    fifo = shutil.copytree(models["a"], tmp_path / "fifo")
    os.mkfifo(fifo / "tokenizer.model")
    with pytest.raises(FormatError, match="tokenizer.model: tokenizer file is not a regular"):
        checkpoint_shape(fifo)


def test_engine_layout_uses_the_engine_dtype(models, tmp_path):
    """An engine checkpoint keeps the model files at its top and the engine facts per rank."""
    top = tmp_path / "engine"
    top.mkdir()
    for f in models["a"].iterdir():
        if f.suffix == ".json" and f.name != "sllm-index.json" or f.suffix == ".jinja":
            shutil.copy(f, top / f.name)
    with CheckpointWriter(top / "rank-00000", layout="engine",
                          engine=EngineInfo(engine_version="0.32.0", tensor_parallel_size=1,
                                            rank=0, dtype="float16")) as w:
        w.add_tensor("w", "float32", [4], [bytes(16)])
        w.commit()
    e = checkpoint_shape(top)
    assert e.components["dtype"] == "float16"
    assert explain_mismatch(checkpoint_shape(models["a"]), e) == ["dtype bfloat16 != float16"]
    # save-vllm records it in the rank index once the side files are staged
    from sllm_plugin.format.reader import open_model_checkpoints
    from sllm_plugin.vllm.save import record_shape

    assert stored_shape(read_index_file(top / "rank-00000")) is None
    record_shape(top, 1)
    [rank0] = open_model_checkpoints(top)
    assert stored_shape(rank0.index) == e.digest == checkpoint_shape(top).digest
    assert not [p for p in top.rglob("*.new")], "the temporary index was left behind"
    # one rank directory on its own (what `sllm inspect` is given): the same shape
    assert checkpoint_shape(top / "rank-00000").digest == e.digest
    r = run_cli("inspect", str(top / "rank-00000"))
    assert f"engine shape: {e.digest[:16]} (stored)" in r.stdout, r.stdout + r.stderr


def test_engine_shape():
    d = checkpoint_shape_digest = "ab" * 32
    args = {"max_model_len": 2048, "tensor_parallel_size": 1, "dtype": "bfloat16",
            "enforce_eager": True, "gpu_memory_utilization": 0.9}
    key = engine_shape(checkpoint_shape_digest, "0.32.0", args)
    assert len(key) == 64
    assert engine_shape(d, "0.32.0", dict(args)) == key
    # CLI spelling, and arguments that do not shape the engine (names, ports, keys) are ignored
    same = {"max-model-len": 2048, **{k: v for k, v in args.items() if k != "max_model_len"},
            "port": 8001, "served_model_name": "x", "api_key": "secret", "load_format": "dummy"}
    assert engine_shape(d, "0.32.0", same) == key
    assert engine_shape("cd" * 32, "0.32.0", args) != key
    assert engine_shape(d, "0.33.0", args) != key
    for field, value in [("max_model_len", 4096), ("tensor_parallel_size", 2),
                         ("dtype", "float16"), ("enforce_eager", False),
                         ("gpu_memory_utilization", 0.5), ("kv_cache_dtype", "fp8"),
                         ("block_size", 32), ("max_num_seqs", 8),
                         ("max_num_batched_tokens", 4096), ("quantization", "fp8"),
                         ("enable_prefix_caching", False), ("kv_cache_memory_bytes", 1 << 30)]:
        assert field in ENGINE_ARG_FIELDS
        assert engine_shape(d, "0.32.0", {**args, field: value}) != key, field
    with pytest.raises(ValueError, match="not a checkpoint shape digest"):
        engine_shape("ab" * 31, "0.32.0", args)
    with pytest.raises(ValueError, match="JSON values"):
        engine_shape(d, "0.32.0", {"dtype": object()})
