"""Progress as plain lines, for output that is no terminal (CI, `| tee`, Docker and Azure ML job logs).

A terminal gets rich's bars; a log file gets nothing from them until the end. These lines say the same every few
seconds: `step 12/60 (20%)  loss 2.314  812 tokens/s  elapsed 0:15  ETA 0:45`. The runner writes them into the
job log (what `orch logs -f` and Azure ML's std_log show) and the CLI writes them when stderr is not a terminal.
"""

from __future__ import annotations

import os
import time

INTERVAL_ENV = "ORCH_PROGRESS_INTERVAL"  # seconds between lines (default 5; 0: a line per progress event)
DEFAULT_INTERVAL_S = 5.0
TRAIN_LOSS_NAMES = ("train_loss", "loss")


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def clock(seconds: float) -> str:
    """0:45, 12:03, 1:02:03."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines:
    """One pass's progress turned into lines: the first step, then one line every `interval` seconds, and the
    last step. Rates (tokens/s) and the ETA are measured from the first progress seen, on the events' own clock."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = progress_interval() if interval is None else interval
        self.started: float | None = None
        self.first: tuple[float, int, int | None] | None = None  # (t, done, tokens) of the first progress event
        self.last_line_t: float | None = None
        self.loss: float | None = None

    def metric(self, name: str, value: float) -> None:
        if name in TRAIN_LOSS_NAMES:
            self.loss = float(value)

    def update(
        self, done: int, total: int, *, t: float | None = None, tokens: int | None = None, desc: str = ""
    ) -> str | None:
        """The line to print for this progress event, or None when the last line is too recent."""
        now = time.time() if t is None else float(t)
        if self.first is None:
            self.first = (now, done, tokens)
            self.started = now
        last = total > 0 and done >= total
        due = self.last_line_t is None or now - self.last_line_t >= self.interval
        if not (due or last) or done <= 0:
            return None
        self.last_line_t = now
        return self.format(done, total, now, tokens, desc)

    def format(self, done: int, total: int, now: float, tokens: int | None, desc: str) -> str:
        assert self.first is not None and self.started is not None
        t0, done0, tokens0 = self.first
        parts = [f"step {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total > 0 else "")]
        if desc:
            parts[0] += f" {desc}"
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        span = now - t0
        if tokens is not None and tokens0 is not None and span > 0 and tokens > tokens0:
            parts.append(f"{(tokens - tokens0) / span:,.0f} tokens/s")
        parts.append(f"elapsed {clock(now - self.started)}")
        if total > 0 and done < total and done > done0 and span > 0:
            parts.append(f"ETA {clock(span / (done - done0) * (total - done))}")
        return "  ".join(parts)
