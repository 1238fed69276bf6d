"""Hang detection: when no rank has made progress for ``--timeout`` seconds, end the job and name
the rank that is behind.

Each rank's training loop notes where it is (global step and phase) in a plain attribute; a daemon
thread publishes that once a second to the job's key-value store (torchrun's TCPStore). Rank 0's
thread also reads every rank's entry. A collective timeout alone would only say that *a* peer did not
answer; the positions say which one: the rank that finished step 3 while the others wait inside
step 4 is the one that stopped. Rank 0 then records that for torchrun's agent, posts an abort to the
store, and exits; every other rank's thread sees the abort within a second and exits too (a hung main
thread cannot stop itself), so the job ends at once, not after torchrun's shutdown grace period. The
process group's own timeout is set longer, as a backstop.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from datetime import timedelta

from parallelnn.launch import job_store

ABORTED = 3  # exit status of ranks ended by the watchdog's abort (rank 0 exits 1 with the message)
PHASES = {0: "finished step", 1: "in step", 2: "evaluating after step", 3: "checkpointing after step"}


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout: float, restart: int = 0, interval: float = 1.0):
        self.rank, self.world_size, self.timeout, self.interval = rank, world_size, timeout, interval
        self.position = (0, 0)  # (global step, phase)
        self.moved = time.monotonic()
        self._seq = 0
        self.store = job_store("parallelnn/watchdog", restart, timedelta(seconds=30))
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (seq, when rank 0 saw it change)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="parallelnn-watchdog", daemon=True)
        self.thread.start()

    def at(self, step: int, phase: int) -> None:
        """Called by the training loop; cheap (two attribute writes)."""
        self.position = (step, phase)
        self.moved = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    # -- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._seq += 1
                idle = time.monotonic() - self.moved
                self.store.set(f"rank{self.rank}", json.dumps([*self.position, idle, self._seq]))
                if self.rank == 0:
                    self._judge()
                elif self.store.check(["abort"]):
                    os._exit(ABORTED)
            except Exception:  # noqa: BLE001 - the store went away: the job is ending anyway
                return

    def _judge(self) -> None:
        now = time.monotonic()
        states = {}
        for r in range(self.world_size):
            key = f"rank{r}"
            if not self.store.check([key]):
                continue
            step, phase, idle, seq = json.loads(self.store.get(key))
            last_seq, since = self._seen.get(r, (None, now))
            if seq != last_seq:
                since = now
            self._seen[r] = (seq, since)
            # A rank whose thread no longer publishes is frozen as a whole: idle since it went quiet.
            states[r] = (step, phase, max(idle, now - since))
        if len(states) < self.world_size or min(s[2] for s in states.values()) < self.timeout:
            return
        self._fire(states)

    def _fire(self, states: dict[int, tuple[int, int, float]]) -> None:
        behind = min(states, key=lambda r: (states[r][0], states[r][1], -states[r][2]))
        step, phase, idle = states[behind]
        ahead = [r for r in states if (states[r][0], states[r][1]) > (step, phase)]
        if ahead:
            r = ahead[0]
            message = (f"rank {behind} stopped responding: no progress for {idle:.0f}s since it "
                       f"{PHASES[phase]} {step}, while rank{'s' if len(ahead) > 1 else ''} "
                       f"{', '.join(map(str, ahead))} wait{'' if len(ahead) > 1 else 's'} "
                       f"{PHASES[states[r][1]]} {states[r][0]} (--timeout {self.timeout:.0f}s)")
        else:
            message = (f"no rank made progress for {idle:.0f}s, all {PHASES[phase]} {step}: a collective is "
                       f"stuck (--timeout {self.timeout:.0f}s)")
        try:
            from parallelnn.config import SPAWNED_ENV

            if not os.environ.get(SPAWNED_ENV):  # else the parallelnn command that spawned us says it
                print(f"parallelnn: error: {message}", file=sys.stderr, flush=True)
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(TimeoutError(message))
            self.store.set("abort", message)
        finally:
            os._exit(1)
