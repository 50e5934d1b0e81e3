"""guidellm, an outside benchmark client from PyPI, against the live app on loopback: chat and completions,
streamed and not, with zero errors.

guidellm sends what real clients send: chat content as a list of text parts, `max_completion_tokens`,
`stop: null`, `stream_options` with `include_usage` and `continuous_usage_stats`, and it reads the usage
of every answer. It lives in a venv of its own (.venv/guidellm, made by `scripts/install.sh --dev`) and
runs offline: its synthetic prompts are sized with the tiny model's own tokenizer, read from disk.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qllm_core.models.builtin import ensure_builtin
from tests.deployments.conftest import APP_ARGS

pytestmark = pytest.mark.integration

GUIDELLM = Path(__file__).resolve().parents[2] / ".venv" / "guidellm" / "bin" / "guidellm"
REQUESTS = 16


@pytest.mark.parametrize(("route", "stream"), [("/v1/chat/completions", True), ("/v1/completions", False)])
def test_guidellm_runs_against_the_app_without_an_error(
    serve_app: str, tmp_path: Path, route: str, stream: bool
) -> None:
    assert GUIDELLM.exists(), f"{GUIDELLM} is missing: run `bash scripts/install.sh --dev`"
    report = tmp_path / "report.json"
    backend = f"kind=openai_http,target={serve_app},model={APP_ARGS['model_name']},request_format={route}"
    command = [
        str(GUIDELLM),
        "run",
        "--backend",
        f"{backend},stream={str(stream).lower()}",
        "--profile",
        "kind=concurrent,streams=4",
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--data",
        "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
        "--tokenizer",
        f"kind=hf_auto,model={ensure_builtin('tiny')}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console",
    ]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(  # noqa: S603 - our own command line, no shell
        command, env={**os.environ, **offline}, capture_output=True, text=True, timeout=240, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, totals
    # Each request asked for 8 tokens with ignore_eos: every answer had all of them.
    assert benchmark["metrics"]["output_token_count"]["successful"]["total_sum"] == REQUESTS * 8
