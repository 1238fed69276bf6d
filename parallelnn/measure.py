"""Measuring: FLOPs per sample, the device's peak FLOP/s (measured, cached), MFU, and honest timers.

MFU = achieved FLOP/s / peak FLOP/s, where
* achieved = FLOPs of one training step as counted by ``torch.utils.flop_counter`` (forward +
  backward; the optimizer's elementwise work is not counted, as is usual) x samples per second;
* peak = a short matrix-multiply probe on the same kind of device, cached per machine
  (``$PARALLELNN_CACHE/peak.json``, each entry with the time it was measured). On CPU the probe uses
  every core, so a run that leaves cores idle shows it in its MFU. The peak of a job is the probe
  times the devices it used (GPUs, or machines for CPU jobs, whose ranks share the machine's cores).

A probe taken while the machine is busy reads low, and every MFU measured against it would read
high. So a probe is the best of several rounds spaced apart (:data:`PROBE_ROUNDS`), and a run whose
achieved FLOP/s exceed the cached peak calls :func:`check_peak`, which probes again and keeps the
best of the old peak, the new probe and what the run achieved (a peak cannot be below work actually
done). ``info --refresh`` replaces the entry with a fresh probe.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from parallelnn.data.sources import cache_dir
from parallelnn.record import atomic_write_text, cpu_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """Wall-clock seconds after the device finished what was queued (timers must not read early)."""
    synchronize(device)
    return time.perf_counter()


def mark(device: torch.device):
    """A point in the device's work without waiting for it: on CUDA an event recorded on the current stream,
    elsewhere the time after a sync (CPU work is synchronous). :func:`elapsed` reads two of them."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return now(device)


def elapsed(start, end) -> float:
    """Seconds between two :func:`mark` results (CUDA events wait here for the later one to complete)."""
    if isinstance(start, float) and isinstance(end, float):
        return end - start
    if isinstance(start, float) or isinstance(end, float):  # a mark from before a sync and a float: both times
        raise TypeError("marks of different kinds")
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


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


PROBE_ROUNDS = 3  # a probe is the best of this many rounds...
PROBE_PAUSE_S = 0.25  # ...this far apart, so that a passing burst of other work spoils at most some


def _probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.4) -> float:
    # CPUs without native half-precision units multiply bf16/fp16 slowly: a smaller probe keeps it short.
    n = (2048 if dtype == torch.float32 else 1024) if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, thread pool start
        a @ b

    def three_matmuls():
        for _ in range(3):
            a @ b

    return _best_rate(device, three_matmuls, 3 * 2 * n**3, seconds)


def _best_of_rounds(probe, rounds: int | None = None, pause: float | None = None) -> float:
    """The best of ``rounds`` calls of ``probe``, ``pause`` seconds apart."""
    rounds = PROBE_ROUNDS if rounds is None else rounds
    pause = PROBE_PAUSE_S if pause is None else pause
    best = 0.0
    for i in range(max(rounds, 1)):
        if i and pause > 0:
            time.sleep(pause)
        best = max(best, float(probe()))
    return best


