"""The README as a new user copies it: every `sllm` command line it shows parses, every curl
that sends a body says it is JSON, the configuration it shows is valid, and the commands the
quickstart prints run as printed. (That the commands also *work* is checked by running them:
scripts/demo.sh, and the note of each issue that changes them.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[list[str]]:
    """Each command of the README's bash blocks as words: comments dropped, continuation
    lines and quotes over several lines joined, `&` and `VAR=value` prefixes removed."""
    commands = []
    for block in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        pending = ""
        for line in joined.splitlines():
            pending += line + "\n"
            try:  # a quoted string may go on over the next line
                words = shlex.split(pending, comments=True)
            except ValueError:
                continue
            pending = ""
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words = words[1:]
            if words and words[-1] == "&":
                words = words[:-1]
            if words:
                commands.append(words)
    return commands


SLLM_COMMANDS = [c for c in shell_commands() if c[0] == "sllm"]


def test_the_readme_shows_sllm_commands():
    assert {c[1] for c in SLLM_COMMANDS} >= {"convert", "inspect", "verify", "bench", "node",
                                             "router", "save-vllm"}


@pytest.mark.parametrize("command", SLLM_COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_every_sllm_command_line_in_the_readme_parses(command):
    """A flag the CLI does not take (or refuses, such as a token on the command line) fails
    here, not in a new user's shell."""
    from sllm_plugin.cli import build_parser

    try:
        build_parser().parse_args(command[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(command)}` does not parse (exit {e.code})")


def test_curl_calls_with_a_body_send_json_and_mutating_ones_a_token():
    curls = [c for c in shell_commands() if c[0] == "curl"]
    assert curls
    for c in curls:
        if any(w in ("-d", "--data", "--json") for w in c):
            assert "--json" in c or "Content-Type: application/json" in c, shlex.join(c)
        if any(w in ("-d", "--data", "--json", "-X") for w in c) and ":8073" in " ".join(c):
            assert any(w.startswith("Authorization: Bearer") for w in c), shlex.join(c)


def test_package_removals_do_not_stop_to_ask():
    removals = [c for c in shell_commands() if c[:2] == ["pip", "uninstall"]]
    assert removals and all("-y" in c for c in removals)


def test_vllm_on_cpu_is_shown_with_a_kv_cache_size():
    """vLLM's CPU default (0.92 of the NUMA node's memory) fails on a machine whose node is
    smaller than its memory; the command shown must size the KV cache."""
    cpu = [b for b in blocks("bash") if "vllm.entrypoints.openai.api_server" in b]
    assert cpu and all("VLLM_CPU_KVCACHE_SPACE=" in b or "--kv-cache-memory-bytes" in b
                       for b in cpu)


def test_the_node_configuration_shown_is_valid(tmp_path):
    from sllm_plugin.store.config import load_config

    (node_yaml,) = [b for b in blocks("yaml") if "replica_command" in b]
    path = tmp_path / "node.yaml"
    path.write_text(node_yaml)
    config = load_config(path)
    assert config.fetch.deadline_s == 3600 and config.models["org/model"].source == "org/model"
    assert yaml.safe_load(node_yaml)["token_file"] is None


def test_the_license_is_an_spdx_expression():
    # (tomllib is 3.11+; the project supports 3.10)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2\.0"$', pyproject, flags=re.M)
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_the_quickstarts_printed_commands_run_as_printed(tmp_path):
    """What examples/quickstart.py prints before each step is a command a fresh shell in the
    same directory runs: the printed `sllm inspect` line is run here through a shell."""
    ckpt = tmp_path / "ckpt.sllm"
    import torch

    import sllm_plugin

    sllm_plugin.save_state_dict({"w": torch.arange(8.0)}, ckpt)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quickstart
    finally:
        sys.path.remove(str(ROOT / "examples"))
    line = quickstart.shown([quickstart.venv_bin("sllm"), "inspect", str(ckpt)])
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}  # no venv active
    done = subprocess.run(line, shell=True, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and "sllm format v1" in done.stdout, (line, done.stderr)
    vllm_line = quickstart.shown([quickstart.venv_bin("python"), "-m", "vllm"],
                                 quickstart.CPU_ENV)
    assert vllm_line.startswith("VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 ")
