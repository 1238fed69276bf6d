"""This machine as a :class:`~parallelnn.advise.hardware.Hardware` the cost model can read, per process count.

On a CPU, N ranks share C cores: each rank computes with C/N threads, at the rate the calibration measured
for that thread count and the batch one compute pass handles (the per-rank batch, or a pipeline's
microbatch); its memory is the N-th part of RAM; its "link" is gloo over loopback, fitted from measured
all-reduces (a two-rank ring moves each byte once: ``seconds = bytes / bandwidth + 2 · latency``); and
collectives do not hide behind compute (gloo's threads need the same cores), so ``comm_overlap`` is 0.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from parallelnn.advise import calibrate
from parallelnn.advise.costs import Candidate, ModelStats, Prediction, predict_step
from parallelnn.advise.hardware import Hardware, Link


def cores() -> int:
    return os.cpu_count() or 1


def ram_bytes() -> int:
    from parallelnn.record import memory_bytes

    return memory_bytes()


def threads_for(nproc: int) -> int:
    return max(1, cores() // nproc)


def pass_batch(candidate: Candidate, global_batch: int) -> int:
    """Samples one forward/backward pass handles on a rank of this candidate."""
    per_rank = max(1, global_batch // candidate.layout.dp)
    return max(1, per_rank // candidate.microbatches) if candidate.microbatches else per_rank


def link_for(nproc: int, fitted: dict[str, Any] | None) -> Link:
    if nproc < 2 or not fitted:
        return Link(bandwidth=1e12, latency=0.0)
    ar = fitted["all_reduce"]
    # A ring of n moves 2(n-1)/n of the bytes and pays 2(n-1) latencies; fitted at n ranks.
    factor = 2 * (nproc - 1) / nproc
    return Link(bandwidth=ar["bandwidth"] * factor, latency=ar["latency"] / (2 * (nproc - 1)))


class Machine:
    """Calibrates lazily (each thread count and pass batch once, each process count's collectives once)."""

    def __init__(self, workload, cfg, stats: ModelStats):
        self.workload, self.cfg, self.stats = workload, cfg, stats
        self.rates: dict[tuple[int, int], float] = {}
        self.links: dict[int, dict[str, Any]] = {}

    def rate(self, threads: int, batch: int) -> float:
        """FLOP/s of whole training steps (forward, backward, optimizer) at ``threads`` and ``batch``."""
        key = (threads, batch)
        if key not in self.rates:
            seconds = calibrate.step_seconds(self.workload, self.cfg, threads, batch)
            self.rates[key] = self.stats.flops_per_sample * batch / seconds
        return self.rates[key]

    def collectives(self, nproc: int) -> dict[str, Any] | None:
        if nproc < 2:
            return None
        if nproc not in self.links:
            self.links[nproc] = calibrate.collectives(nproc)
        return self.links[nproc]

    def hardware(self, candidate: Candidate, global_batch: int) -> Hardware:
        n = candidate.layout.world_size
        rate = self.rate(threads_for(n), pass_batch(candidate, global_batch))
        link = link_for(n, self.collectives(n))
        return Hardware(name=f"this machine ({cores()} cores, {n} process{'es' if n > 1 else ''})",
                        device_type="cpu", peak_flops={"fp32": rate, "bf16": rate, "fp16": rate},
                        memory_bytes=ram_bytes() // n, devices_per_node=n, intra=link, inter=link,
                        matmul_efficiency=1.0, max_devices=n, comm_overlap=0.0,
                        notes=f"measured here: {threads_for(n)} threads per rank; gloo over loopback")

    def predict(self, candidate: Candidate, global_batch: int, dtype: str = "fp32") -> Prediction:
        hw = self.hardware(candidate, global_batch)
        return predict_step(self.stats, hw, candidate, global_batch, dtype, nodes=1)


def with_microbatches(candidate: Candidate, microbatches: int | None) -> Candidate:
    return replace(candidate, microbatches=microbatches)
