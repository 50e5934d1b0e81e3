"""EngineReplica: one qllm_core engine on one device, streaming tokens to the ingress and reporting its load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import torch
from jinja2 import TemplateError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import faults
from deployments.fan_out import merged
from deployments.limits import CallLimits
from deployments.load import replica_load
from deployments.metrics import RayBackend
from deployments.protocol import (
    ChatTurn,
    GenerateRequest,
    PlacementHint,
    Prompt,
    ReplicaLoad,
    StreamError,
    StreamItem,
)
from deployments.settings import AppSettings
from deployments.token_text import TokenTexts
from qllm_core import Engine, EngineStoppedError, InvalidRequestError, PromptTooLongError, QllmError, RequestOutput
from qllm_core.metrics import EngineMetrics
from qllm_core.stats import EngineStats

logger = logging.getLogger("ray.serve")


def _texts(prompt: Prompt) -> list[str]:
    """The client's text in a prompt: the text, or every message's content and name."""
    if prompt.messages is None:
        return [prompt.text or ""]
    return [part for m in prompt.messages for part in (m.content, m.name or "")]


def _require_encodable(text: str, param: str) -> None:
    """JSON's \\ud800 escapes reach Python as lone surrogates, which are not characters: no tokenizer reads them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = f"U+{ord(text[exc.start]):04X}"
        raise InvalidRequestError(
            f"the {param} holds a lone surrogate ({code} at character {exc.start}), which is not a character: "
            "send valid Unicode",
            param,
        ) from None


