"""API keys: loading them, telling clients apart by them, keys restricted to best-effort work (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.auth import KEY_ENV, KEY_FILE_ENV, ApiKey, Client, identify, load_api_keys
from qllm_core import ConfigError


def test_no_key_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_api_keys() is None


def test_key_from_environment_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "s3cret")
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_api_keys() == (ApiKey("s3cret", Client("key-1")),)
    monkeypatch.delenv(KEY_ENV)
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(secret))
    assert load_api_keys() == (ApiKey("from-file", Client("key-1")),)


def test_a_key_file_holds_several_keys_and_may_restrict_one_to_best_effort(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    path = tmp_path / "keys"
    path.write_text("# team keys\nalpha\n\nbravo best_effort\n")
    keys = load_api_keys(str(path))
    assert keys is not None
    assert identify("Bearer alpha", keys) == Client("key-1")
    assert identify("Bearer bravo", keys) == Client("key-2", best_effort_only=True)
    assert identify("Bearer charlie", keys) is None


def test_a_key_line_with_an_unknown_flag_is_refused_without_quoting_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "keys"
    path.write_text("s3cret-value admin\n")
    with pytest.raises(ConfigError, match="key 1") as err:
        load_api_keys(str(path))
    assert "s3cret-value" not in str(err.value)


@pytest.mark.parametrize("content", [None, "", "# only a comment\n"])
def test_unreadable_or_empty_key_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    with pytest.raises(ConfigError, match="API key file"):
        load_api_keys()


def test_bearer_check() -> None:
    keys = (ApiKey("abc", Client("key-1")),)
    assert identify("Bearer abc", keys) == Client("key-1")
    assert identify("Bearer abd", keys) is None
    assert identify("abc", keys) is None
    assert identify(None, keys) is None
    assert identify("Basic abc", keys) is None
