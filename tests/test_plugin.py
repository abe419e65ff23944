"""The plugin's registration and the auto-conversion cache, without starting a server."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from conftest import assert_bit_equal

from sllm_plugin import load_state_dict


def test_entry_point_is_registered_for_vllm():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("sllm") == "sllm_plugin.vllm:register"


def python_words(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; the words it printed."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_the_package_and_registering_is_cheap():
    """vLLM runs the plugin in every process: no torch, no vLLM model-loader import."""
    assert python_words(
        "import sys, sllm_plugin, sllm_plugin.vllm as p; p.register(); p.register(); "
        "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules), "
        "'vllm.model_executor.model_loader' in sys.modules)"
    ) == ["False", "False"]


def test_the_light_serve_module_imports_nothing_until_run():
    """`python -m sllm_plugin.vllm.serve`: vLLM's spawned engine core and worker import the
    main module again (as __mp_main__); importing it must not pull in vLLM or torch."""
    assert python_words(
        "import sys, sllm_plugin.vllm.serve; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'fastapi'}))"
    ) == ["[]"]


def test_registration_happens_when_vllm_imports_its_loaders():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    assert python_words(
        "import sllm_plugin.vllm as p; p.register(); "
        "from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as r; "
        "p.register(); print(r['sllm'].__module__, r['sllm'].__name__)"
    ) == ["sllm_plugin.vllm.loader", "SllmModelLoader"]


_RESOLVE = """
import json, sys
from pathlib import Path
from sllm_plugin.vllm.resolve import resolve_checkpoint
r = resolve_checkpoint(sys.argv[1], None, Path(sys.argv[2]))
print(json.dumps({"path": str(r.path), "layout": r.layout, "converted": r.converted}))
"""


def test_concurrent_starts_convert_once(tiny_model, tiny_model_state, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _RESOLVE, str(tiny_model), str(cache)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({r["path"] for r in results}) == 1
    assert sum(r["converted"] for r in results) == 1
    assert_bit_equal(tiny_model_state, load_state_dict(results[0]["path"], verify=True))
    entries = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in cache.iterdir() if ".sllm-tmp-" in p.name]


def test_changed_model_is_converted_again(tmp_path):
    from sllm_plugin.testing import make_random_model
    from sllm_plugin.vllm.resolve import resolve_checkpoint

    model = make_random_model(tmp_path / "m", "tiny-llama", seed=3)
    first = resolve_checkpoint(str(model), None, tmp_path / "cache")
    again = resolve_checkpoint(str(model), None, tmp_path / "cache")
    assert first.converted and not again.converted and first.path == again.path
    make_random_model(tmp_path / "m", "tiny-llama", seed=4)  # new weights, same path
    changed = resolve_checkpoint(str(model), None, tmp_path / "cache")
    assert changed.converted and changed.path != first.path


def test_options_validate_values():
    from sllm_plugin.vllm.options import LoaderOptions

    with pytest.raises(ValueError, match="chunk_size must be a multiple of 4096"):
        LoaderOptions.parse({"chunk_size": 5000})
    with pytest.raises(ValueError, match="threads"):
        LoaderOptions.parse({"threads": 0})
    assert LoaderOptions.parse(None).verify is False
