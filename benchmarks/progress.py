"""A progress bar for long sweeps: tqdm when it is installed, else one rewritten line on stderr."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

_MIN_REDRAW_S = 0.5


class Progress:
    """Counts finished requests against a total. `enabled=False` prints nothing (tests, piped output)."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.description = ""
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._last_draw = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self._bar = None
            else:
                self._bar = tqdm(total=total, unit="req", file=self._stream, dynamic_ncols=True)

    def describe(self, text: str) -> None:
        """Say what is running now (shown before the bar)."""
        self.description = text
        if self._bar is not None:
            self._bar.set_description(text)
        self._draw(force=True)

    def update(self, n: int = 1) -> None:
        """Count `n` more finished requests."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._draw()

    def close(self) -> None:
        """End the bar (leaves the final line in place)."""
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            self._draw(force=True)
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self._enabled or self._bar is not None:
            return
        now = time.monotonic()
        # Redraw at most twice a second: a line per request would flood a log.
        if not force and now - self._last_draw < _MIN_REDRAW_S:
            return
        self._last_draw = now
        self._stream.write(f"\r{self.description} {self.done}/{self.total} requests")
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
