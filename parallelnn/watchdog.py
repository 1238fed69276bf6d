"""Hang detection: when no rank has made progress for ``--timeout`` seconds, end the job and name
the rank that is behind, with its last step and phase.

Each rank's training loop notes where it is (global step and :class:`Phase`) in a plain attribute;
the evaluation notes every batch, so a long evaluation is progress, not a hang. A daemon thread
publishes the position to the job's key-value store (torchrun's TCPStore) as soon as it changes (at
most every 20 ms) and at least once a second, with the process's PID and host; the first entry is
written when the watchdog starts, before training, so a rank frozen at its first step has one. Rank
0's thread reads every entry once a second; every other rank reads rank 0's, and takes over the
judging when rank 0 itself falls silent.

The judge fires when every rank has been idle for its limit: ``--timeout``, plus, in an evaluation
or a checkpoint save (one call, no progress to see inside), three times the longest earlier one of
that rank (the first is allowed ``--timeout`` without progress: for an evaluation, between batches).
A rank whose thread stopped publishing (``frozen``: SIGSTOP, a swapped-out or wedged process) is the
one behind; else the rank at the lowest (step, phase). The judge then records the message for
torchrun's agent, posts an abort naming the frozen processes to the store, has those on its machine
SIGKILLed half a second later (SIGTERM does not end a stopped process; the delay lets the agent see
the judging rank end first) and exits; every other rank's thread sees the abort within a second,
does the same for the frozen ones on its machine and exits too (a hung main thread cannot stop
itself). So the job ends within about ``--timeout`` + 3 s. The process group's own timeout is
longer, as a backstop.
"""
from __future__ import annotations

import enum
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

from parallelnn.launch import job_store

MIN_GAP = 0.02  # seconds between two entries of one rank: a published position lags at most this (+ the GIL)
ABORTED = 3  # exit status of ranks ended by the watchdog's abort (the judging rank exits 1 with the message)


