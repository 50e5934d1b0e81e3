"""App settings from YAML: the shipped serve_config.yaml is valid, and typos are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.openai_api import ApiError, parse_body
from deployments.openai_requests import ChatRequest, CompletionRequest
from deployments.settings import AppSettings
from qllm_core import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_serve_config_is_valid() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    settings = AppSettings.from_dict(app["args"])
    assert settings.replicas == 2 and settings.num_gpus == 0 and settings.engine.model == "tiny"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"replica": 2}, "unknown application setting"),
        ({"engine": {"polcy": "qllm"}}, "unknown engine setting"),
        ({"replicas": 0}, "replicas=0"),
        ({"slo_target": 1.5}, "slo_target"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"engine": {"policy": "lifo"}}, "policy='lifo'"),
    ],
)
def test_bad_settings_fail_at_start_up(args: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        AppSettings.from_dict(args)


def test_request_bodies_map_onto_sampling_params() -> None:
    body = parse_body(b'{"prompt": "x", "stop": "\\n", "max_tokens": 3, "seed": 1}', CompletionRequest)
    assert body.sampling().stop == ("\n",) and body.sampling().max_tokens == 3 and body.sampling().seed == 1
    chat = parse_body(
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9, "max_tokens": 4}',
        ChatRequest,
    )
    assert chat.sampling().max_tokens == 9


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b"\xff", 400, None),
        (b'{"prompt": 5}', 400, "prompt"),
        (b'{"prompt": "x", "n": 0}', 400, "n"),
        (b'{"messages": []}', 400, "messages"),
    ],
)
def test_body_errors(raw: bytes, status: int, param: str | None) -> None:
    model = ChatRequest if b"messages" in raw else CompletionRequest
    with pytest.raises(ApiError) as info:
        parse_body(raw, model)
    assert info.value.status == status
    if param is not None:
        assert info.value.param == param
