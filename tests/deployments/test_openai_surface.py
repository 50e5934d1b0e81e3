"""The OpenAI surface real clients send, against the live app: content parts, n, prompt lists, logprobs and
echo, penalties, usage options; and what cannot be served is a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "ignore_eos": True}


def _post(base: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _stream(base: str, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}{route}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _complete(base: str, **body: Any) -> dict[str, Any]:
    return _post(base, "/v1/completions", body)


def _texts(answer: dict[str, Any]) -> list[str]:
    return [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]


def test_chat_reads_text_parts_and_a_null_assistant_turn_as_plain_strings(serve_app: str) -> None:
    client = openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0)

    def ask(system: Any, user: Any, assistant: Any) -> Any:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": "and then?"},
        ]
        return client.chat.completions.create(
            model="qllm-tiny",
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    parts = ask([{"type": "text", "text": "be brief"}], [{"type": "text", "text": "hello there"}], None)
    plain = ask("be brief", "hello there", "")
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage is not None and plain.usage is not None
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens and parts.usage.completion_tokens == 8


def test_n_choices_are_separate_sequences_each_seeded_with_seed_plus_its_index(serve_app: str) -> None:
    body = {"prompt": "once upon a time", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    three = _complete(serve_app, **body, n=3, seed=7)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    alone = [_texts(_complete(serve_app, **body, seed=seed))[0] for seed in (7, 8, 9)]
    assert _texts(three) == alone and len(set(alone)) > 1
    single = _complete(serve_app, **body, seed=7)["usage"]
    # The prompt is counted once, every choice's output once.
    assert three["usage"]["prompt_tokens"] == single["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * 12


def test_a_list_of_prompts_is_answered_as_each_prompt_alone(serve_app: str) -> None:
    prompts = ["the cat sat", "def main():", "hello"]
    together = _complete(serve_app, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    alone = [_texts(_complete(serve_app, prompt=p, max_tokens=6, **GREEDY))[0] for p in prompts]
    assert _texts(together) == [text for text in alone for _ in range(2)]
    ids = _complete(serve_app, prompt=[[5, 6, 7], [40, 41]], max_tokens=4, **GREEDY)
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 5


def test_completion_logprobs_are_the_same_streamed_and_not(serve_app: str) -> None:
    body = {"prompt": "hello world", "max_tokens": 6, "logprobs": 2, **GREEDY}
    whole = _complete(serve_app, **body)["choices"][0]["logprobs"]
    assert len(whole["tokens"]) == 6 and all(len(top) == 2 for top in whole["top_logprobs"])
    # Greedy picks the most likely token: its logprob is the best of the alternatives.
    assert all(lp == max(top.values()) for lp, top in zip(whole["token_logprobs"], whole["top_logprobs"], strict=True))
    offsets = [sum(len(t) for t in whole["tokens"][:i]) for i in range(6)]
    assert whole["text_offset"] == offsets
    chunks = [c["choices"][0]["logprobs"] for c in _stream(serve_app, "/v1/completions", body) if c["choices"]]
    streamed = {key: [v for chunk in chunks for v in chunk[key]] for key in whole}
    assert streamed == whole


def test_echo_with_logprobs_scores_every_prompt_token_as_lm_eval_asks(serve_app: str) -> None:
    prompt = "the quick brown fox"
    answer = _complete(serve_app, prompt=prompt, max_tokens=1, logprobs=1, echo=True, temperature=0)
    choice, usage = answer["choices"][0], answer["usage"]
    assert choice["text"].startswith(prompt)
    logprobs, n_prompt = choice["logprobs"], usage["prompt_tokens"]
    assert len(logprobs["tokens"]) == n_prompt + 1 and "".join(logprobs["tokens"][:n_prompt]) == prompt
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:]) and all(
        len(t) == 1 for t in logprobs["top_logprobs"][1:]
    )
    # lm-eval's log-likelihood reads the official client's parse of exactly this answer
    client = openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0)
    parsed = client.completions.create(
        model="qllm-tiny", prompt=[prompt], max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    assert (
        parsed.choices[0].logprobs is not None
        and parsed.choices[0].logprobs.token_logprobs == logprobs["token_logprobs"]
    )


def test_chat_logprobs_carry_bytes_and_alternatives_streamed_and_not(serve_app: str) -> None:
    client = openai.OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0)
    kwargs: Any = {
        "model": "qllm-tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 5,
        "logprobs": True,
        "top_logprobs": 3,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(len(e.top_logprobs) == 3 and e.bytes is not None for e in content)
    assert (
        b"".join(bytes(e.bytes or []) for e in content).decode("utf-8", "replace") == whole.choices[0].message.content
    )
    streamed = [
        e
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for c in chunk.choices
        if c.logprobs is not None
        for e in c.logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_each_penalty_changes_a_greedy_answer(serve_app: str) -> None:
    body = {"prompt": "the the the the", "max_tokens": 40, **GREEDY}
    plain = _texts(_complete(serve_app, **body))[0]
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert _texts(_complete(serve_app, **body, **penalty))[0] != plain, penalty


def test_usage_comes_at_the_end_or_in_every_chunk_as_asked(serve_app: str) -> None:
    limits = {"max_tokens": 5, **GREEDY}
    body = {"prompt": "count", **limits}
    plain = _stream(serve_app, "/v1/completions", body)
    assert all("usage" not in c for c in plain)
    final = _stream(serve_app, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert [c for c in final if "usage" in c] == [final[-1]] and final[-1]["choices"] == []
    options = {"include_usage": True, "continuous_usage_stats": True}
    every = _stream(
        serve_app,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], **limits, "stream_options": options},
    )
    counts = [c["usage"]["completion_tokens"] for c in every]
    assert counts == sorted(counts) and counts[-1] == 5 and every[-1]["choices"] == []


def test_streamed_chat_choices_each_name_the_role_and_finish(serve_app: str) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "n": 2,
        "max_tokens": 4,
        "temperature": 1.0,
        "seed": 3,
        "ignore_eos": True,
    }
    chunks = _stream(serve_app, "/v1/chat/completions", body)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in mine[:-1])
    whole = _post(serve_app, "/v1/chat/completions", body)
    for index, choice in enumerate(whole["choices"]):
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["index"] == index)
        assert text == choice["message"]["content"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
            "tools",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            },
            "response_format",
        ),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 100}, "n"),
        ("/v1/completions", {"prompt": [[1, 2], [99999]]}, "prompt"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field_and_serving_goes_on(
    serve_app: str, route: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{serve_app}{route}", json={"max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert _complete(serve_app, prompt="fine", max_tokens=2)["usage"]["completion_tokens"] == 2
