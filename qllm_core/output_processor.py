"""After a pass: sample, check stops, detokenise, build each request's output, and end requests.

Every request ends here (`finish`), however it ends, so its KV is freed, its per-request state dropped and
its finish metrics recorded in one place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from qllm_core.cache import KVCache
from qllm_core.detokenizer import Detokenizer
from qllm_core.forward import ForwardPass, PassEntry
from qllm_core.logprobs import TokenLogprob
from qllm_core.metrics import EngineMetrics
from qllm_core.models.registry import LoadedModel
from qllm_core.outputs import RequestOutput
from qllm_core.request import FinishReason, PriorityClass, Request, RequestState
from qllm_core.request_table import RequestTable
from qllm_core.sampler import Sampler, token_logprobs
from qllm_core.stats import TtftSample
from qllm_core.timeline import Timeline


class OutputProcessor:
    """Turns a completed pass into outputs, and ends requests."""

    def __init__(
        self,
        loaded: LoadedModel,
        kv: KVCache,
        table: RequestTable,
        metrics: EngineMetrics,
        ttft_window: int,
        busy_clock: Callable[[], float],
    ) -> None:
        """`busy_clock`: the engine's running total of time spent in passes (for timelines)."""
        self._loaded = loaded
        self._kv = kv
        self._table = table
        self._metrics = metrics
        self._busy_clock = busy_clock
        self.sampler = Sampler(loaded.device)
        self.detokenizer = Detokenizer(loaded.tokenizer)
        self._emitted: dict[str, str] = {}
        """Text shown so far per request (what the next delta starts after)."""
        self.recent_ttft: dict[PriorityClass, deque[TtftSample]] = {c: deque(maxlen=ttft_window) for c in PriorityClass}
        self.passes_completed = 0
        self._tokens_out = [metrics.generated_tokens.labels(c.label) for c in PriorityClass]

    # ---- a completed pass ------------------------------------------------------------------------------
    def complete(self, finished: ForwardPass, now: float) -> list[RequestOutput]:
        """Sample the entries that want a token, advance every entry's KV mark, and build the outputs."""
        self.passes_completed += 1
        entries = finished.entries
        sampling = [(i, e) for i, e in enumerate(entries) if e.samples and not e.request.abort_requested]
        tokens: list[int] = []
        if sampling:
            assert finished.logits is not None  # noqa: S101
            logits = finished.logits
            last_rows = [self._last_row(finished, i) for i, _ in sampling]
            if last_rows != list(range(len(logits))):  # a decode batch samples every row: no gather then
                logits = logits.index_select(0, torch.tensor(last_rows, dtype=torch.long, device=logits.device))
            tokens = self.sampler.sample(logits, [e.request for _, e in sampling])
        chosen = {i: t for (i, _), t in zip(sampling, tokens, strict=True)}
        outputs = []
        generated = [0] * len(PriorityClass)
        for i, entry in enumerate(entries):
            request = entry.request
            request.num_cached_tokens = entry.start + len(entry.token_ids)
            if entry.all_logits:
                self._gather_prompt_logprobs(finished, i, entry)
            if request.abort_requested:
                outputs.append(self.finish(request, FinishReason.ABORT, now))
            elif i not in chosen:  # a chunk short of its prompt's end: the rest waits for a later pass
                self._table.move(request, RequestState.WAITING)
            else:
                generated[request.priority] += 1
                outputs.append(self._append(request, chosen[i], finished, i, now))
        for cls, count in zip(PriorityClass, generated, strict=True):
            if count:  # once per class, not per token: a labelled inc takes a lock
                self._tokens_out[cls].inc(count)
        return outputs

    @staticmethod
    def _last_row(finished: ForwardPass, i: int) -> int:
        rows = finished.logit_rows[i]
        assert rows is not None  # noqa: S101
        return rows.stop - 1

    def _gather_prompt_logprobs(self, finished: ForwardPass, i: int, entry: PassEntry) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict (the first has none)."""
        request = entry.request
        top = request.params.prompt_logprobs
        rows = finished.logit_rows[i]
        assert top is not None and rows is not None and finished.logits is not None  # noqa: S101
        prompt = request.prompt_token_ids
        if entry.start == 0:
            request.prompt_logprobs.append(None)
        # Position p predicts token p + 1; only those inside the prompt are prompt log-probabilities.
        end = min(entry.start + len(entry.token_ids), len(prompt) - 1)
        if end > entry.start:
            logits = finished.logits[rows][: end - entry.start]
            request.prompt_logprobs.extend(token_logprobs(logits, prompt[entry.start + 1 : end + 1], top))

    def _append(self, request: Request, token: int, finished: ForwardPass, i: int, now: float) -> RequestOutput:
        request.output_token_ids.append(token)
        request.times.tokens.append(now)
        cls = request.priority
        first = request.times.first_token is None
        timeline = None
        if first:
            request.times.first_token = now
            ttft = now - request.arrival
            self._metrics.ttft.labels(cls.label).observe(ttft)
            self.recent_ttft[cls].append(TtftSample(now, ttft))
            scheduled = request.times.first_scheduled
            queued = (scheduled if scheduled is not None else now) - request.arrival
            timeline = request.marks.timeline(ttft, queued, self._busy_clock())
        params = request.params
        new_logprobs = None
        if params.logprobs is not None:
            assert finished.logits is not None  # noqa: S101
            row = finished.logits[self._last_row(finished, i)][None]
            new_logprobs = tuple(token_logprobs(row, [token], params.logprobs))
        prompt_logprobs = tuple(request.prompt_logprobs) if first and params.prompt_logprobs is not None else None
        text = self.detokenizer.text(request.request_id, request.output_token_ids)
        reason: FinishReason | None = None
        stop_hit = stop_index(text, params.stop) >= 0
        if (
            stop_hit
            or token in params.stop_token_ids
            or (token in self._loaded.eos_token_ids and not params.ignore_eos)
        ):
            reason = FinishReason.STOP
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self._loaded.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            final = self.detokenizer.full(request.output_token_ids)
            cut = stop_index(final, params.stop)
            final = final if cut < 0 else final[:cut]
            return self.finish(request, reason, now, final, None, (token,), new_logprobs, prompt_logprobs, timeline)
        self._table.move(request, RequestState.READY)
        shown = streamable(text, params.stop)
        emitted = self._emitted.get(request.request_id, "")
        self._emitted[request.request_id] = shown
        return self._output(
            request, (token,), shown[len(emitted) :], None, None, new_logprobs, prompt_logprobs, timeline
        )

    # ---- ending a request ------------------------------------------------------------------------------
    def finish(
        self,
        request: Request,
        reason: FinishReason,
        now: float,
        text: str | None = None,
        error: str | None = None,
        new: tuple[int, ...] = (),
        new_logprobs: tuple[TokenLogprob, ...] | None = None,
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
        timeline: Timeline | None = None,
    ) -> RequestOutput:
        """End a request for any reason: free its KV and per-request state, record its finish metrics."""
        rid = request.request_id
        request.finish_reason = reason
        request.times.finished = now
        self._table.move(request, RequestState.FINISHED)
        self._table.remove(request)
        self._kv.free(rid)
        self.sampler.forget(rid)
        self.detokenizer.forget(rid)
        emitted = self._emitted.pop(rid, "")
        text = emitted if text is None else text
        # The held-back tail (a stop string's start, half a character) is what the final text adds.
        delta = text[len(emitted) :] if text.startswith(emitted) else ""
        cls = request.priority.label
        self._metrics.requests.labels(cls, reason.value).inc()
        self._metrics.e2e.labels(cls).observe(now - request.arrival)
        n = len(request.output_token_ids)
        if n > 1 and request.times.first_token is not None:
            self._metrics.tpot.labels(cls).observe((request.times.tokens[-1] - request.times.first_token) / (n - 1))
        return self._output(request, new, delta, text, error, new_logprobs, prompt_logprobs, timeline)

    @staticmethod
    def _output(
        request: Request,
        new: tuple[int, ...],
        delta: str,
        final_text: str | None = None,
        error: str | None = None,
        new_logprobs: tuple[TokenLogprob, ...] | None = None,
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
        timeline: Timeline | None = None,
    ) -> RequestOutput:
        finished = final_text is not None
        return RequestOutput(
            request_id=request.request_id,
            priority=request.priority,
            prompt_token_count=len(request.prompt_token_ids),
            new_token_ids=new,
            num_output_tokens=len(request.output_token_ids),
            text_delta=delta,
            finished=finished,
            finish_reason=request.finish_reason,
            error=error,
            ttft_s=request.times.ttft,
            preemptions=request.preemptions,
            token_ids=tuple(request.output_token_ids) if finished else (),
            text=final_text or "",
            new_logprobs=new_logprobs,
            prompt_logprobs=prompt_logprobs,
            timeline=timeline,
        )


def stop_index(text: str, stops: tuple[str, ...]) -> int:
    """Where the first stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to show mid-stream: hold back a tail that may be the start of a stop string, or half a character."""
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        hold = max(hold, 1)
    return text[: len(text) - hold]
