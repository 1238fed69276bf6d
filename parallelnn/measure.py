"""Measuring: FLOPs per sample, the device's peak FLOP/s (measured, cached), MFU, and honest timers.

MFU = achieved FLOP/s / peak FLOP/s, where
* achieved = FLOPs of one training step as counted by ``torch.utils.flop_counter`` (forward +
  backward; the optimizer's elementwise work is not counted, as is usual) x samples per second;
* peak = a short matrix-multiply probe on the same kind of device, run once per machine and cached
  (``$PARALLELNN_CACHE/peak.json``). On CPU the probe uses every core, so a run that leaves cores
  idle shows it in its MFU. The peak of a job is the probe times the devices it used (GPUs, or
  machines for CPU jobs, whose ranks share the machine's cores).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from parallelnn.data.sources import cache_dir


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """Wall-clock seconds after the device finished what was queued (timers must not read early)."""
    synchronize(device)
    return time.perf_counter()


def flops_per_sample(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of forward + backward per sample, counted on one small batch; leaves no gradients behind."""
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / max(len(x), 1)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"{cpu_model()} x{os.cpu_count()}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.4) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, thread pool start
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = now(device)
        for _ in range(3):
            a @ b
        dt = now(device) - t0
        best = max(best, 3 * 2 * n**3 / dt)
    return best


def _cache_file() -> Path:
    return cache_dir() / "peak.json"


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{socket.gethostname()}|{device_label(device)}|{dtype}|threads={threads}|torch={torch.__version__}"


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, refresh: bool = False) -> float:
    """Peak matmul FLOP/s of one device (on CPU: with all cores), measured once per machine and cached."""
    device = torch.device(device)
    saved_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        key = _cache_key(device, dtype)
        path = _cache_file()
        cache = {}
        if path.is_file():
            try:
                cache = json.loads(path.read_text())
            except (OSError, ValueError):
                cache = {}
        if key in cache and not refresh:
            return float(cache[key])
        value = _probe(device, dtype)
        cache[key] = value
        try:
            from parallelnn.record import atomic_write_text

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache costs a re-probe next time, nothing more
        return value
    finally:
        torch.set_num_threads(saved_threads)


def mfu(flops_per_sample_: float, samples_per_second: float, peak: float) -> float:
    return flops_per_sample_ * samples_per_second / peak if peak > 0 else 0.0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the resident-set peak on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
