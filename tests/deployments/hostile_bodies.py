"""Generated hostile request bodies for tests/deployments/test_hostile.py: what a careless or hostile client
sends, as raw bytes (some are not JSON at all). Every body is drawn from a seeded `random.Random`, so a
failure is reproduced from its seed and index alone.

Bodies that pass validation keep `max_tokens` at 1 or 2, so the engine's share of the suite stays small.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Hostile:
    """One request: where it goes, its raw body, and how the client behaves."""

    path: str
    body: bytes
    kind: str
    """Which generator made it (named in a failure)."""
    stream: bool = False
    hang_up_after: int | None = None
    """Streaming: close the connection after this many lines (None: read to the end)."""


def _text(rng: random.Random) -> str:
    return rng.choice(["hi", "x" * rng.randint(1, 40), "héllo wörld", "日本語", "emoji 🙂", "", " ", "\n"])


def _valid_completion(rng: random.Random) -> dict[str, Any]:
    return {"prompt": _text(rng) or "a", "max_tokens": rng.choice([1, 2])}


def _valid_chat(rng: random.Random) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": _text(rng) or "a"}], "max_tokens": rng.choice([1, 2])}


def _json_any(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value of any type (shallow)."""
    choices: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.choice([0.5, -1.5, 1e308, -1e-308, 3.0]),
        lambda: _text(rng),
    ]
    if depth < 2:
        choices += [
            lambda: [_json_any(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            lambda: {_text(rng) or "k": _json_any(rng, depth + 1) for _ in range(rng.randint(0, 3))},
        ]
    return rng.choice(choices)()


# Values at and just past every field's bounds (qllm_core/params.py, deployments/openai_requests.py and
# deployments/settings.py hold the bounds); the body's max_tokens stays 1-2 unless max_tokens is the field.
BOUNDS: dict[str, list[Any]] = {
    "max_tokens": [-1, 0, 1, 2, 10**6, 10**30, "1", 1.5, True],
    "n": [0, 1, 2, 8, 128, 129, 10**9, -1],
    "temperature": [-0.01, 0.0, 2.0, 2.01, 1e308, "hot"],
    "top_p": [0.0, 1e-9, 1.0, 1.01],
    "top_k": [-1, 0, 1, 10**6, 2**63, 2**64],
    "seed": [-1, 0, 2**63 - 1, 2**63, 10**40],
    "presence_penalty": [-2.01, -2.0, 2.0, 2.01],
    "frequency_penalty": [-2.01, 2.0, 2.01],
    "repetition_penalty": [0.0, 0.01, 2.0, 2.01],
    "logprobs": [-1, 0, 20, 21],
    "echo": [True, False, "yes"],
    "stop": [[], ["a"] * 16, ["a"] * 17, ["x" * 256], ["x" * 257], [""], "stop", [1]],
    "stop_token_ids": [[], [0], [-1], [2**31], [10**30], list(range(64)), list(range(65)), list(range(5000))],
    "ttft_deadline_ms": [0, -1, 1e-300, 99.9, 100, 1e300, "soon"],
    "priority": ["ls", "be", "latency_sensitive", "best_effort", "LS", "urgent", "", 1],
    "best_of": [0, 1, 2],
    "logit_bias": [{}, {"1": 5}],
    "stream_options": [{"include_usage": True}, {"include_usage": "x"}, {"bogus": 1}],
    "user": ["u", 5],
    "model": ["qllm-tiny", "gpt-4", "", None],
    "suffix": [None, "s"],
}
CHAT_BOUNDS: dict[str, list[Any]] = {
    "top_logprobs": [-1, 0, 20, 21],
    "logprobs": [True, False, 0],
    "max_completion_tokens": [0, 1, 2, 10**6],
    "tools": [[], [{"type": "function"}]],
    "tool_choice": ["none", "auto", "required", {"type": "function"}],
    "response_format": [{"type": "text"}, {"type": "json_object"}],
}


def _at_bounds(rng: random.Random) -> tuple[str, dict[str, Any]]:
    chat = rng.random() < 0.4
    body = _valid_chat(rng) if chat else _valid_completion(rng)
    table = {**BOUNDS, **CHAT_BOUNDS} if chat else BOUNDS
    for field in rng.sample(sorted(table), rng.randint(1, 3)):
        if chat and field in ("echo", "suffix", "best_of"):
            continue
        body[field] = rng.choice(table[field])
    if body.get("logprobs") is not None and not isinstance(body.get("logprobs"), bool) and body.get("echo") is True:
        body["prompt"] = "short"  # echo with logprobs: prompt logprobs over a short prompt
    return (CHAT if chat else COMPLETIONS), body


def _wrong_types(rng: random.Random) -> tuple[str, dict[str, Any]]:
    chat = rng.random() < 0.5
    body = _valid_chat(rng) if chat else _valid_completion(rng)
    fields = [*sorted({**BOUNDS, **CHAT_BOUNDS}), "prompt", "messages", "stream"]
    field = rng.choice(fields)
    value = _json_any(rng)
    if field == "max_tokens" and isinstance(value, int) and not isinstance(value, bool):
        value = -abs(value)  # a legal count would ask the engine for up to 2^70 tokens
    body[field] = value
    return (CHAT if chat else COMPLETIONS), body


def _lists(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Prompt and message lists at and past their limits, token ids in and out of the vocabulary."""
    if rng.random() < 0.5:
        count = rng.choice([0, 1, 2, 64, 128, 129, 1000])
        prompt: Any = rng.choice(
            [
                ["p"] * count,
                [[rng.randint(-5, 400) for _ in range(rng.randint(0, 4))] for _ in range(count)],
                [rng.choice([-1, 0, 5, 383, 384, 2**31, 2**63]) for _ in range(max(count, 1))],
                [[]],
                [],
            ]
        )
        return COMPLETIONS, {"prompt": prompt, "max_tokens": 1, "n": rng.choice([1, 2])}
    roles = ["system", "developer", "user", "assistant", "tool", "function", "robot", "", None, 7]
    count = rng.choice([0, 1, 2, 20, 50])
    messages = []
    for _ in range(count):
        content: Any = rng.choice(
            [
                _text(rng),
                None,
                [{"type": "text", "text": "a"}],
                [{"type": "image_url", "image_url": {"url": "x"}}],
                [{"type": "text"}],
                [{"type": "text", "text": "a", "extra": 1}],
                5,
            ]
        )
        messages.append({"role": rng.choice(roles), "content": content})
    return CHAT, {"messages": messages, "max_tokens": 1}


def _surrogates(rng: random.Random) -> bytes:
    """A lone surrogate (JSON's \\ud800 escape, which Python's json reads as a str) in a string field."""
    lone = rng.choice(["\\ud800", "\\udfff", "a\\ud83d", "\\udc00b"])
    where = rng.choice(["prompt", "prompts", "chat", "name", "stop", "user", "model", "priority"])
    if where == "prompt":
        return f'{{"prompt": "x{lone}y", "max_tokens": 1}}'.encode()
    if where == "prompts":
        return f'{{"prompt": ["ok", "{lone}"], "max_tokens": 1, "echo": true}}'.encode()
    if where == "chat":
        return f'{{"messages": [{{"role": "user", "content": "{lone}"}}], "max_tokens": 1}}'.encode()
    if where == "name":
        return f'{{"messages": [{{"role": "user", "content": "a", "name": "{lone}"}}], "max_tokens": 1}}'.encode()
    return f'{{"prompt": "a", "max_tokens": 1, "{where}": "{lone}"}}'.encode()


def _deep(rng: random.Random) -> bytes:
    # Past Python's recursion limit (~1000) is what matters; a 100,000-deep one now and then (200 kB each).
    depth = rng.choices([10, 100, 999, 1001, 5000, 100_000], [3, 3, 3, 3, 3, 1])[0]
    inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
    field = rng.choice(["prompt", "messages", "tools", "stop", "logit_bias", "stream_options", None])
    if field is None:
        return inner.encode()
    return f'{{"prompt": "a", "max_tokens": 1, "{field}": {inner}}}'.encode()


def _huge_number(rng: random.Random) -> bytes:
    digits = rng.choice([19, 20, 100, 4300, 4301, 6000])
    number = rng.choice(["", "-"]) + "9" * digits + rng.choice(["", ".5", "e5", "e999", "e-999"])
    field = rng.choice(["max_tokens", "n", "seed", "top_k", "temperature", "ttft_deadline_ms", "logprobs"])
    if rng.random() < 0.2:
        return f'{{"prompt": [{number}], "max_tokens": 1}}'.encode()
    return f'{{"prompt": "a", "max_tokens": 1, "{field}": {number}}}'.encode()


def _not_an_object(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"",
            b"null",
            b"[]",
            b'"prompt"',
            b"42",
            b"{",
            b'{"prompt": "a",}',
            b'{"prompt": NaN, "max_tokens": 1}',
            b'{"prompt": "a", "max_tokens": Infinity}',
            b"\xff\xfe{}",
            b'{"prompt": "\xc3\x28"}',
            b'{"prompt": "a", "prompt": 5}',
            b"\x00" * 10,
            json.dumps({"prompt": "a", "max_tokens": 1, "unknown_field": 1}).encode(),
        ]
    )


def _streaming(rng: random.Random) -> Hostile:
    """A valid streaming call the client may hang up on at any point."""
    path, body = (CHAT, _valid_chat(rng)) if rng.random() < 0.5 else (COMPLETIONS, _valid_completion(rng))
    body |= {"stream": True, "max_tokens": rng.choice([1, 2]), "n": rng.choice([1, 1, 2, 4])}
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    hang_up = rng.choice([None, 0, 1, 2])
    return Hostile(path, json.dumps(body).encode(), "stream", stream=True, hang_up_after=hang_up)


def _as_json(make: Callable[[random.Random], tuple[str, dict[str, Any]]], kind: str) -> Callable[..., Hostile]:
    def build(rng: random.Random) -> Hostile:
        path, body = make(rng)
        stream = body.get("stream") is True
        return Hostile(path, json.dumps(body).encode(), kind, stream=stream)

    return build


def _raw(make: Callable[[random.Random], bytes], kind: str) -> Callable[..., Hostile]:
    def build(rng: random.Random) -> Hostile:
        return Hostile(rng.choice([COMPLETIONS, CHAT]), make(rng), kind)

    return build


GENERATORS: list[tuple[float, Callable[[random.Random], Hostile]]] = [
    (0.22, _as_json(_at_bounds, "bounds")),
    (0.22, _as_json(_wrong_types, "types")),
    (0.10, _as_json(_lists, "lists")),
    (0.12, _raw(_surrogates, "surrogate")),
    (0.10, _raw(_deep, "deep")),
    (0.12, _raw(_huge_number, "number")),
    (0.08, _raw(_not_an_object, "not-object")),
    (0.04, _streaming),
]


def hostile_bodies(seed: int, count: int) -> list[Hostile]:
    """`count` bodies from `seed`, in order."""
    rng = random.Random(seed)
    weights = [w for w, _ in GENERATORS]
    makers = [m for _, m in GENERATORS]
    return [rng.choices(makers, weights)[0](rng) for _ in range(count)]
