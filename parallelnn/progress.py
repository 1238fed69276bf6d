"""Live progress on rank 0: a tqdm bar on a terminal, plain periodic lines elsewhere, nothing with --quiet.

The hot loop calls :meth:`Progress.step` every step; it only compares a clock reading until it is
time to redraw (a few times a second on a terminal, every ``line_every`` seconds in a log), so
progress costs nothing measurable. Reading the loss value (a device sync on GPU) happens only then.
"""

from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, enabled: bool, total_steps: int, epochs: int, unit: str = "samples",
                 stream=None, line_every: float = 10.0, tty: bool | None = None):
        self.enabled, self.total, self.epochs, self.unit = enabled, total_steps, epochs, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.25 if self.tty else line_every
        self.bar = None
        self.t_start = self.t_last = time.perf_counter()
        self.done = 0
        self.units_done = 0.0
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True,
                                mininterval=self.interval, leave=True)
            except ImportError:
                self.bar = None

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
        elapsed = t - self.t_start
        self.t_last = t
        rate = self.units_done / elapsed if elapsed > 0 else 0.0
        loss = loss_fn()
        loss_text = f"{loss:.4f}" if loss is not None else "n/a"
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
            self.bar.set_postfix_str(f"loss {loss_text}, {rate:,.0f} {self.unit}/s", refresh=False)
            self.bar.update(self.done - self.bar.n)
        else:
            eta = (self.total - self.done) * elapsed / self.done
            print(f"epoch {epoch + 1}/{self.epochs} step {self.done}/{self.total} loss {loss_text} "
                  f"{rate:,.0f} {self.unit}/s ETA {_eta(eta)}", file=self.stream, flush=True)

    def pause(self) -> float:
        return time.perf_counter()

    def resume(self, paused_at: float) -> None:
        """Leave time spent outside training (evaluation) out of the rate and ETA."""
        self.t_start += time.perf_counter() - paused_at

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
