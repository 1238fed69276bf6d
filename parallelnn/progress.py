"""Live progress on rank 0: a tqdm bar on a terminal, plain periodic lines elsewhere, nothing with --quiet.

    parallelnn run mnist                    # a terminal: one bar, redrawn 4 times a second
    parallelnn run mnist 2>&1 | tee log     # not a terminal: a plain line every 10 s (and at the end)
    parallelnn run mnist --quiet            # neither

Both show the epoch, the step, the loss, samples/s (tokens/s for language models) and the ETA.
The hot loop calls :meth:`Progress.step` every step; it adds two numbers and reads a clock until it
is time to redraw, so progress costs nothing measurable. Reading the loss (a device sync on GPU)
happens only at a redraw. The rate is the average since training began and the ETA the wall-clock
time left at that pace, evaluation included (a loop that brackets evaluation with :meth:`pause` and
:meth:`resume` leaves it out of both). Only the runner's rank 0 gets an enabled Progress.
"""

from __future__ import annotations

import sys
import time

TTY_INTERVAL = 0.25  # seconds between redraws of the bar
LINE_INTERVAL = 10.0  # seconds between plain lines in a log


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, enabled: bool, total_steps: int, epochs: int, unit: str = "samples",
                 stream=None, line_every: float = LINE_INTERVAL, tty: bool | None = None):
        self.enabled, self.total, self.epochs, self.unit = enabled, max(total_steps, 1), epochs, unit
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.bar = None
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                # Our rate and ETA go in the postfix: tqdm's would be in steps, not samples or tokens.
                self.bar = tqdm(total=self.total, file=self.stream, dynamic_ncols=True, leave=True,
                                mininterval=TTY_INTERVAL, unit="step",
                                bar_format="{desc} {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} "
                                           "[{elapsed}{postfix}]")
            except ImportError:
                self.bar = None  # no tqdm: plain lines, as in a log
        self.interval = TTY_INTERVAL if self.bar is not None else line_every
        self.t_start = self.t_last = time.perf_counter()
        self.done = 0
        self.units_done = 0.0

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def step(self, epoch: int, units: float, loss_fn) -> None:
        """One training step done. ``loss_fn()`` returns the current loss (called only when drawing)."""
        if not self.enabled:
            return
        self.done += 1
        self.units_done += units
        t = time.perf_counter()
        if t - self.t_last < self.interval and self.done < self.total:
            return
        self.t_last = t
        self.draw(epoch, loss_fn(), t)

    def status(self, epoch: int, loss: float | None, t: float) -> tuple[str, str]:
        """(where: "epoch E/N", what: "loss L, R unit/s, ETA h:mm:ss") at time ``t``."""
        elapsed = t - self.t_start
        rate = self.units_done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) * elapsed / self.done if self.done else 0.0
        loss_text = f"{loss:.4f}" if loss is not None else "n/a"
        return f"epoch {epoch + 1}/{self.epochs}", f"loss {loss_text}, {rate:,.0f} {self.unit}/s, ETA {_eta(eta)}"

    def draw(self, epoch: int, loss: float | None, t: float) -> None:
        where, what = self.status(epoch, loss, t)
        if self.bar is not None:
            self.bar.set_description_str(where, refresh=False)
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(self.done - self.bar.n)
        else:
            print(f"{where} step {self.done}/{self.total}: {what}", file=self.stream, flush=True)

    def pause(self) -> float:
        return time.perf_counter()

    def resume(self, paused_at: float) -> None:
        """Leave time spent outside training (evaluation) out of the rate and ETA."""
        self.t_start += time.perf_counter() - paused_at

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    """A terminal a bar can be drawn on: a zero-width pseudo-terminal (``script`` without one) would
    show an empty bar, so it gets plain lines too."""
    import os

    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # a closed or file-like stream without a terminal
        return False
