"""This machine, measured: how fast a rank computes and how fast its collectives are.

* Compute: whole training steps (forward, backward, optimizer) of the real model in one process, timed
  at the thread counts and per-pass batch sizes the candidates will use (a rank of an N-process job on C
  cores gets C/N threads), after warm-up; the rate is the counted FLOPs over the median step.
* Communication: all-reduce, all-gather, reduce-scatter and send/recv of 4 KiB..8 MiB between N real
  processes on this backend, each fitted to ``seconds = latency + bytes / bandwidth`` (least squares), and
  cached per machine in ``$PARALLELNN_CACHE/collectives.json``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from parallelnn import measure
from parallelnn.parallel.engine import Engine

SIZES = [4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20]
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


def step_seconds(workload, cfg, threads: int, batch: int, steps: int = 9, warmup: int = 3) -> float:
    """Median seconds of a whole training step of ``batch`` samples with ``threads`` threads, one process
    (with glibc's malloc kept from returning activation buffers to the kernel, as training processes do)."""
    from parallelnn.launch import keep_freed_memory

    keep_freed_memory()
    model = copy.deepcopy(workload.model)
    engine = Engine(model, workload, cfg, torch.device("cpu"), total_steps=steps + warmup)
    sample = workload.train.head(min(batch, len(workload.train)))
    x, y = sample.prepare(sample.inputs), sample.targets
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            engine.train_step(x, y, 1.0 / len(x))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def _cache() -> Path:
    return measure._cache_file().with_name("collectives.json")


def _time_collectives(rank: int, world: int) -> dict[str, list[tuple[int, float]]]:
    import torch.distributed as dist

    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    results: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    for size in SIZES:
        n = size // 4
        t = torch.ones(n)
        parts = torch.ones(n // world * world)
        gathered = torch.empty(n // world * world)
        ops = {
            "all_reduce": lambda: dist.all_reduce(t),
            "all_gather": lambda: all_gather(gathered, parts[: n // world]),
            "reduce_scatter": lambda: reduce_scatter(parts[: n // world].clone(), parts),
            "send_recv": lambda: (dist.send(t, 1) if rank == 0 else dist.recv(t, 0)) if rank < 2 else None,
        }
        for kind, op in ops.items():
            times = []
            for _ in range(7):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                times.append(time.perf_counter() - t0)
            results[kind].append((size, statistics.median(times[2:])))
    return results


def _time_steps(cfg, batches: list[int]) -> dict[int, float]:
    """Median step seconds of the real model at each batch, while every rank does the same (contention)."""
    import torch.distributed as dist

    from parallelnn import workloads

    workload = workloads.build(cfg.workload, cfg, torch.device("cpu"), log=lambda m: None)
    seconds = {}
    for batch in batches:
        dist.barrier()
        seconds[batch] = step_seconds(workload, cfg, torch.get_num_threads(), batch)
    return seconds


def _worker(rank: int, world: int, port: int, out: str, cfg, batches: list[int]) -> None:
    """One of ``world`` processes on this machine, as a rank of a job would be: its share of the cores, the
    model's steps timed while the others step too, then the collectives."""
    import torch.distributed as dist

    from parallelnn.launch import keep_freed_memory

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    keep_freed_memory()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    steps = _time_steps(cfg, batches) if cfg is not None else {}
    results = _time_collectives(rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps({"collectives": results, "steps": steps}))
    dist.destroy_process_group()


def fit(points: list[tuple[int, float]]) -> dict[str, float]:
    """``seconds = latency + bytes / bandwidth`` by least squares on the *relative* error (each point
    weighted 1/seconds², so the small sizes set the latency and the large ones the bandwidth)."""
    w = [1.0 / max(t, 1e-9) ** 2 for _, t in points]
    sw = sum(w)
    mx = sum(wi * b for wi, (b, _) in zip(w, points)) / sw
    my = sum(wi * t for wi, (_, t) in zip(w, points)) / sw
    sxx = sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, points))
    slope = sum(wi * (b - mx) * (t - my) for wi, (b, t) in zip(w, points)) / max(sxx, 1e-30)
    slope = max(slope, 1e-15)
    return {"latency": max(my - slope * mx, 0.0), "bandwidth": 1.0 / slope}


def spawn(world: int, cfg=None, batches: list[int] = ()) -> dict[str, Any]:
    """Run :func:`_worker` in ``world`` fresh processes; rank 0's measurements."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_worker, args=(world, port, out, cfg, list(batches)), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def fitted(raw: dict[str, list]) -> dict[str, dict[str, Any]]:
    return {kind: {**fit(points), "points": points} for kind, points in raw.items()}


def collectives(world: int = 2, refresh: bool = False) -> dict[str, dict[str, float]]:
    """{kind: {latency, bandwidth}} of gloo collectives among ``world`` processes here (cached per machine)."""
    key = f"gloo-{world}"
    cache = _cache()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in stored or refresh:
        stored[key] = fitted(spawn(world)["collectives"])
        remember(key, stored[key])
    return stored[key]


def remember(key: str, value: Any) -> None:
    cache = _cache()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    stored[key] = value
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(stored, indent=1))


def loopback(world: int) -> dict[str, dict[str, float]]:
    """Without other processes: the loopback transport gloo uses (TCP through the kernel), timed in this
    process between two sockets, as the collectives' link (every kind the same; a ring of ``world`` moves
    2(n-1)/n of the bytes twice for an all-reduce, which :func:`parallelnn.advise.local.link_for` applies)."""
    import socket
    import threading

    a, b = socket.socketpair()
    points = []
    try:
        for size in SIZES:
            payload = b"x" * size
            times = []
            for _ in range(5):
                got = bytearray()

                def read():
                    while len(got) < size:
                        got.extend(b.recv(size - len(got)))

                reader = threading.Thread(target=read)
                t0 = time.perf_counter()
                reader.start()
                a.sendall(payload)
                reader.join()
                times.append(time.perf_counter() - t0)
            points.append((size, statistics.median(times[1:])))
    finally:
        a.close()
        b.close()
    one = fit(points)
    # A two-rank all-reduce is a send each way at once: the fitted one-way figures, as all_reduce's fit.
    return {kind: dict(one) for kind in KINDS}


def describe(fitted: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v['latency'] * 1e6:.0f} µs + {v['bandwidth'] / 1e9:.2f} GB/s"
                     for k, v in fitted.items())
