"""What a message costs between two ranks that are computing: the part of a two-process step that advise's
one-process extrapolation (``--extrapolate``) cannot see.

    python benchmarks/busy_pingpong.py            # 3 rounds
    python benchmarks/busy_pingpong.py 5 --work 8

Two gloo ranks, one compute thread each, loop: a burst of matrix multiplies (``--work`` 256x256 products),
then a 4 KiB ping-pong (rank 0 sends and receives, rank 1 the other way). Measured as two *threads* of one
process (what one-process calibration has: ``calibrate.inprocess_collectives``) and as two *processes*, each
bound to its own core (as trials are, ``--bind-cores``) and not bound. Prints, per round, each layout's median
loop less the burst alone, per message, and its ratio to the threads'. Compare only within a round.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPS, WARM = 60, 10


def _loop(send, recv, rank: int, work: int) -> tuple[float, float]:
    """(median seconds of burst + ping-pong, median seconds of the burst alone) of one rank."""
    a, t = torch.randn(256, 256), torch.ones(1024)
    both, alone = [], []
    for _ in range(LOOPS):
        t0 = time.perf_counter()
        for _ in range(work):
            a @ a
        t1 = time.perf_counter()
        if rank == 0:
            send(t, 1)
            recv(t, 1)
        else:
            recv(t, 0)
            send(t, 0)
        both.append(time.perf_counter() - t0)
        alone.append(t1 - t0)
    return statistics.median(both[WARM:]), statistics.median(alone[WARM:])


def threads(work: int) -> float:
    """Seconds per message, two gloo ranks as threads of this process."""
    torch.set_num_threads(1)
    store, groups, found = dist.HashStore(), [None, None], [None, None]

    def make(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))

    def run(rank: int) -> None:
        g = groups[rank]
        found[rank] = _loop(lambda x, p: g.send([x], p, 0).wait(), lambda x, p: g.recv([x], p, 0).wait(), rank, work)

    for job in (make, run):
        workers = [threading.Thread(target=job, args=(r,)) for r in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return max(both - alone for both, alone in found) / 2


def _process(rank: int, port: int, bind: bool, work: int, out) -> None:
    torch.set_num_threads(1)
    if bind:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    both, alone = _loop(dist.send, lambda x, p: dist.recv(x, p), rank, work)
    out.put((both - alone) / 2)
    dist.destroy_process_group()


def processes(bind: bool, work: int) -> float:
    """Seconds per message, two gloo processes (each on its own core if ``bind``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(r, port, bind, work, out)) for r in range(2)]
    for p in procs:
        p.start()
    found = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return max(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("--work", type=int, default=4, help="256x256 matrix products between messages")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("busy_pingpong: needs two cores")
    print(f"{'round':>5} {'threads us':>11} {'procs bound us':>15} {'ratio':>6} {'procs unbound us':>17} {'ratio':>6}")
    for i in range(args.rounds):
        t = threads(args.work)
        bound, unbound = processes(True, args.work), processes(False, args.work)
        print(f"{i + 1:>5} {t * 1e6:>11.0f} {bound * 1e6:>15.0f} {bound / t:>6.1f} {unbound * 1e6:>17.0f} "
              f"{unbound / t:>6.1f}")


if __name__ == "__main__":
    main()
