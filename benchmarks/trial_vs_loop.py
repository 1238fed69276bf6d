"""A strategy's trial (an ordinary ``parallelnn run``, as advise runs it) against the same engine stepping in a
bare loop of two processes: what the trainer adds to a step, or whether a gap between the two is noise.

    python benchmarks/trial_vs_loop.py examples/digits_cnn.py:build tensor 3     # 3 pairs of measurements
    python benchmarks/trial_vs_loop.py mnist fsdp 1

Each pair prints the bare loop's median step (steps 20-200, with the trainer's per-step stop-flag all-reduce),
the trial's median step after its warm-up, and their ratio. Two processes share this machine's cores as a
trial's do (one thread each on two cores). Read the spread over pairs before reading any one ratio.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallelnn.config import RunConfig  # noqa: E402
from parallelnn.runner import build_workload, check  # noqa: E402

LAYOUTS = {"tensor": {"tp": 2}, "fsdp": {"dp": 2}, "ddp": {"dp": 2}, "pipeline": {"pp": 2}}
STEPS, SKIPPED = 200, 20


def _worker(rank: int, world: int, port: int, out: str, name: str, strategy: str) -> None:
    import torch.distributed as dist

    from parallelnn import parallel
    from parallelnn.launch import Context, keep_freed_memory
    from parallelnn.trainer import StopFlag

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    keep_freed_memory()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg, workload = build_workload(check(RunConfig(workload=name, quiet=True, strategy=strategy, nproc=world)),
                                   torch.device("cpu"), lambda m: None)
    ctx = Context(device=torch.device("cpu"), rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                  distributed=True)
    chosen, layout = parallel.resolve(cfg, world)
    engine = chosen.apply(workload.model, workload, cfg, ctx, layout, STEPS)
    per_rank = cfg.batch_size // layout.dp
    batch = workload.train.head(cfg.batch_size)
    share = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    x, y = batch.prepare(batch.inputs)[share], batch.targets[share]
    stop = StopFlag(ctx)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        engine.train_step(x, y, engine.dp_size / cfg.batch_size)
        stop.agreed()
        times.append(time.perf_counter() - t0)
    stop.drain()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def bare_loop(name: str, strategy: str, world: int = 2) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_worker, args=(world, port, out, name, strategy), nprocs=world, start_method="spawn")
        return statistics.median(json.loads(Path(out).read_text())[SKIPPED:])


def trial(name: str, strategy: str) -> tuple[float, int]:
    from parallelnn.advise import trials
    from parallelnn.advise.costs import Candidate
    from parallelnn.parallel import Layout

    cfg, workload = build_workload(check(RunConfig(workload=name, quiet=True)), torch.device("cpu"), lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        done = trials.run_trial(cfg, Candidate(strategy, Layout(**LAYOUTS[strategy])), Path(tmp) / "trial", 300,
                                len(workload.train), 0.005)
    return done.step_seconds, done.steps


def main() -> None:
    name, strategy = sys.argv[1], sys.argv[2]
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
        loop = bare_loop(name, strategy)
        step, steps = trial(name, strategy)
        print(f"{strategy}: bare loop {loop * 1e3:.2f} ms   trial {step * 1e3:.2f} ms ({steps} steps)   "
              f"trial / loop {step / loop:.2f}", flush=True)


if __name__ == "__main__":
    main()
