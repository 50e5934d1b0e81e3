"""EngineReplica: one qllm_core engine on one device, streaming tokens to the ingress and reporting its load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.load import ReplicaLoad
from deployments.metrics import RayBackend
from deployments.settings import AppSettings
from qllm_core import Engine, InvalidRequestError, PromptTooLongError, QllmError, SamplingParams
from qllm_core.metrics import EngineMetrics

logger = logging.getLogger("ray.serve")


def error_item(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """The first (and only) stream item of a request the replica refuses."""
    return {"error": {"status": status, "message": message, "param": param, "type": kind}}


class EngineReplica:
    """A Ray Serve deployment class (decorated in app.py); one engine per replica."""

    def __init__(self, settings: AppSettings, router: DeploymentHandle | None = None) -> None:
        self._settings = settings
        # One replica per device: keep torch's CPU threads within the CPUs Ray reserved for it.
        torch.set_num_threads(max(1, int(settings.num_cpus)))
        self._engine = Engine(settings.engine, EngineMetrics(RayBackend()))
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._router = router
        self._reporter: asyncio.Task[None] | None = None
        self._ensure_reporter()

    # ---- serving ---------------------------------------------------------------------------------------
    async def generate(
        self, request: dict[str, Any], placement: dict[str, Any] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one request: text deltas and token counts, ending with a finished item (or one error item).

        `placement` is read by the request router in the caller's handle, not here.
        """
        self._ensure_reporter()
        try:
            stream = self._engine.generate(**self._engine_args(request))
            async for out in stream:
                yield {
                    "delta": out.text_delta,
                    "num_output_tokens": out.num_output_tokens,
                    "prompt_tokens": out.prompt_token_count,
                    "finished": out.finished,
                    "finish_reason": None if out.finish_reason is None else out.finish_reason.value,
                    "ttft_s": out.ttft_s,
                    "replica_id": self._replica_id,
                }
        except PromptTooLongError as exc:
            yield error_item(413, exc.message, exc.param)
        except InvalidRequestError as exc:
            yield error_item(400, exc.message, exc.param)
        except QllmError as exc:
            yield error_item(503, str(exc), None, "service_unavailable")

    def _engine_args(self, request: dict[str, Any]) -> dict[str, Any]:
        params = SamplingParams(**request.get("params", {}))
        args: dict[str, Any] = {
            "params": params,
            "priority": request.get("priority"),
            "request_id": request.get("request_id"),
            "ttft_deadline_s": request.get("ttft_deadline_s"),
        }
        messages = request.get("messages")
        prompt = request.get("prompt")
        if messages is not None:
            args["prompt_token_ids"] = self._chat_tokens(messages)
        elif isinstance(prompt, list):
            args["prompt_token_ids"] = prompt
        else:
            args["prompt"] = prompt
        return args

    def _chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self._engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(t) for t in ids]  # type: ignore[union-attr, arg-type]

    # ---- load reporting ---------------------------------------------------------------------------------
    def load(self) -> ReplicaLoad:
        """This replica's load right now."""
        stats = self._engine.stats()
        return ReplicaLoad.from_stats(self._replica_id, stats, self._settings.engine.max_batch_size, time.time())

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve polls this for the request router's fallback placement."""
        self._ensure_reporter()
        return self.load().to_dict()

    def stats(self) -> dict[str, Any]:
        """Engine stats as plain data (tests and operators)."""
        return self.load().to_dict() | {"kv_used_blocks": self._engine.stats().kv_used_blocks}

    def ping(self) -> str:
        """Liveness for /health."""
        return self._replica_id

    def check_health(self) -> None:
        """Ray Serve's health check: the engine loop must be alive."""
        self._engine.stats()

    def _ensure_reporter(self) -> None:
        if self._router is None or (self._reporter is not None and not self._reporter.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop yet: the next call starts it
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        assert self._router is not None  # noqa: S101
        while True:
            try:
                await self._router.report.remote(self.load().to_dict())
            except Exception as exc:  # the router restarts on its own; keep serving meanwhile
                logger.debug("load report to the router failed: %s", exc)
            await asyncio.sleep(self._settings.stats_period_s)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown(timeout=1.0)
