"""This machine, measured: how fast a rank computes and how fast its collectives are.

* Compute: whole training steps (forward, backward, optimizer) of the real model in one process, timed
  at the thread counts and per-pass batch sizes the candidates will use (a rank of an N-process job on C
  cores gets C/N threads), after warm-up; the rate is the counted FLOPs over the median step.
* Communication: all-reduce, all-gather, reduce-scatter and send/recv of 4 KiB..8 MiB between N real
  processes on this backend, each fitted to ``seconds = latency + bytes / bandwidth`` (least squares).
* Fixed costs per step (:func:`.probe.probe_seconds`): what a strategy costs a step *besides* computing and moving
  bytes — its framework's hooks, the latency of every collective call in the pattern the strategy really
  issues them (a ring's ranks arriving as their compute ends, not after a barrier), a pipeline schedule's
  per-microbatch work — measured by running the candidate's own strategy, layout and schedule on a *probe*:
  a model with the real one's number of blocks and next to nothing to compute or send, under a parameter-free
  load as heavy as the real model's. Where the bytes a strategy moves are the model's, the probe moves them
  too: FSDP's probe holds the real blocks' parameter counts, a pipeline's has the real stages' loads and
  boundaries (so their transfers are measured as they run on busy cores, not at an idle link's speed).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from parallelnn import measure
from parallelnn.advise.probe import probe_seconds, probe_workload
from parallelnn.measure import MOST_STEPS, timed_steps
from parallelnn.parallel.engine import Engine

SIZES = [4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20]
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@contextlib.contextmanager
def _threads(threads: int):
    """Compute with ``threads`` threads meanwhile, with glibc's malloc kept from returning activation buffers
    to the kernel, as training processes do."""
    from parallelnn.launch import keep_freed_memory

    keep_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def step_seconds(workload, cfg, threads: int, batch: int,
                 device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(forward + backward, optimizer) median seconds of a training step of ``batch`` samples with ``threads``
    threads, one process, on ``device``. Apart, because a pipeline runs the first per microbatch and the
    second once a step, and a sharded rank updates only its share of the parameters."""
    engine, x, y = _engine_on(workload, cfg, batch, device)
    sync = functools.partial(measure.synchronize, device)
    with _threads(threads):
        whole = timed_steps(lambda: engine.train_step(x, y, 1.0 / len(x)), sync)
        update = timed_steps(engine._step_optimizer, sync)  # the gradients of the last step, applied again
    return max(whole - update, whole / 100), update


def _engine_on(workload, cfg, batch: int, device: torch.device):
    """A copy of the model stepping on ``device`` (the workload's own stays where it is), and one batch there."""
    engine = Engine(copy.deepcopy(workload.model).to(device), workload, cfg, device, total_steps=4 * MOST_STEPS)
    sample = workload.train.head(min(batch, len(workload.train)))
    return engine, sample.prepare(sample.inputs).to(device), sample.targets.to(device)


