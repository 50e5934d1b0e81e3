"""The Azure LLM inference trace loader (`benchmarks.azure`) on small CSV files written here, and its
`qllm-bench --dataset azure-*` hook."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from benchmarks.azure import (
    FILES,
    AzureRow,
    azure_workload,
    azure_workloads,
    capped_lengths,
    load_rows,
    model_context,
)
from benchmarks.cli import build_parser, settings_from_args
from benchmarks.sharegpt import DatasetError
from benchmarks.workload import WorkloadSettings

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(directory: Path, service: str, rows: list[tuple[str, int, int]]) -> None:
    lines = [f"2023-11-16 18:{t},{c},{g}\n" for t, c, g in rows]
    (directory / FILES[service]).write_text(HEADER + "".join(lines), encoding="utf-8")


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    # conv at 0, 1, 3 and 6 s; code in a burst at 2 s (three requests within 20 ms) and at 5 s.
    write(tmp_path, "conv", [("00:00.0000000", 100, 20), ("00:01.0000000", 200, 30), ("00:03.0000000", 50, 10),
                             ("00:06.0000000", 80, 40)])  # fmt: skip
    write(tmp_path, "code", [("00:02.0000000", 3000, 5), ("00:02.0100000", 2500, 8), ("00:02.0200000", 1800, 4),
                             ("00:05.0000000", 900, 6)])  # fmt: skip
    return tmp_path


def settings(n: int, seed: int = 0, ls_share: float = 0.2) -> WorkloadSettings:
    return WorkloadSettings(num_requests=n, seed=seed, ls_share=ls_share)


def test_a_whole_trace_keeps_its_gaps_and_lengths(trace: Path) -> None:
    w = azure_workload("azure-conv", settings(4), directory=trace)
    assert [r.arrival_s for r in w.requests] == [0.0, 1.0, 3.0, 6.0]
    assert [r.prompt_len for r in w.requests] == [100, 200, 50, 80]
    assert [r.max_tokens for r in w.requests] == [20, 30, 10, 40]
    assert w.rate == pytest.approx(4 / 6)
    assert "CC-BY 4.0" in w.source and "Splitwise" in w.source


def test_scaling_to_a_rate_keeps_the_traces_proportions(trace: Path) -> None:
    (w,) = azure_workloads("azure-conv", trace, "bench", None, settings(4), (2.0,))
    assert w.rate == 2.0
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 1 / 3, 1.0, 2.0])  # 4 requests in 2 s


def test_the_mix_makes_conversations_ls_and_coding_be_on_one_clock(trace: Path) -> None:
    w = azure_workload("azure-mix", settings(8), directory=trace)
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 1.0, 2.0, 2.01, 2.02, 3.0, 5.0, 6.0])
    assert [r.priority for r in w.requests] == ["ls", "ls", "be", "be", "be", "ls", "be", "ls"]
    assert [r.prompt_len for r in w.requests][2:5] == [3000, 2500, 1800]


def test_lengths_are_capped_to_the_context_and_to_the_reply_cap() -> None:
    at = datetime.datetime(2023, 11, 16, 18, 0)
    row = AzureRow(at, 5000, 300, "conv")
    assert capped_lengths(row, 4096, 64) == (4032, 64)
    assert capped_lengths(row, 4096, None) == (3796, 300)
    long_reply = AzureRow(at, 10, 5000, "conv")
    assert capped_lengths(long_reply, 4096, None) == (1, 4095)


def test_the_model_context_caps_the_code_services_long_prompts(trace: Path) -> None:
    w = azure_workload("azure-code", settings(4), context_limit=2048, max_tokens_cap=4, directory=trace)
    assert [r.prompt_len for r in w.requests] == [2044, 2044, 1800, 900]
    assert [r.max_tokens for r in w.requests] == [4, 4, 4, 4]


def test_a_window_takes_the_asked_number_of_requests_from_a_seeded_start(trace: Path) -> None:
    windows = {azure_workload("azure-mix", settings(3, seed=s), directory=trace).source for s in range(12)}
    for seed in range(12):
        w = azure_workload("azure-mix", settings(3, seed=seed), directory=trace)
        assert len(w.requests) == 3 and w.requests[0].arrival_s == 0.0
        assert w == azure_workload("azure-mix", settings(3, seed=seed), directory=trace)  # a seed repeats
    assert len(windows) > 1


def test_an_ls_count_takes_requests_until_that_many_are_ls(trace: Path) -> None:
    s = WorkloadSettings(ls_requests=2, ls_share=0.5, seed=0, max_requests=8)
    w = azure_workload("azure-mix", s, directory=trace)
    assert w.count("ls") == 2 and w.requests[-1].priority == "ls"


def test_an_ls_count_on_one_service_stops_at_the_request_that_reaches_it(tmp_path: Path) -> None:
    write(tmp_path, "conv", [(f"00:{s:02d}.0000000", 10 + s, 5) for s in range(40)])
    s = WorkloadSettings(ls_requests=5, ls_share=0.5, seed=3, max_requests=40)
    w = azure_workload("azure-conv", s, directory=tmp_path)
    assert w.count("ls") == 5 and w.requests[-1].priority == "ls"
    assert w.count("be") > 0


def test_a_malformed_row_is_named_by_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / FILES["conv"]).write_text(HEADER + "2023-11-16 18:00:00.0,10,5\n2023-11-16 18:00:01.0,ten,5\n")
    with pytest.raises(DatasetError, match=r"AzureLLMInferenceTrace_conv.csv:3"):
        load_rows("azure-conv", tmp_path)


def test_a_wrong_header_or_a_missing_folder_says_what_to_give(tmp_path: Path) -> None:
    (tmp_path / FILES["conv"]).write_text("time,prompt,reply\n")
    with pytest.raises(DatasetError, match="header must be TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_rows("azure-conv", tmp_path)
    with pytest.raises(DatasetError, match="--dataset-path"):
        load_rows("azure-conv", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown Azure dataset"):
        load_rows("azure-chat", tmp_path)


def test_the_model_context_comes_from_the_preset_or_the_checkpoint(tmp_path: Path) -> None:
    assert model_context("bench") == 4096
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    assert model_context(str(tmp_path)) == 2048
    assert model_context("some-served-name") == 4096


def test_qllm_bench_replays_the_mix_at_each_rate(trace: Path) -> None:
    parser = build_parser()
    argv = ["--dataset", "azure-mix", "--dataset-path", str(trace), "--num-requests", "8", "--rates", "1,4",
            "--max-tokens-cap", "5"]  # fmt: skip
    s = settings_from_args(parser, parser.parse_args(argv))
    assert s.dataset is not None and s.dataset.replayed
    slow, fast = s.workloads(s.rates, s.seeds[0])
    assert (slow.rate, fast.rate) == (1.0, 4.0)
    assert [r.priority for r in fast.requests] == ["ls", "ls", "be", "be", "be", "ls", "be", "ls"]
    assert max(r.max_tokens for r in fast.requests) == 5
    assert fast.requests[-1].arrival_s == pytest.approx(slow.requests[-1].arrival_s / 4)
    probe = s.probe_workload(None)
    assert len(probe.requests) == 8  # the probe takes its requests from the trace too


def test_qllm_bench_rejects_an_unknown_dataset() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "azure-chat"])
