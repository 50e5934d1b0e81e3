"""Optional API keys: from $QLLM_API_KEY (one key), or a file (a mounted secret) named by $QLLM_API_KEY_FILE or
the `api_key_file` setting. The keys themselves are never part of the configuration.

The file holds one key a line (blank lines and `#` comments are skipped); a key followed by ` best_effort` is
a client only ever served as best-effort work: its requests default to BE and an LS request is refused (403).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from qllm_core.errors import ConfigError

KEY_ENV = "QLLM_API_KEY"
KEY_FILE_ENV = "QLLM_API_KEY_FILE"
BEST_EFFORT_ONLY = "best_effort"
"""The word after a key in the key file that restricts it to best-effort work."""


@dataclass(frozen=True)
class Client:
    """Who a request comes from, as far as its key tells."""

    name: str
    """`key-N` (N: the key's line among the keys): what per-client limits count by; never the key itself."""
    best_effort_only: bool = False


@dataclass(frozen=True)
class ApiKey:
    """One accepted key and the client it names."""

    secret: str
    client: Client


def load_api_keys(key_file: str | None = None) -> tuple[ApiKey, ...] | None:
    """The configured keys, or None when the API is open. A named but unreadable or keyless file is an error."""
    key = os.environ.get(KEY_ENV)
    path = os.environ.get(KEY_FILE_ENV) or key_file
    if key and path:
        raise ConfigError(f"set only one of {KEY_ENV} and a key file ({KEY_FILE_ENV} or api_key_file)")
    if key:
        return (ApiKey(key.strip(), Client("key-1")),)
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"API key file {path!r} cannot be read: {exc.strerror}") from None
    keys = tuple(_key_line(line, len_before, path) for len_before, line in enumerate(_lines(text)))
    if not keys:
        raise ConfigError(f"API key file {path!r} is empty")
    return keys


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _key_line(line: str, index: int, path: str) -> ApiKey:
    secret, *flags = line.split()
    if flags not in ([], [BEST_EFFORT_ONLY]):
        # The line's content is a secret: name its position, never its text.
        raise ConfigError(f"API key file {path!r}, key {index + 1}: only {BEST_EFFORT_ONLY!r} may follow a key")
    return ApiKey(secret, Client(f"key-{index + 1}", best_effort_only=bool(flags)))


def identify(header: str | None, keys: tuple[ApiKey, ...]) -> Client | None:
    """The client whose key `Authorization: Bearer <key>` carries, or None. Every key is compared, each in
    constant time, so the answer's timing does not tell which key came close."""
    if not header or not header.startswith("Bearer "):
        return None
    given = header[len("Bearer ") :].strip().encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.secret.encode()):
            found = key.client
    return found