def cuda_step_bytes(workload, cfg, batch: int, device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator hands out while one process trains at ``batch`` samples a step, as
    ``torch.cuda.max_memory_allocated`` counts them in a run: parameters, gradients, optimizer state, the
    batch, saved activations and everything transient (backward's temporaries, autocast copies, cuDNN's and
    cuBLAS' workspaces), from the first step on (a first call may take more), with the epoch's shorter last
    batch and an evaluation at the same batch, as a run has them. Counted from what the device held before (in
    a process that used the GPU already, that is not this run's)."""
    import gc

    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:  # cuBLAS keeps its workspace between calls: a run allocates it, so must this count
        clear()
    torch.cuda.empty_cache()
    measure.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    measure.reset_peak_memory(device)
    engine, x, y = _engine_on(workload, cfg, batch, device)
    last = len(workload.train) % len(x)
    for xb, yb in [(x, y)] * 3 + ([(x[:last], y[:last])] if last else []):
        engine.train_step(xb, yb, 1.0 / len(xb))
    tested = len(workload.test) % len(x) if workload.test is not None else 0
    for n in [len(x)] + ([tested] if tested else []):
        engine.eval_step(x[:n], y[:n])
    measure.synchronize(device)
    peak = measure.peak_memory_bytes(device) - before
    del engine, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak)


def stage_seconds(workload, cfg, stages: list[tuple[int, int, int]], threads: int) -> dict[str, float]:
    """Forward + backward seconds of pipeline stages, each (first layer, end layer, microbatch) of the model's
    pipeline layers, median once warm (the last stage's loss included): what a pipeline rank computes per
    microbatch. Keyed ``"a-b-batch"``."""
    model = copy.deepcopy(workload.model)
    layers = workload.layers(model)
    found = {}
    with _threads(threads):
        for a, b, batch in stages:
            sample = workload.train.head(min(batch, len(workload.train)))
            x, y = sample.prepare(sample.inputs), sample.targets
            with torch.no_grad():
                for layer in layers[:a]:
                    x = layer(x)
            x = x.detach().requires_grad_() if x.is_floating_point() else x

            def step(x=x, y=y, stage=layers[a:b], last=b == len(layers)):
                out = x
                for layer in stage:
                    out = layer(out)
                if last:
                    workload.loss(out, y).backward()
                else:
                    out.backward(torch.ones_like(out))

            found[f"{a}-{b}-{batch}"] = timed_steps(step)
    return found


def _time_kinds(ops_for, barrier, sync=lambda: None, rounds: int = 2) -> dict[str, list]:
    """Median seconds of each collective kind at each of SIZES: ``ops_for(floats)`` gives {kind: a call} on
    tensors of that many floats; ``barrier`` lines the ranks up before each call. The sweep is made ``rounds``
    times and each point keeps its fastest round: here a run of calls sometimes waits ~4 ms each (a halted
    virtual CPU woken late), in processes and in threads alike, and one such run at 4 KiB left the fit no
    latency at all."""
    sweeps = [_sweep(ops_for, barrier, sync) for _ in range(rounds)]
    return {kind: [min(points, key=lambda p: p[1]) for points in zip(*(s[kind] for s in sweeps))] for kind in KINDS}


def _sweep(ops_for, barrier, sync) -> dict[str, list]:
    """One pass of :func:`_time_kinds` over SIZES: {kind: [(bytes, median seconds of 5 calls after 2)]}."""
    results: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    for size in SIZES:
        for kind, op in ops_for(size // 4).items():
            times = []
            for _ in range(7):
                barrier()
                sync()
                t0 = time.perf_counter()
                op()
                sync()
                times.append(time.perf_counter() - t0)
            results[kind].append((size, statistics.median(times[2:])))
    return results


def _time_collectives(rank: int, world: int, device: torch.device = torch.device("cpu")) -> dict[str, list]:
    import torch.distributed as dist

    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def ops_for(n: int) -> dict:
        t = torch.ones(n, device=device)
        parts = torch.ones(n // world * world, device=device)
        gathered = torch.empty(n // world * world, device=device)
        return {
            "all_reduce": lambda: dist.all_reduce(t),
            "all_gather": lambda: all_gather(gathered, parts[: n // world]),
            "reduce_scatter": lambda: reduce_scatter(parts[: n // world].clone(), parts),
            "send_recv": lambda: (dist.send(t, 1) if rank == 0 else dist.recv(t, 0)) if rank < 2 else None,
        }

    return _time_kinds(ops_for, dist.barrier, functools.partial(measure.synchronize, device))


def inprocess_collectives(world: int) -> dict[str, list]:
    """The collectives of :func:`_time_collectives` between ``world`` gloo ranks that are threads of this one
    process: gloo's own transport (TCP over loopback), threads and copies, as a job's ranks use them, without
    other processes (what it leaves out: ranks competing for the cores with their compute)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.HashStore()
    groups: list = [None] * world
    found: list = [None] * world
    lined_up = threading.Barrier(world)

    def make(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60))

    def ops_for(rank: int, n: int) -> dict:
        g = groups[rank]
        t, parts, gathered = torch.ones(n), torch.ones(n // world * world), torch.empty(n // world * world)
        return {
            "all_reduce": lambda: g.allreduce([t]).wait(),
            "all_gather": lambda: g._allgather_base(gathered, parts[: n // world]).wait(),
            "reduce_scatter": lambda: g._reduce_scatter_base(parts[: n // world].clone(), parts).wait(),
            "send_recv": lambda: ((g.send([t], 1, 0) if rank == 0 else g.recv([t], 0, 0)).wait()
                                  if rank < 2 else None),
        }

    def time_them(rank: int) -> None:
        found[rank] = _time_kinds(functools.partial(ops_for, rank), lined_up.wait)

    for job in (make, time_them):
        threads = [threading.Thread(target=job, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"{world} gloo ranks in one process did not finish timing their collectives")
    return found[0]


def _time_steps(workload, cfg, batches: list[int], stages: list[tuple[int, int, int]]) -> dict[str, dict]:
    """:func:`step_seconds` of the real model at each batch and :func:`stage_seconds` of each pipeline stage,
    while every rank does the same (contention)."""
    import torch.distributed as dist

    seconds = {}
    for batch in batches:
        dist.barrier()
        seconds[batch] = step_seconds(workload, cfg, torch.get_num_threads(), batch)
    dist.barrier()
    staged = stage_seconds(workload, cfg, stages, torch.get_num_threads()) if stages else {}
    return {"steps": seconds, "stages": staged}


def fastest(first: dict, second: dict) -> dict:
    """Per measurement, the faster of two rounds taken some seconds apart: a machine shared with other work slows
    down for seconds at a time (MNIST's step ran 1.8x slow for 4 s of a minute here), which moves every
    measurement it overlaps; it never speeds one up. Values are seconds, or tuples of seconds (compared on
    their sum), nested in dicts."""
    if isinstance(first, dict):
        return {k: fastest(v, second[k]) if k in second else v for k, v in first.items()}
    if isinstance(first, (tuple, list)):
        return min(first, second, key=sum)
    return min(first, second)


def loop_seconds(cfg, device: torch.device, steps: int = 200) -> float:
    """Seconds a training step of ``parallelnn run`` takes besides its engine's forward, backward and update:
    the trainer's bookkeeping, the loader's batch, the step's timing marks. Per step, whatever the model: a
    one-block probe trained for real (``parallelnn.run`` in this process, measured as trials are: the median
    of its steps' intervals after warm-up) less the same probe's engine steps timed alone."""
    import tempfile

    from parallelnn import api
    from parallelnn.advise.trials import WARMUP_STEPS
    from parallelnn.config import RunConfig

    batch = max(cfg.batch_size, 2)
    # The probe's own settings, the same for the run and the engine timed alone (not the user's --compile, say).
    options = {"batch_size": batch, "lr": 1e-3, "max_grad_norm": 0.0, "seed": cfg.seed, "device": device.type}
    plain = RunConfig(workload="python:probe", **options)
    probe = probe_workload(1, plain, samples=batch * 50)
    alone = sum(step_seconds(probe, plain, torch.get_num_threads(), batch, device))
    with tempfile.TemporaryDirectory() as tmp:
        api.run(probe, out=tmp, epochs=math.ceil(steps / 50), log_every=1, quiet=True, overwrite=True, **options)
        per = [batch / e["train/samples_per_second"] for e in map(json.loads, Path(tmp, "metrics.jsonl").open())
               if e.get("event") == "step" and e.get("train/global_step", 0) > WARMUP_STEPS
               and e.get("train/samples_per_second")]
    return max(0.0, statistics.median(per) - alone) if per else 0.0


def alone_seconds(world: int, cfg, candidates, units: int, loads: dict[str, float],
                  passes: dict[int, tuple[float, float]], timeout: float = 300.0,
                  resized: dict[str, int] | None = None, shapes: dict[str, dict] | None = None,
                  staged: dict[str, float] | None = None) -> dict[str, Any]:
    """What :func:`spawn` measures between ``world`` processes, measured in one: the collectives between gloo
    ranks that are threads (:func:`inprocess_collectives`), and each candidate's fixed cost as rank 0 of
    ``world`` under a fake process group (its strategy's own code run at the real layout, its collectives
    doing nothing), plus its calls per step (``calls``, by kind) times their latency. Run in a fresh process (a
    default process group, even a fake one, is not for the advising process to keep). ``shapes``, ``staged``:
    pipeline probes as the real stages (:func:`.probe.probe_seconds`)."""
    args = (world, cfg, list(candidates), units, loads, passes, resized or {}, shapes or {}, staged or {})
    return _in_fresh_process(_alone_worker, args, 1, timeout)


def _alone_worker(index: int, out: str, world: int, cfg, candidates, units, loads, passes, resized, shapes,
                  staged) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend


    from parallelnn.launch import bind_cores, set_threads

    set_threads(None, world)
    torch.set_flush_denormal(True)  # the fake collectives leave whatever memory held: no slow denormals
    raw = inprocess_collectives(world)  # its thread-ranks stand for processes on their own cores: all of them
    if cfg.bind_cores:  # then the probes on rank 0's share of the cores, as a trial's rank 0 has it
        bind_cores(0, world)
    latency = {kind: f["latency"] for kind, f in fitted(raw).items()}
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    calls: dict[str, dict[str, int]] = {}
    try:
        fixed, again = (probe_seconds(cfg, candidates, units, 0, world, loads, passes, latency, calls, resized,
                                      shapes, staged) if candidates else ({}, {}))
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps({"collectives": raw, "fixed": fixed, "fixed_resized": again, "calls": calls}))


def _worker(rank: int, out: str, world: int, port: int, cfg, batches: list[int], stages, candidates,
            units: int, loads: dict[str, float], device_type: str = "cpu", resized: dict | None = None,
            shapes: dict | None = None) -> None:
    """One of ``world`` processes on this machine, as a rank of a job would be: its share of the cores, the
    model's steps timed while the others step too, the collectives, then the candidates' fixed costs.
    ``device_type="cuda"``: the collectives alone, NCCL's, each rank on a GPU of its own."""
    import torch.distributed as dist

    from parallelnn.launch import bind_cores, set_threads

    set_threads(None, world)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cpu" and (cfg is None or cfg.bind_cores):  # each on its share of the cores, as trials are
        bind_cores(rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    steps: dict[str, dict] = {"steps": {}, "stages": {}}
    if cfg is not None and batches:
        from parallelnn import workloads

        workload = workloads.build(cfg.workload, cfg, torch.device("cpu"), log=lambda m: None)
        steps = _time_steps(workload, cfg, batches, stages)
    results = _time_collectives(rank, world, device)
    fixed, again = ({}, {})
    if cfg is not None and candidates:
        fixed, again = probe_seconds(cfg, candidates, units, rank, world, loads, steps["steps"], resized=resized,
                                     shapes=shapes, staged=steps["stages"])
    if cfg is not None and batches:  # timed once more, the collectives and probes later: the faster of the two
        steps = fastest(steps, _time_steps(workload, cfg, batches, stages))
    if rank == 0:
        Path(out).write_text(json.dumps({"collectives": results, **steps, "fixed": fixed, "fixed_resized": again}))
    dist.destroy_process_group()


def fit(points: list[tuple[int, float]]) -> dict[str, float]:
    """``seconds = latency + bytes / bandwidth`` by least squares on the *relative* error (each point
    weighted 1/seconds², so the small sizes set the latency and the large ones the bandwidth). A size timed
    slower than a larger one was waiting on something else (a late wake-up): it counts as the larger one's time."""
    points = sorted(points)
    for i in range(len(points) - 2, -1, -1):
        points[i] = (points[i][0], min(points[i][1], points[i + 1][1]))
    w = [1.0 / max(t, 1e-9) ** 2 for _, t in points]
    sw = sum(w)
    mx = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    my = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    sxx = sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, points))
    slope = sum(wi * (b - mx) * (t - my) for wi, (b, t) in zip(w, points)) / max(sxx, 1e-30)
    slope = max(slope, 1e-15)
    return {"latency": max(my - slope * mx, 0.0), "bandwidth": 1.0 / slope}


def spawn(world: int, cfg=None, batches: list[int] = (), stages=(), candidates=(), units: int = 2,
          loads: dict[str, float] | None = None, timeout: float = 300.0, device_type: str = "cpu",
          resized: dict[str, int] | None = None, shapes: dict[str, dict] | None = None) -> dict[str, Any]:
    """Run :func:`_worker` in ``world`` fresh processes; rank 0's measurements. Processes still running
    after ``timeout`` seconds are ended (RuntimeError). ``resized``, ``shapes``: see :func:`.probe.probe_seconds`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (world, port, cfg, list(batches), list(stages), list(candidates), units, loads or {}, device_type,
            resized or {}, shapes or {})
    return _in_fresh_process(_worker, args, world, timeout)


def _in_fresh_process(target, args: tuple, nprocs: int = 1, timeout: float = 300.0) -> dict[str, Any]:
    """``target(index, out, *args)`` in ``nprocs`` fresh processes; what they wrote to ``out`` (JSON).
    Processes still running after ``timeout`` seconds are ended (RuntimeError)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        context = mp.start_processes(target, args=(out, *args), nprocs=nprocs, start_method="spawn", join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise RuntimeError(f"calibrating {nprocs} process{'es' if nprocs > 1 else ''} took over "
                                   f"{timeout:.0f} s")
        return json.loads(Path(out).read_text())


def fitted(raw: dict[str, list]) -> dict[str, dict[str, Any]]:
    return {kind: {**fit(points), "points": points} for kind, points in raw.items()}
