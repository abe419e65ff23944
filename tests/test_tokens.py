"""Token files: made private and exclusive, read only when private, never through a link."""

from __future__ import annotations

import os
import stat

import pytest

from sllm_plugin.tokens import (
    TokenError,
    ensure_node_token,
    local_node_token,
    read_token_file,
    token_from,
)


def test_a_node_token_is_made_once_private_and_found_again(tmp_path):
    token, path = ensure_node_token(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 32
    again, _ = ensure_node_token(tmp_path)
    assert again == token == local_node_token(tmp_path) == read_token_file(path)
    assert local_node_token(tmp_path / "nothing-here") is None


def test_unsafe_token_files_are_refused_with_the_reason(tmp_path):
    loose = tmp_path / "loose"
    loose.write_text("a" * 32)
    loose.chmod(0o644)
    with pytest.raises(TokenError, match="readable or writable by others"):
        read_token_file(loose)
    secret = tmp_path / "secret"
    secret.write_text("b" * 32)
    secret.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(TokenError, match="symbolic link"):
        read_token_file(link)
    (tmp_path / "short").write_text("abc")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(TokenError, match="16 to"):
        read_token_file(tmp_path / "short")


def test_a_planted_link_is_never_written_through(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "token").symlink_to(target)
    with pytest.raises(TokenError):
        ensure_node_token(tmp_path)
    assert target.read_text() == "keep"


def test_token_from_prefers_the_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SLLM_TEST_TOKEN", "  " + "e" * 20 + "\n")
    assert token_from(None, "SLLM_TEST_TOKEN") == "e" * 20
    f = tmp_path / "t"
    f.write_text("f" * 20)
    os.chmod(f, 0o600)
    assert token_from(f, "SLLM_TEST_TOKEN") == "f" * 20
    monkeypatch.delenv("SLLM_TEST_TOKEN")
    assert token_from(None, "SLLM_TEST_TOKEN") is None