def _best_rate(device: torch.device, op, work: float, seconds: float) -> float:
    """The best ``work`` per second of ``op`` over repeated timed runs for ``seconds`` (at least one)."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = now(device)
        op()
        best = max(best, work / (now(device) - t0))
    return best


def _cache_file() -> Path:
    return cache_dir() / "peak.json"


def _cache_key(device: torch.device, dtype: torch.dtype | str) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{socket.gethostname()}|{device_label(device)}|{dtype}|threads={threads}|torch={torch.__version__}"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _read_cache() -> dict[str, dict[str, Any]]:
    """peak.json as {key: {"value", "measured_at", "source"}} (older caches held bare numbers)."""
    path = _cache_file()
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    cache = {}
    for key, entry in raw.items():
        if isinstance(entry, (int, float)):
            entry = {"value": float(entry), "measured_at": None, "source": "probe"}
        if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)):
            cache[key] = entry
    return cache


def _store(key: str, value: float, source: str = "probe") -> dict[str, Any]:
    cache = _read_cache()
    cache[key] = entry = {"value": float(value), "measured_at": _utc_now(), "source": source}
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_file(), json.dumps(cache, indent=1))
    except OSError:
        pass  # an unwritable cache costs a re-probe next time, nothing more
    return entry


def _cached_entry(key: str, probe, refresh: bool) -> dict[str, Any]:
    """The cache entry of ``key``, or the best of :data:`PROBE_ROUNDS` probes measured now and stored."""
    entry = _read_cache().get(key)
    if entry is not None and not refresh:
        return entry
    return _store(key, _best_of_rounds(probe))


def _cached(key: str, probe, refresh: bool) -> float:
    return float(_cached_entry(key, probe, refresh)["value"])


@contextlib.contextmanager
def _all_cores(device: torch.device):
    """On CPU, probe with every core (as a whole machine's peak; a rank bound to its share of the cores gets
    them all meanwhile), then give the thread count and the share back."""
    if device.type != "cpu":
        yield
        return
    from parallelnn.launch import unbound

    saved = torch.get_num_threads()
    with unbound():
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


def peak_entry(device: torch.device, dtype: torch.dtype = torch.float32, refresh: bool = False) -> dict[str, Any]:
    """The peak of :func:`peak_flops` with when it was measured: {"value", "measured_at" (UTC, ISO 8601,
    None for a cache older than this field), "source" ("probe" or "achieved by a run")}."""
    device = torch.device(device)
    with _all_cores(device):
        return _cached_entry(_cache_key(device, dtype), lambda: _probe(device, dtype), refresh)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, refresh: bool = False) -> float:
    """Peak matmul FLOP/s of one device (on CPU: with all cores), measured once per machine and cached."""
    return float(peak_entry(device, dtype, refresh)["value"])


def peak_measured_at(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """When the cached peak of ``device`` was measured (UTC, ISO 8601), for a record's ``peak_measured_at``."""
    return peak_entry(device, dtype)["measured_at"]


def check_peak(device: torch.device, achieved: float, dtype: torch.dtype = torch.float32) -> float:
    """The peak to divide ``achieved`` (FLOP/s a run reached on *one* device: its FLOP/s over the
    devices it used, as ``peak_flops`` is per device) by, made honest first: if the run beat the
    cached peak, that peak was probed while the machine was busy, so probe again now (best of
    :data:`PROBE_ROUNDS`) and keep the best of the old peak, the new probe and ``achieved`` itself."""
    device = torch.device(device)
    with _all_cores(device):
        key = _cache_key(device, dtype)  # with all cores, as peak_flops keys it (not the rank's own threads)
        entry = _cached_entry(key, lambda: _probe(device, dtype), refresh=False)
        if achieved <= entry["value"]:
            return float(entry["value"])
        probed = _best_of_rounds(lambda: _probe(device, dtype))
    value, source = max((entry["value"], entry.get("source", "probe")), (probed, "probe"),
                        (float(achieved), "achieved by a run"), key=lambda vs: vs[0])
    return float(_store(key, value, source)["value"])


def peak_tf32_flops(device: torch.device, refresh: bool = False) -> float:
    """Peak fp32 matmul FLOP/s with TF32 tensor cores allowed (CUDA only; fp32 results, 10-bit mantissa)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("TF32 is a CUDA matmul mode")

    def probe() -> float:
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return _probe(device, torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved

    return _cached(_cache_key(device, "tf32"), probe, refresh)


#: The dtype a run's matrix multiplies use -> the probe that measures its peak.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": "tf32"}


def compute_dtype(precision: str, tf32: bool, device: torch.device) -> str:
    """The dtype a run's matrix multiplies actually use: its autocast / FSDP precision, else TF32 where it is
    switched on (CUDA), else fp32. MFU divides by the measured peak of this dtype."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 and torch.device(device).type == "cuda" else "fp32"


def peak_flops_of(device: torch.device, dtype: str, refresh: bool = False) -> float:
    """The measured (cached) peak matmul FLOP/s of ``dtype`` (a key of :data:`COMPUTE_DTYPES`) on ``device``."""
    if dtype == "tf32":
        return peak_tf32_flops(device, refresh)
    return peak_flops(device, COMPUTE_DTYPES[dtype], refresh)


def _bandwidth_probe(device: torch.device, seconds: float = 0.3) -> float:
    # A copy larger than any cache, so it streams from memory: 128 MiB on CPU, 1 GiB on a GPU.
    n = (32 if device.type == "cpu" else 256) * 2**20
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of the pages, kernel start
    return _best_rate(device, lambda: dst.copy_(src), 2 * src.numel() * src.element_size(),  # read + written
                      seconds)


