"""Generated request bodies against the live API: never a 5xx, never a hung connection, always served after.

Bodies mix the API's real fields with unknown ones, values of every JSON type (huge numbers, NaN,
nested structures, odd strings), and raw bytes that are not JSON or not UTF-8. The examples are
derandomized so CI runs the same ones every time; `max_tokens` stays small when it is valid, so the
run is bounded.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "priority",
    "seed",
    "ignore_eos",
    "ttft_deadline_ms",
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "max_completion_tokens",
    "tools",
    "response_format",
    "x-unknown",
]
ROUTES = ["/v1/completions", "/v1/chat/completions"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["ls", "be", "latency_sensitive", "qllm-tiny", "", "\x00", "\ud7ff", "user", "assistant"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "x"]), "text": scalars}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": scalars | parts}
    ),
    max_size=3,
)
# Values that are valid often enough to reach the engine, with a bounded cost when they are.
likely = {
    "prompt": st.text(max_size=30)
    | st.lists(st.integers(min_value=-5, max_value=500), max_size=20)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.lists(st.lists(st.integers(min_value=-5, max_value=500), max_size=5), max_size=3),
    "top_p": st.floats(min_value=-0.5, max_value=1.5),
    "top_k": st.integers(min_value=-2, max_value=50),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "seed": st.integers(min_value=-(2**65), max_value=2**65),
    "ignore_eos": st.booleans(),
    "messages": messages,
    "max_tokens": st.integers(min_value=-3, max_value=12),
    "temperature": st.floats(min_value=-1, max_value=3),
    "stream": st.booleans(),
    "priority": st.sampled_from(["ls", "be", "latency_sensitive", "best_effort", "urgent", ""]),
    # n, prompt lists and log-probabilities fan a call out or enlarge its answer: kept small so it stays cheap
    "n": st.integers(min_value=-1, max_value=3),
    "logprobs": st.booleans() | st.integers(min_value=-1, max_value=25),
    "top_logprobs": st.integers(min_value=-1, max_value=25),
    "echo": st.booleans(),
    "presence_penalty": st.floats(min_value=-3, max_value=3),
    "frequency_penalty": st.floats(min_value=-3, max_value=3),
    "repetition_penalty": st.floats(min_value=-0.5, max_value=3),
}


@st.composite
def bodies(draw: st.DrawFn, route: str) -> bytes:
    kind = draw(st.sampled_from(["served", "served", "object", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {}
    if kind == "served":  # a valid request with a few fields drawn from likely values: reaches the engine
        body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
        for name in draw(st.lists(st.sampled_from(list(likely)), max_size=2, unique=True)):
            body[name] = draw(likely[name])
        body.setdefault("max_tokens", draw(st.integers(min_value=1, max_value=12)))
    else:
        for name in draw(st.lists(st.sampled_from(FIELDS), max_size=7, unique=True)):
            body[name] = draw(likely[name]) if name in likely and draw(st.booleans()) else draw(json_values)
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 12:
        body["max_tokens"] = draw(st.integers(min_value=-3, max_value=12))  # keeps any run that is served short
    return json.dumps(body).encode()  # NaN and Infinity come out as the non-standard tokens on purpose


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_generated_bodies_never_get_a_5xx_or_hang(serve_app: str, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    body = data.draw(bodies(route))
    with (
        httpx.Client(timeout=httpx.Timeout(60.0)) as client,
        client.stream("POST", f"{serve_app}{route}", content=body, headers={"content-type": "application/json"}) as r,
    ):
        text = r.read().decode(errors="replace")  # a hung connection fails here, on the timeout
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows how many reached the engine
    assert r.status_code < 500, (r.status_code, body, text)
    if r.status_code >= 400:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"], text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]"), text
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
        # A 200 stream that carries an error event failed as surely as a 5xx (the replica failed mid-way).
        assert not [e for e in events if "error" in json.loads(e)], text
    else:
        assert json.loads(text)["choices"], text


def test_service_answers_after_the_fuzzing(serve_app: str) -> None:
    r = httpx.post(f"{serve_app}/v1/completions", json={"prompt": "still here?", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
