"""What one call and one client may ask (deployments/limits.py), and bodies no parser may answer with a 500
(deployments/openai_api.py), checked without Ray."""

from __future__ import annotations

import json

import pytest

from deployments.auth import ApiKey, Client
from deployments.limits import CallLimits, ClientQuota, Gate
from deployments.openai_api import ApiError, parse_body
from deployments.openai_requests import ChatRequest, CompletionRequest
from deployments.protocol import GenerateRequest
from deployments.settings import AppSettings
from qllm_core import PriorityClass
from qllm_core.errors import PromptTooLongError
from qllm_core.params import MAX_STOP_TOKEN_IDS

LS = PriorityClass.LATENCY_SENSITIVE


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"prompt": "a", "max_tokens": ' + b"1" * 5000 + b"}", "4300 digits"),
        (b'{"prompt": "a", "temperature": NaN}', "NaN"),
        (b'{"prompt": "a", "temperature": -Infinity}', "Infinity"),
        (b'{"prompt": "a", "temperature": 1e999}', "finite"),
        (b'{"prompt": "a", "ttft_deadline_ms": 1e999}', "finite"),
    ],
)
def test_a_body_python_cannot_read_is_a_400_not_a_500(body: bytes, says: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_body(body, CompletionRequest)
    assert err.value.status == 400
    assert says in err.value.message


def test_a_deeply_nested_field_value_is_a_400() -> None:
    body = b'{"messages": [{"role": "user", "content": "x"}], "tools": ' + b"[" * 900 + b"]" * 900 + b"}"
    with pytest.raises(ApiError) as err:
        parse_body(body, ChatRequest)
    assert (err.value.status, err.value.param) == (400, "tools")


def _request(body: bytes) -> GenerateRequest:
    return parse_body(body, CompletionRequest).to_request("cmpl-1", LS, None)


def test_a_call_over_the_token_budget_is_a_413_at_the_ingress() -> None:
    gate = Gate(AppSettings(max_call_tokens=1000), None)
    fits = _request(b'{"prompt": [1, 2, 3], "n": 4, "max_tokens": 246}')
    gate.admit(Client("anonymous"), fits)  # 4 x (3 + 246) = 996
    over = _request(b'{"prompt": [1, 2, 3], "n": 4, "max_tokens": 248}')
    with pytest.raises(ApiError) as err:
        gate.admit(Client("anonymous"), over)  # 4 x (3 + 248) = 1004
    assert (err.value.status, err.value.param, err.value.code) == (413, "max_tokens", "call_too_large")
    assert "1004" in err.value.message and "1000" in err.value.message


def test_a_max_tokens_of_4300_digits_is_a_413_not_a_500() -> None:
    # Python reads an int of 4300 digits, but refuses to write the 4301-digit cost it leads to.
    over = _request(b'{"prompt": "a", "max_tokens": ' + b"9" * 4300 + b"}")
    with pytest.raises(ApiError) as err:
        Gate(AppSettings(), None).admit(Client("anonymous"), over)
    assert err.value.status == 413 and "more than 10^18" in err.value.message


def test_the_replica_checks_the_budget_on_exact_token_counts() -> None:
    limits = CallLimits(max_call_tokens=100, max_prompt_logprob_tokens=50)
    request = _request(b'{"prompt": ["a", "b"], "n": 2, "max_tokens": 10}')
    limits.check(request, [15, 15])  # 2 x (25 + 25) = 100
    with pytest.raises(PromptTooLongError, match="102"):
        limits.check(request, [15, 16])


def test_echo_with_logprobs_is_bounded_in_prompt_tokens() -> None:
    limits = CallLimits(max_call_tokens=10_000, max_prompt_logprob_tokens=50)
    request = _request(b'{"prompt": "a", "n": 2, "max_tokens": 1, "echo": true, "logprobs": 0}')
    limits.check(request, [25])
    with pytest.raises(PromptTooLongError) as err:
        limits.check(request, [26])
    assert err.value.param == "echo"


def test_a_client_over_its_sequences_in_flight_gets_a_429_until_its_calls_end() -> None:
    quota = ClientQuota(max_sequences=8)
    quota.acquire("key-1", 6)
    quota.acquire("key-2", 8)  # another client is counted apart
    with pytest.raises(ApiError) as err:
        quota.acquire("key-1", 3)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    quota.release("key-1", 6)
    quota.acquire("key-1", 8)
    assert quota.in_flight("key-1") == 8


def test_the_gate_counts_sequences_per_key_and_not_for_an_open_api() -> None:
    keys = (ApiKey("a", Client("key-1")),)
    gate = Gate(AppSettings(max_sequences_per_key=4), keys)
    client = gate.client("Bearer a")
    call = _request(b'{"prompt": ["x", "y"], "n": 2, "max_tokens": 1}')
    gate.admit(client, call)
    with pytest.raises(ApiError, match="4 sequences in flight"):
        gate.admit(client, call)
    gate.release(client, call)
    gate.admit(client, call)
    with pytest.raises(ApiError) as err:
        gate.client("Bearer b")
    assert err.value.status == 401
    open_gate = Gate(AppSettings(max_sequences_per_key=4), None)
    for _ in range(3):
        open_gate.admit(open_gate.client(None), call)


def test_a_best_effort_key_defaults_to_be_and_is_refused_ls() -> None:
    gate = Gate(AppSettings(), (ApiKey("b", Client("key-1", best_effort_only=True)),))
    client = gate.client("Bearer b")
    assert gate.priority(client, None) is PriorityClass.BEST_EFFORT
    assert gate.priority(client, "be") is PriorityClass.BEST_EFFORT
    with pytest.raises(ApiError) as err:
        gate.priority(client, "ls")
    assert (err.value.status, err.value.param) == (403, "priority")


def test_a_deadline_below_the_floor_is_a_400() -> None:
    gate = Gate(AppSettings(min_ttft_deadline_ms=100.0), None)
    assert gate.deadline_s(250.0) == 0.25
    assert gate.deadline_s(None) is None
    with pytest.raises(ApiError) as err:
        gate.deadline_s(1e-300)
    assert (err.value.status, err.value.param) == (400, "ttft_deadline_ms")


def test_stop_token_ids_are_bounded_in_count() -> None:
    fits = json.dumps({"prompt": "a", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))}).encode()
    assert len(_request(fits).params.stop_token_ids) == MAX_STOP_TOKEN_IDS
    over = json.dumps({"prompt": "a", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}).encode()
    with pytest.raises(ApiError) as err:
        _request(over)
    assert (err.value.status, err.value.param) == (400, "stop_token_ids")
