"""One access-log line per request that reached an engine: its id, class, outcome and timings.

Prompt text is left out unless the operator sets `log_prompts` (prompts are user data); the API key
never reaches this record. Lines are `key=value` pairs (values JSON-quoted where needed), so log
pipelines can parse them without a schema.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from deployments.choices import Choices
from deployments.protocol import Prompt, StreamItem

# Longest prompt excerpt written when `log_prompts` is on; a log line is no place for a whole document.
PROMPT_LOG_CHARS = 2000


@dataclass
class RequestLog:
    """Filled in as a request moves through the ingress; `finish` writes it exactly once."""

    request_id: str
    priority: str
    kind: str
    stream: bool
    prompts: tuple[Prompt, ...] | None = None
    """The call's prompts, kept only when `log_prompts` is set."""
    started: float = field(default_factory=time.monotonic)
    first_item_at: float | None = None
    engine_ttft_s: float | None = None
    replica: str | None = None
    _written: bool = False

    def first_item(self, item: StreamItem) -> None:
        """The replica's first stream item arrived."""
        self.first_item_at = time.monotonic()
        self.engine_ttft_s = item.ttft_s
        self.replica = item.replica_id

    def finish(
        self, logger: logging.Logger, status: int, choices: Choices | None = None, error: str | None = None
    ) -> None:
        """Write the line: HTTP status, finish reasons and token counts (of every choice), timings."""
        if self._written:
            return
        self._written = True
        now = time.monotonic()
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "class": self.priority,
            "kind": self.kind,
            "stream": self.stream,
            "status": status,
            "replica": self.replica,
            "ttft_ms": None if self.first_item_at is None else round((self.first_item_at - self.started) * 1000, 1),
            "engine_ttft_ms": None if self.engine_ttft_s is None else round(self.engine_ttft_s * 1000, 1),
            "total_ms": round((now - self.started) * 1000, 1),
        }
        if choices is not None:
            usage = choices.usage()
            fields["choices"] = choices.count
            fields["finish_reason"] = choices.finish_reasons()
            fields["prompt_tokens"] = usage.prompt_tokens
            fields["completion_tokens"] = usage.completion_tokens
        if error is not None:
            fields["error"] = error
        if self.prompts is not None:
            given = [{k: v for k, v in dataclasses.asdict(p).items() if v is not None} for p in self.prompts]
            fields["prompt"] = json.dumps(given if len(given) > 1 else given[0])[:PROMPT_LOG_CHARS]
        logger.info("qllm request %s", " ".join(f"{k}={_value(v)}" for k, v in fields.items()))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "-"
    if isinstance(v, int | float):
        return str(v)
    text = str(v)
    return text if text and all(c.isalnum() or c in "-_.:#" for c in text) else json.dumps(text)
