"""The OpenAI-compatible API over real HTTP, and the official `openai` client against it."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from deployments.settings import AppSettings
from tests.deployments.conftest import APP_ARGS
from tests.deployments.logs import every_log_text, serve_log_lines

pytestmark = pytest.mark.integration


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_completion_non_streaming_with_usage(serve_app: str) -> None:
    r = httpx.post(
        f"{serve_app}/v1/completions",
        json={"model": "qllm-tiny", "prompt": "hello", "max_tokens": 7, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7 and body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


def test_greedy_completion_is_deterministic_across_replicas(serve_app: str) -> None:
    req = {"prompt": "the same prompt", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    texts = {
        httpx.post(f"{serve_app}/v1/completions", json=req, timeout=60).json()["choices"][0]["text"] for _ in range(6)
    }
    assert len(texts) == 1


def test_completion_streaming_ends_with_done(serve_app: str) -> None:
    req = {
        "prompt": [5, 6, 7],
        "max_tokens": 5,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{serve_app}/v1/completions", json=req, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_applies_the_template_streaming_and_not(serve_app: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = httpx.post(
        f"{serve_app}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4, "ignore_eos": True, "temperature": 0},
        timeout=60,
    )
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["role"] == "assistant"
    # The template wraps each turn in <|im_start|>role ... <|im_end|>: far more tokens than the raw text.
    assert body["usage"]["prompt_tokens"] > 10
    with httpx.stream(
        "POST",
        f"{serve_app}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4, "stream": True, "ignore_eos": True, "temperature": 0},
        timeout=60,
    ) as s:
        events = sse_events(s)
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    # Greedy: the stream's deltas add up to the whole answer, token for token.
    assert text == body["choices"][0]["message"]["content"], (text, body)


def test_official_openai_client(serve_app: str) -> None:
    client = openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["qllm-tiny"]
    completion = client.completions.create(
        model="qllm-tiny", prompt="hi", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="qllm-tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        extra_body={"priority": "be", "ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_priority_from_header_and_body(serve_app: str) -> None:
    for kwargs in ({"headers": {"x-qllm-priority": "be"}}, {"json_extra": {"priority": "latency_sensitive"}}):
        body = {"prompt": "x", "max_tokens": 2, **kwargs.get("json_extra", {})}
        r = httpx.post(f"{serve_app}/v1/completions", json=body, headers=kwargs.get("headers"), timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
        (b'{"prompt": "x", "temperature": 9}', 400, "temperature"),
        (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": ""}', 400, "prompt"),
        (b'{"prompt": "x", "priority": "urgent"}', 400, "priority"),
        (b'{"prompt": "x", "bogus_field": 1}', 400, "bogus_field"),
        (b'{"prompt": "x", "n": 0}', 400, "n"),
        (b'{"prompt": "x", "presence_penalty": 5}', 400, "presence_penalty"),
        (b'{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
        (b'{"prompt": "x", "model": "nope"}', 404, "model"),
        (b'{"prompt": [5], "max_tokens": 4096}', 413, "max_tokens"),
        (
            b'{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
            400,
            "stop",
        ),
        (b'{"prompt": "\xff\xfe"}', 400, None),
    ],
)
def test_bad_requests_get_openai_errors(serve_app: str, body: bytes, status: int, param: str | None) -> None:
    r = httpx.post(
        f"{serve_app}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    ok = httpx.post(f"{serve_app}/v1/completions", json={"prompt": "fine", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def _status_before_the_body_ends(base: str, head: bytes, body_start: bytes) -> int:
    """Send the request line, headers and the start of a body, never the rest; the status that comes back.

    A server that waited for the whole body would never answer: the socket's timeout ends the test then.
    """
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(head + body_start)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_a_declared_body_over_the_limit_is_413_before_any_of_it_is_read(serve_app: str) -> None:
    limit = AppSettings.from_dict(APP_ARGS).max_body_bytes
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\n\r\n"
    ).encode()
    assert _status_before_the_body_ends(serve_app, head, b"") == 413


def test_a_streamed_body_is_413_as_soon_as_it_passes_the_limit(serve_app: str) -> None:
    limit = AppSettings.from_dict(APP_ARGS).max_body_bytes
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b'{"prompt": "' + b"x" * limit
    # One chunk past the limit and no last chunk: the body has no end, and no length was declared.
    assert _status_before_the_body_ends(serve_app, head, f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") == 413
    ok = httpx.post(f"{serve_app}/v1/completions", json={"prompt": "fine", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_streamed_text_never_splits_a_character_and_adds_up_to_the_whole_text(serve_app: str) -> None:
    # The tiny model's byte-level tokenizer was trained on ASCII text, so every non-ASCII character it writes
    # spans several tokens. Seeded sampling repeats itself: find a seed whose output has such a character.
    for seed in range(16):
        req = {"prompt": "héllo wörld", "max_tokens": 48, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        whole = httpx.post(f"{serve_app}/v1/completions", json=req, timeout=60).json()["choices"][0]["text"]
        if any(ord(c) > 0x7F and c != "\ufffd" for c in whole):
            break
    else:
        raise AssertionError("no seed gave an output with a non-ASCII character")
    with httpx.stream("POST", f"{serve_app}/v1/completions", json={**req, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    deltas = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    for delta in deltas:
        delta.encode("utf-8")  # strict: a lone surrogate (half a character) would raise
    # The non-streamed text is decoded once from all the tokens: a character split between two deltas
    # would have become U+FFFD in them, and they would not add up to it.
    assert "".join(deltas) == whole


def test_prompt_longer_than_context_is_413(serve_app: str) -> None:
    r = httpx.post(f"{serve_app}/v1/completions", json={"prompt": [5] * 5000, "max_tokens": 1}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"


def test_health_and_models(serve_app: str) -> None:
    assert httpx.get(f"{serve_app}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{serve_app}/v1/models", timeout=10).json()["data"][0]["id"] == "qllm-tiny"
    assert httpx.get(f"{serve_app}/v1/nothing", timeout=10).status_code == 404


def test_client_that_disconnects_has_its_request_aborted_on_the_replica(serve_app: str) -> None:
    from ray import serve

    body = {"prompt": "long one", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{serve_app}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    hung_up_at = time.time()
    # The connection is closed mid-stream. Replicas report every 0.2 s (wall clock in `reported_at`): the
    # first report in which no replica runs anything or holds KV must come within a second of the hang-up.
    router = serve.get_deployment_handle("PriorityRouter", app_name="qllm")
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        loads = [o.load for o in router.stats.remote().result(timeout_s=10).replicas.values()]
        if loads and all(x.kv_usage == 0 and x.ls.running + x.be.running == 0 for x in loads):
            assert max(x.reported_at for x in loads) - hung_up_at <= 1.0, loads
            return
        time.sleep(0.1)
    raise AssertionError(f"the abandoned request still holds resources: {loads}")


def test_request_log_line_has_id_class_and_timings_but_no_prompt(serve_app: str) -> None:
    prompt = "do-not-log-this-prompt"
    r = httpx.post(
        f"{serve_app}/v1/completions",
        json={"prompt": prompt, "max_tokens": 3, "priority": "ls", "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    lines = serve_log_lines("qllm", r.json()["id"])
    assert len(lines) == 1, lines
    fields = dict(part.split("=", 1) for part in lines[0].split("qllm request ", 1)[1].split())
    assert fields["class"] == "latency_sensitive" and fields["status"] == "200" and fields["completion_tokens"] == "3"
    assert float(fields["ttft_ms"]) > 0 and float(fields["total_ms"]) >= float(fields["ttft_ms"])
    assert float(fields["engine_ttft_ms"]) > 0 and fields["replica"] != "-"
    assert prompt not in every_log_text()