class EngineReplica:
    """A Ray Serve deployment class (decorated in app.py); one engine per replica."""

    def __init__(self, settings: AppSettings, router: DeploymentHandle | None = None) -> None:
        self._settings = settings
        # One replica per device: keep torch's CPU threads within the CPUs Ray reserved for it.
        torch.set_num_threads(max(1, int(settings.num_cpus)))
        self._engine = Engine(settings.engine, EngineMetrics(RayBackend()))
        self._texts = TokenTexts(self._engine.tokenizer)
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._router = router
        self._limits = CallLimits.of(settings)
        self._reporter: asyncio.Task[None] | None = None
        self._ensure_reporter()

    # ---- serving ---------------------------------------------------------------------------------------
    async def generate(
        self, request: GenerateRequest, placement: PlacementHint | None = None
    ) -> AsyncIterator[StreamItem | StreamError]:
        """Stream one call: what each engine step adds to each of its choices, until every choice has finished;
        or one error, then nothing more.

        Each choice is its own engine request on this engine, so that a call's choices prefill in the same
        pass; they do not share the prompt's KV (the engine has no sharing between sequences). `placement`
        is read by the request router in the caller's handle, not here.
        """
        self._ensure_reporter()
        try:
            prompt_ids = [self._token_ids(prompt) for prompt in request.prompts]
            self._limits.check(request, [len(ids) for ids in prompt_ids])
            streams = [self._choice(request, index, prompt_ids[index // request.n]) for index in range(request.choices)]
            started: set[int] = set()
            async for index, out in merged(streams):
                first = index not in started
                started.add(index)
                yield self._item(request, index, out, prompt_ids[index // request.n], first)
        except PromptTooLongError as exc:
            yield StreamError(413, exc.message, exc.param)
        except InvalidRequestError as exc:
            yield StreamError(400, exc.message, exc.param)
        except EngineStoppedError as exc:  # this replica cannot serve any more; its health check now fails
            yield StreamError(503, str(exc), retryable=True)
        except QllmError as exc:
            yield StreamError(503, str(exc))
        except Exception as exc:  # a fault of this server on this request alone: the replica serves on
            logger.exception("request %s failed on this replica", request.request_id)
            yield StreamError(500, f"the engine replica failed on this request ({type(exc).__name__})")

    def _choice(self, request: GenerateRequest, index: int, prompt_ids: list[int]) -> AsyncIterator[RequestOutput]:
        """One choice's engine stream. With a seed, choice j of a prompt samples with seed + j (as vLLM seeds
        them), so that a prompt of a list is answered as it would be alone."""
        params, j = request.params, index % request.n
        if params.seed is not None and j:
            params = dataclasses.replace(params, seed=params.seed + j)
        return self._engine.generate(
            None,
            params,
            request.priority,
            prompt_token_ids=prompt_ids,
            request_id=request.request_id if request.choices == 1 else f"{request.request_id}-{index}",
            ttft_deadline_s=request.ttft_deadline_s,
        )

    def _item(
        self, request: GenerateRequest, index: int, out: RequestOutput, prompt_ids: list[int], first: bool
    ) -> StreamItem:
        prompt_text = None
        if request.echo and first:
            prompt = request.prompts[index // request.n]
            prompt_text = prompt.text if prompt.text is not None else str(self._engine.tokenizer.decode(prompt_ids))
        return StreamItem(
            text_delta=out.text_delta,
            new_token_ids=out.new_token_ids,
            num_output_tokens=out.num_output_tokens,
            prompt_tokens=out.prompt_token_count,
            finished=out.finished,
            finish_reason=out.finish_reason,
            ttft_s=out.ttft_s,
            replica_id=self._replica_id,
            text=out.text,
            index=index,
            logprobs=None if out.new_logprobs is None else tuple(self._texts.entry(lp) for lp in out.new_logprobs),
            prompt_logprobs=(
                None if out.prompt_logprobs is None else self._texts.prompt_entries(prompt_ids, out.prompt_logprobs)
            ),
            prompt_text=prompt_text,
        )

    def _token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids. A text prompt is tokenized here as the engine would tokenize it, so that
        the ids behind its prompt log-probabilities are known. What the tokenizer or the chat template
        refuses is the client's to fix: an `InvalidRequestError` (a 400), not a fault of this replica."""
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        param = "prompt" if prompt.messages is None else "messages"
        for text in _texts(prompt):
            _require_encodable(text, param)
        try:
            if prompt.messages is not None:
                return self._chat_tokens(prompt.messages)
            return list(self._engine.tokenizer(prompt.text, add_special_tokens=False).input_ids)
        except TemplateError as exc:  # the template's own raise_exception: e.g. roles in an order it refuses
            raise InvalidRequestError(f"the model's chat template refuses these messages: {exc}", param) from None
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"the {param} cannot be tokenized: {exc}", param) from None

    def _chat_tokens(self, messages: tuple[ChatTurn, ...]) -> list[int]:
        tokenizer = self._engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        turns = [
            {"role": m.role, "content": m.content} | ({} if m.name is None else {"name": m.name}) for m in messages
        ]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(t) for t in ids]  # type: ignore[union-attr, arg-type]

    # ---- load reporting ---------------------------------------------------------------------------------
    def load(self) -> ReplicaLoad:
        """This replica's load right now (it reads only the engine's published snapshot)."""
        stats = self._engine.stats()
        max_batch = self._settings.engine.max_batch_size
        return replica_load(self._replica_id, stats, max_batch, time.time(), time.monotonic())

    async def record_routing_stats(self) -> dict[str, ReplicaLoad]:
        """Ray Serve polls this for the request router's fallback placement. A coroutine, so it runs on this
        replica's event loop (Serve runs plain methods in a thread pool), where it can start the reporter."""
        self._ensure_reporter()
        return self.load().as_routing_stats()

    async def stats(self, placement: PlacementHint | None = None) -> EngineStats:
        """The engine's stats (tests, operators, benchmarks). `placement`, read by the request router in the
        caller's handle, names the replica to ask (a ranking of one), under either routing mode."""
        return self._engine.stats()

    def ping(self) -> str:
        """Liveness for /health."""
        return self._replica_id

    def check_health(self) -> None:
        """Ray Serve's health check: it fails (and Serve replaces this replica) when the engine loop has died,
        or has had work but finished no step for longer than `engine_stall_timeout_s`."""
        self._engine.check_health(self._settings.engine_stall_timeout_s)

    # The fault hooks take `placement` as `stats` does: a ranking of one names the replica to hit.
    def kill_engine_loop(self, placement: PlacementHint | None = None) -> str:
        """Fault injection: make the engine loop die as a bug in it would; returns this replica's id.
        Refused unless $QLLM_FAULT_INJECTION=1 in this replica's environment (deployments/faults.py)."""
        faults.require_enabled()
        faults.kill_loop(self._engine)
        return self._replica_id

    def fail_next_step(self, placement: PlacementHint | None = None) -> str:
        """Fault injection: the engine's next step raises; returns this replica's id."""
        faults.require_enabled()
        faults.fail_next_step(self._engine)
        return self._replica_id

    def stall_engine_loop(self, seconds: float, placement: PlacementHint | None = None) -> str:
        """Fault injection: the engine loop stalls for `seconds`; returns this replica's id."""
        faults.require_enabled()
        faults.stall_loop(self._engine, seconds)
        return self._replica_id

    def _ensure_reporter(self) -> None:
        if self._router is None or (self._reporter is not None and not self._reporter.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop yet: the next call starts it
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        assert self._router is not None  # noqa: S101
        while True:
            try:
                await self._router.report.remote(self.load())
            except Exception as exc:  # the router restarts on its own; keep serving meanwhile
                logger.debug("load report to the router failed: %s", exc)
            await asyncio.sleep(self._settings.stats_period_s)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown(timeout=1.0)