class Phase(enum.IntEnum):
    """Where a rank is, in the order a step goes through them."""

    FINISHED = 0  # finished step N (between steps)
    STEP = 1  # in step N (forward, backward, optimizer, their collectives)
    EVAL = 2  # evaluating after step N
    CHECKPOINT = 3  # saving a checkpoint after step N

    @property
    def words(self) -> str:
        return {Phase.FINISHED: "finished step", Phase.STEP: "in step", Phase.EVAL: "evaluating after step",
                Phase.CHECKPOINT: "checkpointing after step"}[self]


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout: float, restart: int = 0, interval: float = 1.0):
        self.rank, self.world_size, self.timeout, self.interval = rank, world_size, timeout, interval
        self.position = (0, Phase.FINISHED)  # (global step, phase)
        self.moved = self.started = time.monotonic()
        self.silent_after = max(3 * interval, 3.0)  # no entry for this long: the process is frozen
        self._seq = 0
        self._changed = threading.Event()
        self._phase_since = self.started
        self.longest = {Phase.EVAL: 0.0, Phase.CHECKPOINT: 0.0}  # this rank's longest evaluation and save so far
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.store = job_store("parallelnn/watchdog", restart, timedelta(seconds=30))
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (seq, when this judge saw it change)
        self._stop = threading.Event()
        self._publish()  # before training: a rank frozen at its first step has an entry, with its PID
        self.thread = threading.Thread(target=self._run, name="parallelnn-watchdog", daemon=True)
        self.thread.start()

    def at(self, step: int, phase: Phase) -> None:
        """Called by the training loop; cheap (attribute writes and an event)."""
        t = time.monotonic()
        previous = self.position[1]
        if phase != previous:
            if previous in self.longest:
                self.longest[previous] = max(self.longest[previous], t - self._phase_since)
            self._phase_since = t
        self.position = (step, phase)
        self.moved = t
        self._changed.set()

    def close(self) -> None:
        """Stop the thread (it leaves at its next wake-up; a daemon, it is not waited for). The aborts at a
        rank's exit ("tcache_thread_shutdown(): unaligned tcache chunk detected") came from gloo's transport
        thread as a process group was destroyed (core dumps), which ranks no longer do
        (``launch.end_with_command``)."""
        self._stop.set()
        self._changed.set()

    def limit(self, phase: int) -> float:
        """How long this rank may go without progress in ``phase``: --timeout, plus, in an evaluation or
        a checkpoint save, three times the longest one this rank has done so far."""
        return self.timeout + 3 * self.longest.get(phase, 0.0)

    # -- the thread ------------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._seq += 1
        step, phase = self.position
        self.store.set(f"rank{self.rank}", json.dumps([step, int(phase), time.monotonic() - self.moved, self._seq,
                                                       self.pid, self.host, self.limit(phase)]))

    def _run(self) -> None:
        last_publish = last_judge = time.monotonic()
        published = self.position
        while not self._stop.is_set():
            self._changed.wait(self.interval)
            self._changed.clear()
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                if self.position != published or now - last_publish >= self.interval:
                    published = self.position
                    self._publish()
                    last_publish = now
                    self._stop.wait(MIN_GAP)  # at most ~50 entries a second, however short the steps
                if now - last_judge >= self.interval and not self._stop.is_set():
                    last_judge = now
                    if self.store.check(["abort"]):
                        self._obey(self.store.get("abort"))
                    self._judge()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending anyway
                return

    def _entry(self, r: int, now: float):
        """(step, phase, idle seconds, silent seconds, pid, host, limit) of rank ``r``; step None: never reported."""
        key = f"rank{r}"
        if not self.store.check([key]):
            return (None, None, now - self.started, now - self.started, None, None, self.timeout)
        step, phase, idle, seq, pid, host, limit = json.loads(self.store.get(key))
        last_seq, since = self._seen.get(r, (None, now))
        if seq != last_seq:
            since = now
        self._seen[r] = (seq, since)
        return (step, Phase(phase), idle + (now - since), now - since, pid, host, limit)

    def _judge(self) -> None:
        now = time.monotonic()
        if self.rank != 0:  # rank 0 judges; the others only watch that it still does
            if self._entry(0, now)[3] < self.silent_after:
                return
        states = {r: self._entry(r, now) for r in range(self.world_size)}
        if any(s[2] < s[6] for s in states.values()):
            return
        frozen = [r for r, s in states.items() if s[3] >= self.silent_after]
        judge = min((r for r in states if r not in frozen), default=None)
        if judge != self.rank:
            return
        if int(self.store.add("abort-claim", 1)) != 1:
            return  # another rank's judge fired first
        self._fire(states, frozen)

    def _fire(self, states: dict, frozen: list[int]) -> None:
        def where(s) -> str:
            return "before its first step" if s[0] is None else f"{s[1].words} {s[0]}"

        def waits(s) -> str:
            return {Phase.STEP: "in step", Phase.FINISHED: "after step", Phase.EVAL: "in the evaluation after step",
                    Phase.CHECKPOINT: "in the checkpoint after step"}[s[1]] + f" {s[0]}"

        order = lambda r: (-1, 0) if states[r][0] is None else (states[r][0], int(states[r][1]))  # noqa: E731
        behind = min(frozen or states, key=lambda r: (order(r), -states[r][2]))
        s = states[behind]
        if s[0] is None:
            what = f"rank {behind} never reported (frozen or stuck before its first step)"
        elif behind in frozen:
            what = (f"rank {behind} stopped responding: its process is frozen (no report for {s[3]:.0f}s) "
                    f"since it {'was ' if s[1] == Phase.STEP else ''}{where(s)}")
        else:
            what = f"rank {behind} stopped responding: no progress for {s[2]:.0f}s since it {where(s)}"
        others = [r for r in states if r != behind and r not in frozen]
        ahead = [r for r in others if order(r) > order(behind) or (behind in frozen and order(r) == order(behind))]
        if ahead:
            r = ahead[0]
            message = (f"{what}, while rank{'s' if len(ahead) > 1 else ''} {', '.join(map(str, ahead))} "
                       f"wait{'' if len(ahead) > 1 else 's'} {waits(states[r])} (--timeout {self.timeout:.0f}s)")
        elif len(states) > 1 and not frozen and len({order(r) for r in states}) == 1:
            message = (f"no rank made progress for {s[2]:.0f}s, all {where(s)}: a collective is stuck "
                       f"(--timeout {self.timeout:.0f}s)")
        else:
            message = f"{what} (--timeout {self.timeout:.0f}s)"
        kill = [[states[r][5], states[r][4]] for r in frozen if states[r][4] is not None]
        try:  # the message first, for torchrun's agent to find when it sees the first process end
            from parallelnn.config import SPAWNED_ENV

            if not os.environ.get(SPAWNED_ENV):  # else the parallelnn command that spawned us says it
                print(f"parallelnn: error: {message}", file=sys.stderr, flush=True)
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(TimeoutError(message))
            self.store.set("abort", json.dumps({"message": message, "kill": kill}))
            self._kill_local_later(kill)
        finally:
            os._exit(1)

    def _kill_local_later(self, kill) -> None:
        """SIGKILL the frozen processes on this machine half a second from now, from a process of its own.

        Not at once: torchrun's agent reports the first process it sees end as the job's failure, and
        that must be the rank that holds the message (which exits now), not the killed one."""
        import subprocess

        pids = [str(int(pid)) for host, pid in kill if host == self.host and pid != self.pid]
        if pids:
            try:
                subprocess.Popen(["/bin/sh", "-c", f"sleep 0.5; kill -9 {' '.join(pids)} 2>/dev/null"],
                                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            except OSError:
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass

    def _obey(self, abort: bytes) -> None:
        try:
            self._kill_local_later(json.loads(abort).get("kill", []))
        finally:
            os._exit(ABORTED)
