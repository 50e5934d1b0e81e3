"""Typed messages between the deployments: what the ingress, the PriorityRouter and the engine replicas
send each other. Every message is a frozen dataclass, pickled by Ray as is; no side reads a dict by key.
No torch here: the ingress and the router import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qllm_core import FinishReason, PriorityClass, SamplingParams

PRIORITY_HEADER = "x-qllm-priority"
"""The HTTP header naming a request's class (a `PriorityClass` name) when the body has no `priority`: the
ingress reads it, the benchmarks' HTTP runner sends it."""

# ---- ingress <-> PriorityRouter: admission, and replica -> router: load reports ----------------------

PLACEMENT_KWARG = "placement"
"""The keyword argument of `EngineReplica.generate` that carries a `PlacementHint` to Ray Serve's request
router in the caller's handle (Serve hands a request router the call's kwargs, nothing else)."""

_ROUTING_STATS_KEY = "load"


@dataclass(frozen=True)
class TtftObservation:
    """One request's time to first token, and when it came on the wall clock (`time.time()`): the engine's
    monotonic stamp means nothing in the router's process, a wall-clock one lets the router age it."""

    at: float
    ttft_s: float


@dataclass(frozen=True)
class ClassLoad:
    """One class's share of a replica's load."""

    waiting: int
    """Queued for a prefill (or the rest of one)."""
    running: int
    """Inside a forward pass or queued for a decode step."""
    recent_ttft: tuple[TtftObservation, ...]
    """The engine's latest TTFTs of this class, oldest first."""


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's load as it reports it: to the PriorityRouter every `stats_period_s`, and to Ray Serve's
    request router as its routing stats (the fallback placement when the PriorityRouter is down)."""

    replica_id: str
    ls: ClassLoad
    be: ClassLoad
    kv_usage: float
    """Fraction of the KV cache in use."""
    max_batch_size: int
    reported_at: float
    """Wall-clock time of the snapshot."""

    def of(self, priority: PriorityClass) -> ClassLoad:
        """The load of one class."""
        return self.ls if priority is PriorityClass.LATENCY_SENSITIVE else self.be

    @property
    def in_flight(self) -> int:
        """Requests of either class waiting or running."""
        return self.ls.waiting + self.ls.running + self.be.waiting + self.be.running

    def as_routing_stats(self) -> dict[str, ReplicaLoad]:
        """What `record_routing_stats` returns: Ray Serve requires a dict there, so the load travels (pickled,
        as is) under one key, written and read only by this class."""
        return {_ROUTING_STATS_KEY: self}

    @staticmethod
    def from_routing_stats(stats: Mapping[str, object]) -> ReplicaLoad | None:
        """Inverse of `as_routing_stats`; None for a replica Serve has no stats of yet (an empty dict)."""
        load = stats.get(_ROUTING_STATS_KEY)
        return load if isinstance(load, ReplicaLoad) else None


@dataclass(frozen=True)
class Placed:
    """The PriorityRouter admitted a request."""

    ranking: tuple[str, ...]
    """Replica ids, best first; empty while the router knows no replica (Serve's request router picks)."""
    held_s: float = 0.0
    """How long the router held it (BE only)."""


@dataclass(frozen=True)
class Rejected:
    """A class's queue is full: the client gets 429 with Retry-After."""

    priority: PriorityClass
    retry_after_s: float


AdmitAnswer = Placed | Rejected
"""What `PriorityRouter.admit` answers."""


class Overloaded(Exception):
    """Raised to the ingress, through the handle's response, when the request router's fallback admission
    (the PriorityRouter is down) finds the class's queue full."""

    def __init__(self, answer: Rejected) -> None:
        super().__init__(answer)  # as its only argument, so that it pickles
        self.answer = answer

    def __str__(self) -> str:
        return f"the {self.answer.priority.label} queue is full"


@dataclass(frozen=True)
class PlacementHint:
    """What the ingress passes to Ray Serve's request router (as `PLACEMENT_KWARG`) with every request."""

    priority: PriorityClass
    ranking: tuple[str, ...] = ()
    """The PriorityRouter's ranking, best first; empty: the request router ranks by reported load itself
    (the PriorityRouter is down, or routing is power_of_two)."""
    admitted: bool = False
    """The PriorityRouter admitted it; False: the request router applies the queue bounds itself, on the
    load the replicas report (the PriorityRouter is down)."""
    sequences: int = 1
    """The engine requests the call fans out to (`GenerateRequest.choices`): what placements count."""


@dataclass(frozen=True)
class Outlook:
    """A replica's prospects for new work, as the routing rules (`deployments.load`) see them."""

    load: ReplicaLoad
    predicted_ls_ttft_s: float
    """What a new LS request's TTFT there is expected to be."""
    predicted_be_ttft_s: float
    """What a new BE request's TTFT there is expected to be (how soon BE work starts there)."""
    be_spare: int
    """Batch slots left for BE after everything queued, running and placed since the report."""
    ls_attainment: float | None
    """Share of its recent LS TTFTs within the SLO (None with none in the window)."""
    be_attainment: float | None
    at_risk: bool
    """Its LS SLO is in danger: LS should go elsewhere when it can, BE goes elsewhere first."""

    @property
    def replica_id(self) -> str:
        """The replica's id."""
        return self.load.replica_id


@dataclass(frozen=True)
class RouterStats:
    """`PriorityRouter.stats()`: its view of the replicas and what it has decided so far."""

    replicas: dict[str, Outlook]
    """By replica id, the replicas that report."""
    be_held: int
    """BE requests held at the router now."""
    placed_ls: int
    placed_be: int
    be_holds: int
    """BE requests ever held (released since or not)."""
    rejected: int
    """Requests answered 429, both classes."""


# ---- ingress <-> EngineReplica: the request, its stream items and errors ------------------------------


@dataclass(frozen=True)
class ChatTurn:
    """One chat message; the replica applies the model's chat template to the turns."""

    role: str
    content: str
    """Its text: a list of text parts arrives joined, a null assistant turn as ''."""
    name: str | None = None


@dataclass(frozen=True)
class Prompt:
    """What to continue: exactly one of text, token ids, or chat turns."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatTurn, ...] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("text", "token_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a Prompt holds exactly one of text, token_ids, messages; got {given or 'none'}")


@dataclass(frozen=True)
class GenerateRequest:
    """One call from the ingress to an engine replica, validated at the HTTP edge: `n` choices for each of
    its prompts, all run on this one replica (so that they share its engine and prefill in the same pass).
    Choice `i * n + j` is the `j`-th choice of prompt `i`, as OpenAI numbers them."""

    request_id: str
    priority: PriorityClass
    prompt: Prompt
    params: SamplingParams
    ttft_deadline_s: float | None = None
    """This request's own time-to-first-token deadline, if the client set one."""
    more_prompts: tuple[Prompt, ...] = ()
    """The other prompts of a completions call given a list, in order after `prompt`."""
    n: int = 1
    """Choices per prompt, each its own sequence (with a seed, choice `j` of a prompt samples with seed + j)."""
    echo: bool = False
    """Send each choice's prompt back as text (`StreamItem.prompt_text`)."""

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        """Every prompt of the call, in order."""
        return (self.prompt, *self.more_prompts)

    @property
    def choices(self) -> int:
        """How many choices the call's stream ends with."""
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class TokenText:
    """A token as OpenAI's log-probability fields show it, made on the replica (the ingress has no tokenizer)."""

    text: str
    """The token decoded alone; U+FFFD where it holds only part of a character."""
    utf8: bytes
    """The token's own bytes: part of a character's where its text shows U+FFFD."""


@dataclass(frozen=True)
class ScoredToken:
    """One candidate token at a position and its log-probability."""

    token: TokenText
    logprob: float


@dataclass(frozen=True)
class LogprobEntry:
    """One position of a prompt or an output: its token, that token's log-probability under the model (before
    temperature and penalties) and the most likely alternatives there, most likely first."""

    token: TokenText
    logprob: float | None
    """None only for a prompt's first token, which nothing predicts."""
    top: tuple[ScoredToken, ...] = ()


@dataclass(frozen=True)
class StreamItem:
    """What one engine step produced for one choice: only what is new since that choice's previous item (a
    cumulative copy on every item would make a long answer quadratic). The finished item also carries the
    whole text. A call's items interleave its choices; it has ended when each choice has finished."""

    text_delta: str
    """Text since the previous item; never half a UTF-8 character (the engine holds it back)."""
    new_token_ids: tuple[int, ...]
    num_output_tokens: int
    """Tokens generated so far."""
    prompt_tokens: int
    finished: bool
    finish_reason: FinishReason | None
    ttft_s: float | None
    """The engine's time to first token (from the request's arrival at the replica)."""
    replica_id: str
    text: str = ""
    """The whole output text, decoded once from all its tokens; on the finished item only."""
    index: int = 0
    """The choice (`GenerateRequest` numbers them)."""
    logprobs: tuple[LogprobEntry, ...] | None = None
    """With `SamplingParams.logprobs`: one entry per token of `new_token_ids`."""
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None
    """With `SamplingParams.prompt_logprobs`, on a choice's first item: one entry per prompt token."""
    prompt_text: str | None = None
    """With `GenerateRequest.echo`, on a choice's first item: the prompt as text."""


@dataclass(frozen=True)
class StreamError:
    """Why a request ended without its answer: as a replica's first (and only) item, or mid-stream."""

    status: int
    """The HTTP status the ingress answers with when no output has been sent yet."""
    message: str
    param: str | None = None
    retryable: bool = False
    """The replica, not the request, is at fault (its engine stopped): a request with no output yet may be
    placed on another replica."""
