"""Access control on a live app: with a key configured, every route but /health wants `Bearer <key>`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from deployments.app import build_app
from tests.deployments.conftest import APP_ARGS, wait_healthy
from tests.deployments.logs import every_log_text, serve_log_lines

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def locked_app(serve_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second application on the same cluster, one replica, with an API key from a file."""
    key_file = Path(tmp_path_factory.mktemp("secret")) / "api-key"
    key_file.write_text(KEY + "\n")
    args = {**APP_ARGS, "replicas": 1, "api_key_file": str(key_file)}
    serve.run(build_app(args), name="locked", route_prefix="/locked", blocking=False)
    base = f"{serve_app}/locked"
    wait_healthy(base, replicas=1, app="locked")
    yield base
    serve.delete("locked")


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", "Bearer"])
def test_missing_or_wrong_key_is_401_on_every_api_route(locked_app: str, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        r = httpx.request(method, f"{locked_app}{path}", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert KEY not in r.text


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_no_documentation_route_answers_without_the_key(locked_app: str, path: str) -> None:
    # The doc routes are off (they bypass the key check, and the schema would describe no body anyway).
    r = httpx.get(f"{locked_app}{path}", timeout=30)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "not_found_error"


def test_right_key_works_is_not_logged_and_health_needs_none(locked_app: str) -> None:
    assert httpx.get(f"{locked_app}/health", timeout=30).status_code == 200
    r = httpx.post(
        f"{locked_app}/v1/completions",
        json={"prompt": "x", "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # The key is never logged, though the request is.
    assert serve_log_lines("locked", r.json()["id"]), "the request was not logged"
    assert KEY not in every_log_text()