def peak_bandwidth(device: torch.device, refresh: bool = False) -> float:
    """Memory bandwidth in bytes/s (read + write of a large copy; on CPU with all cores), cached per machine."""
    device = torch.device(device)
    with _all_cores(device):
        return _cached(_cache_key(device, "copy-bandwidth"), lambda: _bandwidth_probe(device), refresh)


def mfu(flops_per_sample_: float, samples_per_second: float, peak: float) -> float:
    return flops_per_sample_ * samples_per_second / peak if peak > 0 else 0.0


def reset_peak_memory(device: torch.device) -> None:
    """From here on :func:`peak_memory_bytes` counts what the run itself holds (the peak-FLOPs probe's matrices,
    say, are not the run's). On CUDA; a CPU's resident-set peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the resident-set peak on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# Events of the collective work itself, as the profiler names them: gloo's own ops on its worker
# threads and NCCL's kernels on the GPU. (The c10d::* dispatch events on the main thread only enqueue
# that work, so they are not counted: that would count it twice.)
COMM_EVENT_PREFIXES = ("gloo:", "nccl")


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints a line to it at every
    start and stop, which would land in the user's terminal in the middle of the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CommProbe:
    """Time spent in collectives over a short window of training steps, per rank, via torch.profiler.

    ``comm_seconds`` is the per-step duration of collective operations, which on both backends can
    overlap computation (DDP reduces buckets during backward); ``comm_share`` = comm / step time
    (capped at 1) is therefore "how much of the step had communication in flight", not exposed time.
    """

    def __init__(self, device: torch.device, first_step: int = 2, steps: int = 3):
        self.device, self.first, self.last = device, first_step, first_step + steps - 1
        self.profiler = None
        self.t0 = 0.0
        self.result: dict[str, float] = {}

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        with _quiet_fd2():
            self.profiler.__enter__()
        self.t0 = now(self.device)

    def close(self, step: int) -> None:
        """End a window cut short by the end of training (an open profiler crashes the process at exit)."""
        if self.profiler is not None:
            self.last = step
            self.after_step(step)

    def after_step(self, step: int) -> None:
        if self.profiler is None or step != self.last:
            return
        wall = now(self.device) - self.t0
        with _quiet_fd2():
            self.profiler.__exit__(None, None, None)
        comm = 0.0
        for event in self.profiler.key_averages():
            if event.key.startswith(COMM_EVENT_PREFIXES):
                device_time = getattr(event, "device_time_total", 0) or 0
                comm += (device_time if "nccl" in event.key and device_time else event.cpu_time_total) / 1e6
        self.profiler = None
        n = max(self.last - self.first + 1, 1)
        self.result = {"profiled_steps": n, "step_seconds": wall / n, "comm_seconds": comm / n,
                       "comm_share": min(1.0, comm / wall) if wall > 0 else 0.0}


class TensorBytes:
    """What one rank's tensors hold during a training step, by kind: parameters, gradients, optimizer state
    (each this rank's local shards), and the peak of activations saved for backward during one step (the
    batch, inputs and targets, is data, not an activation: a layer or a loss that saves it saves a view of the
    loader's data).

    The activation peak is counted with ``torch.autograd.graph.saved_tensors_hooks`` on one step: each
    saved tensor's storage counts once while the graph still holds any saved tensor using it (each is saved as
    an alias of its own, whose release a weak reference notices: a tensor the caller keeps, like a pipeline
    stage's receive buffer, stops counting when backward frees what was saved of it), at its size when
    backward first reads saved tensors after any were saved (the most held since the last read; storages a
    wrapper freed after saving, like FSDP's resharded weights, count as what they hold, nothing). Storages of
    parameters count as parameters; a saved DTensor (tensor parallelism's layers save them) counts as its
    local shard. This is the memory a strategy divides, the figure ``advise`` predicts; it leaves out the
    allocator's and the framework's own memory, temporaries not saved for backward and communication
    buffers (the resident-set peak, ``peak_memory_bytes``, includes them).
    """

    def __init__(self, step: int = 2, steps: int = 1):
        """Counts steps ``step`` .. ``step + steps - 1``, keeping the largest (an epoch's short last batch
        may be one of them)."""
        self.step, self.last = step, step + steps - 1
        self.result: dict[str, int] = {}
        self._hooks = None
        self._live: dict[int, list] = {}  # storage pointer -> [bytes when saved, references, a tensor using it]
        self._peak = 0
        self._params: set[int] = set()  # storages of parameters: saved for backward, but counted as parameters
        self._unpacks = 0
        self._packed = False  # saved since the last read?
        self.region: int | None = None  # a caller's label for what runs now (see advise.stats) ...
        self.by_region: dict[int, int] = {}  # ... and the bytes first saved under each label

    def start(self, parameters=()) -> None:
        """Count from now on (``parameters``: tensors whose storage is not an activation: the parameters and
        the batch; anything else in it is ignored)."""
        self._params = {_storage_ptr(p) for p in parameters if isinstance(p, torch.Tensor)}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def stop(self) -> int:
        """Stop counting; the peak of saved activation bytes."""
        if not self._unpacks:  # nothing read them back (no backward): their size at the end
            self._peak = max(self._peak, self._live_bytes())
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        return self._peak

    def before_step(self, step: int, parameters=()) -> None:
        if self.step <= step <= self.last:
            self._peak, self._live, self._unpacks = 0, {}, 0
            self.start(parameters)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        import weakref

        try:
            storage = _local(t).untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a plain storage
            return t
        if key in self._params:
            return t
        if self.region is not None and key not in self._live:
            self.by_region[self.region] = self.by_region.get(self.region, 0) + size
        self._packed = True
        # Saved as an alias of its own: the graph's reference dies when backward frees it, even where the
        # tensor lives on (a pipeline stage keeps each microbatch's received input for the next step).
        saved = t.detach()
        entry = self._live.setdefault(key, [size, 0, None])
        entry[1] += 1
        entry[2] = weakref.ref(saved)
        weakref.finalize(saved, self._release, key)
        return saved

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._unpacks += 1
        if self._packed:  # the first read after saving: the most held since the last read
            self._packed = False
            self._peak = max(self._peak, self._live_bytes())
        return t

    def _live_bytes(self) -> int:
        total = 0
        for size, _, ref in self._live.values():
            t = ref() if ref is not None else None
            total += _local(t).untyped_storage().nbytes() if t is not None else size
        return total

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]

    def after_step(self, step: int, engine) -> None:
        if self._hooks is None or not self.step <= step <= self.last:
            return
        self.stop()
        params = engine.parameters()
        state = engine.optimizer.state
        now = {
            "parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_local_bytes(v) for p in params for v in state.get(p, {}).values()
                             if isinstance(v, torch.Tensor) and v.ndim > 0),
            "activations": self._peak,
        }
        now["total"] = sum(now.values())
        if now["total"] >= self.result.get("total", 0):
            self.result = now


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's bytes of ``t``: a DTensor's local shard (the DTensor itself is a wrapper
    without storage; autograd saves DTensors for tensor parallelism's layers), else ``t``."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return _local(t).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t`` (a DTensor's local shard)."""
    local = _local(t)
    return local.numel() * local.element_size()


# Warm-up and measurement, in steps and seconds: a model's first steps pay for allocation and kernel choice,
# and the caches and clocks of a CPU settle over a fraction of a second (three warm-up steps of the MNIST CNN
# measured 10-20% slower than its steady state here).
WARMUP = (5, 0.4)
MEASURE = (9, 0.4)
MOST_STEPS = 60


def timed_steps(step, sync=lambda: None) -> float:
    """Median seconds of ``step()`` once warm: at least WARMUP steps and seconds of warm-up, then at least
    MEASURE steps and seconds measured (never more than MOST_STEPS in all). ``sync``: waits for the device's
    queued work (a GPU runs behind the host), after every step."""
    start = time.perf_counter()
    done = 0
    while done < WARMUP[0] or (done < MOST_STEPS // 2 and time.perf_counter() - start < WARMUP[1]):
        step()
        sync()
        done += 1
    times: list[float] = []
    while len(times) < MEASURE[0] or (done < MOST_STEPS and sum(times) < MEASURE[1]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        done += 1
    return statistics.median(times)
