"""API key loading and checking (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.auth import KEY_ENV, KEY_FILE_ENV, authorized, load_api_key
from qllm_core import ConfigError


def test_no_key_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_api_key() is None


def test_key_from_environment_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "s3cret")
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_api_key() == "s3cret"
    monkeypatch.delenv(KEY_ENV)
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(secret))
    assert load_api_key() == "from-file"


@pytest.mark.parametrize("content", [None, ""])
def test_unreadable_or_empty_key_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    with pytest.raises(ConfigError, match="API key file"):
        load_api_key()


def test_bearer_check() -> None:
    assert authorized("Bearer abc", "abc")
    assert not authorized("Bearer abd", "abc")
    assert not authorized("abc", "abc")
    assert not authorized(None, "abc")
    assert not authorized("Basic abc", "abc")
