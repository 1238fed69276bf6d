"""Fault injection for tests, in one place: ``PARALLELNN_FAULT=RANK:STEP:KIND``.

For testing what users meet in production, rank RANK (``*``: every rank), at global step STEP:

* ``raise``: raises after the step; ``kill``: dies (SIGKILL); ``hang``: its main thread sleeps forever;
* ``stop``: 0.25 s after the step, the whole process freezes (SIGSTOP to itself: the watchdog thread too);
* ``enospc``: its checkpoint save at STEP fails as a full disk would (``OSError(ENOSPC)``);
* ``slow-eval=S``: from STEP on, every evaluation takes about S seconds more, spread over its batches.

A fault fires only in the first attempt of a job (not after a torchrun restart), so a restarted job can
finish. Nothing else in the package reads ``PARALLELNN_FAULT``: the trainer calls :func:`install`, the
checkpointer calls :func:`before_save_completes`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

FAULT_ENV = "PARALLELNN_FAULT"
KINDS = ("raise", "kill", "hang", "stop", "enospc", "slow-eval")


@dataclass(frozen=True)
class Fault:
    rank: int | None  # None: every rank
    step: int
    kind: str
    arg: float = 0.0


def parse(spec: str | None) -> Fault | None:
    if not spec:
        return None
    try:
        rank, step, kind = spec.split(":")
        kind, _, arg = kind.partition("=")
        fault = Fault(None if rank == "*" else int(rank), int(step), kind, float(arg or 0))
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected RANK:STEP:KIND") from None
    if kind not in KINDS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: KIND is one of {', '.join(KINDS)}")
    return fault


def active(ctx) -> Fault | None:
    """This rank's fault in this attempt of the job, or None."""
    fault = parse(os.environ.get(FAULT_ENV))
    if fault is None or ctx.restart_count > 0 or fault.rank not in (None, ctx.rank):
        return None
    return fault


def install(trainer, ctx) -> None:
    """Arm this rank's fault on ``trainer``: an after-step hook, or a slower evaluation."""
    fault = active(ctx)
    if fault is None:
        return
    if fault.kind in ("raise", "kill", "hang", "stop"):
        trainer.hooks.after_step.append(_after_step(fault, ctx))
    elif fault.kind == "slow-eval":
        inner, batches = trainer.engine.eval_step, max(len(trainer.test_loader), 1)

        def slow_eval_step(x, y):
            out = inner(x, y)
            if trainer.state.global_step >= fault.step:
                time.sleep(fault.arg / batches)
            return out

        trainer.engine.eval_step = slow_eval_step


def _after_step(fault: Fault, ctx):
    def hook(trainer) -> None:
        if trainer.state.global_step != fault.step:
            return
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault: rank {ctx.rank} raised after step {fault.step}")
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "stop":
            # As a freeze from outside would come: not within the same microsecond as the step's end,
            # so the watchdog thread has published the finished step (it does within milliseconds).
            time.sleep(0.25)
            os.kill(os.getpid(), signal.SIGSTOP)
        if fault.kind == "hang":
            while True:
                time.sleep(3600)

    return hook


def before_save_completes(ctx, step: int) -> None:
    """Called by the checkpointer between writing files: the injected full disk."""
    fault = active(ctx)
    if fault is not None and fault.kind == "enospc" and fault.step == step:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
