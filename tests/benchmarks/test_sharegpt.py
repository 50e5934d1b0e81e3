"""The ShareGPT loader on small files made here: pairing, vLLM's filters, a file cut mid-record, token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sharegpt import (
    CHARS_PER_TOKEN,
    DatasetError,
    TokenCounting,
    char_counter,
    first_exchange,
    load_sharegpt,
    read_records,
    token_counter,
)
from benchmarks.workload import WorkloadSettings, poisson_workload
from qllm_core.config import BUILTIN_MODELS


def _turn(who: str, chars: int) -> dict[str, str]:
    return {"from": who, "value": "x" * chars}


def _record(*turns: dict[str, str]) -> dict[str, object]:
    return {"id": "r", "conversations": list(turns)}


RECORDS = [
    _record(_turn("human", 40), _turn("gpt", 400)),  # 10 + 100 tokens: kept
    _record(_turn("gpt", 40), _turn("human", 80), _turn("gpt", 120)),  # the first human turn pairs: 20 + 30, kept
    _record(_turn("human", 12), _turn("gpt", 400)),  # prompt of 3 tokens: too short
    _record(_turn("human", 40), _turn("gpt", 12)),  # reply of 3 tokens: too short
    _record(_turn("human", 4 * 1025), _turn("gpt", 40)),  # prompt over 1024
    _record(_turn("human", 4 * 1000), _turn("gpt", 4 * 1049)),  # 1000 + 1049 > 2048
    _record(_turn("human", 4 * 1000), _turn("gpt", 4 * 1048)),  # exactly 2048: kept
    _record(_turn("human", 40), _turn("human", 40)),  # no gpt reply after the first human turn
    _record(_turn("gpt", 40)),  # no human turn at all
    {"id": "no conversations"},
]


def _write(path: Path, records: list[object], cut_at: int | None = None) -> Path:
    text = json.dumps(records, indent=2)
    path.write_text(text if cut_at is None else text[:cut_at], encoding="utf-8")
    return path


def test_pairs_are_filtered_as_vllm_does(tmp_path: Path) -> None:
    data = load_sharegpt(_write(tmp_path / "s.json", RECORDS), char_counter())
    s = data.summary
    assert [(p.prompt_len, p.reply_len) for p in data.pairs] == [(10, 100), (20, 30), (1000, 1048)]
    assert (s.records_read, s.truncated, s.pairs_kept) == (len(RECORDS), False, 3)
    assert (s.too_short, s.prompt_too_long, s.total_too_long, s.without_pair) == (2, 1, 1, 3)
    assert s.mean_prompt_len == pytest.approx((10 + 20 + 1000) / 3)
    assert s.token_counting == f"{CHARS_PER_TOKEN} characters a token"
    assert all(p.prompt_text is None for p in data.pairs)  # character counts send random ids


def test_a_file_cut_mid_record_gives_the_whole_records_before_the_cut(tmp_path: Path) -> None:
    whole = json.dumps(RECORDS, indent=2)
    third = whole.index('"id"', whole.index('"id"', whole.index('"id"') + 1) + 1)
    inside_string = whole.index("x" * 400, third) + 20  # inside the third record's reply
    after_string = whole.index('"', inside_string) + 1  # right after that string closes, before its record does
    for cut in (inside_string, after_string):
        records, truncated = read_records(_write(tmp_path / "cut.json", RECORDS, cut_at=cut))
        assert truncated
        assert records == RECORDS[:2]
    data = load_sharegpt(tmp_path / "cut.json", char_counter())
    assert data.summary.truncated and data.summary.records_read == 2 and data.summary.pairs_kept == 2


def test_a_malformed_record_in_a_whole_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": []}, {"conversations": [}, {"id": 1}]', encoding="utf-8")
    with pytest.raises(DatasetError, match="record 2 is not valid JSON"):
        read_records(bad)
    (tmp_path / "obj.json").write_text('{"conversations": []}', encoding="utf-8")
    with pytest.raises(DatasetError, match="not a JSON list"):
        read_records(tmp_path / "obj.json")
    with pytest.raises(DatasetError, match="no \\(prompt, reply\\) pair passed"):
        load_sharegpt(_write(tmp_path / "none.json", RECORDS[7:]), char_counter())


def test_first_exchange_takes_the_first_human_turn_and_the_reply_right_after_it() -> None:
    assert first_exchange(_record(_turn("gpt", 1), _turn("human", 2), _turn("gpt", 3))) == ("xx", "xxx")
    assert first_exchange(_record(_turn("human", 2), _turn("system", 3), _turn("gpt", 4))) is None
    assert first_exchange("not a record") is None


def test_presets_count_characters_and_a_model_directory_counts_with_its_tokenizer(tmp_path: Path) -> None:
    from qllm_core.models.builtin import ensure_builtin

    assert token_counter("bench", TokenCounting.AUTO, BUILTIN_MODELS).encode is None
    assert token_counter("some/hub-name", TokenCounting.AUTO, BUILTIN_MODELS).encode is None
    with pytest.raises(DatasetError, match="local model directory"):
        token_counter("tiny", TokenCounting.TOKENIZER, BUILTIN_MODELS)
    model_dir = ensure_builtin("tiny")
    counter = token_counter(str(model_dir), TokenCounting.AUTO, BUILTIN_MODELS)
    assert counter.encode is not None and str(model_dir) in counter.description
    text = "hello there, the weather is nice"
    assert counter.count(text) == len(counter.encode(text)) > 0
    records = [_record({"from": "human", "value": text * 3}, {"from": "gpt", "value": text * 5})]
    data = load_sharegpt(_write(tmp_path / "t.json", records), counter)
    (pair,) = data.pairs
    assert pair.prompt_text == text * 3
    (request,) = poisson_workload(WorkloadSettings(num_requests=1), 1.0, data.pool(counter, 8)).requests
    assert request.prompt_token_ids == tuple(counter.encode(text * 3)) and request.max_tokens == 8
