"""Optional API key: from $QLLM_API_KEY, or a file (a mounted secret) named by $QLLM_API_KEY_FILE or the
`api_key_file` setting. The key itself is never part of the configuration."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from qllm_core.errors import ConfigError

KEY_ENV = "QLLM_API_KEY"
KEY_FILE_ENV = "QLLM_API_KEY_FILE"


def load_api_key(key_file: str | None = None) -> str | None:
    """The configured key, or None when the API is open. A named but unreadable or empty file is an error."""
    key = os.environ.get(KEY_ENV)
    path = os.environ.get(KEY_FILE_ENV) or key_file
    if key and path:
        raise ConfigError(f"set only one of {KEY_ENV} and a key file ({KEY_FILE_ENV} or api_key_file)")
    if path:
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"API key file {path!r} cannot be read: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"API key file {path!r} is empty")
    return key or None


def authorized(header: str | None, key: str) -> bool:
    """True when `Authorization: Bearer <key>` matches, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), key.encode())
