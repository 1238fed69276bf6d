"""Live progress: plain lines when not on a terminal, a tqdm bar on one, nothing with --quiet, and no
per-step cost worth measuring."""

from __future__ import annotations

import io
import re
import time

from conftest import cli, main
from parallelnn.progress import Progress

LINE = re.compile(r"^epoch \d+/\d+ step \d+/\d+: loss (\d+\.\d{4}|n/a), [\d,]+ samples/s, ETA \d+:\d\d:\d\d$")


def drive(progress: Progress, steps: int, epochs: int, calls: list | None = None) -> None:
    per_epoch = steps // epochs
    for i in range(steps):
        def loss(i=i):
            if calls is not None:
                calls.append(i)
            return 1.0 / (i + 1)
        progress.step(i // per_epoch, 64, loss)
    progress.close()


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    drive(Progress(True, 20, 2, stream=out, line_every=0.0, tty=False), 20, 2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].startswith("epoch 1/2 step 1/20: loss 1.0000, ")
    assert lines[-1].startswith("epoch 2/2 step 20/20: loss 0.0500, ") and lines[-1].endswith("ETA 0:00:00")


def test_lines_are_rate_limited_and_the_loss_is_read_only_when_drawing():
    out, calls = io.StringIO(), []
    progress = Progress(True, 100_000, 1, stream=out, line_every=10.0, tty=False)
    t0 = time.perf_counter()
    drive(progress, 100_000, 1, calls)
    per_step = (time.perf_counter() - t0) / 100_000
    # Only the last step draws (within 10 s): one line, one read of the loss (a device sync on a GPU).
    assert calls == [99_999] and len(out.getvalue().splitlines()) == 1
    assert per_step < 20e-6, per_step  # a few hundred nanoseconds in practice


def test_quiet_writes_nothing():
    out = io.StringIO()
    progress = Progress(False, 10, 1, stream=out, line_every=0.0, tty=False)
    drive(progress, 10, 1)
    progress.message("epoch 1/1: done")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_with_epoch_step_loss_rate_and_eta():
    out = io.StringIO()
    progress = Progress(True, 10, 2, stream=out, tty=True)
    assert progress.bar is not None
    progress.interval = 0.0  # draw every step here
    drive(progress, 10, 2)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    last = text.split("\r")[-1]  # the bar as close() left it
    assert re.search(r"^epoch 2/2 +100%\|.*\| step 10/10 \[.*, loss 0\.1000, [\d,]+ samples/s, ETA 0:00:00\]\n$",
                     last), last


def test_run_output_in_a_pipe_is_plain_lines(tmp_path, capfd):
    proc = cli("run", "iris", "--epochs", "2", "--out", str(tmp_path / "i"))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if " step " in line]
    assert progress and all(LINE.match(line) for line in progress), proc.stderr
    assert progress[-1].startswith("epoch 2/2 step 4/4: ")  # 120 samples, batch 64: 2 steps an epoch
    assert "epoch 2/2: train loss" in proc.stderr
    capfd.readouterr()
    assert main("run", "iris", "--epochs", "2", "--out", str(tmp_path / "q"), "--quiet") == 0
    assert capfd.readouterr() == ("", "")
