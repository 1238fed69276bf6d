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


def link_for(nproc: int, fitted: dict[str, Any] | None, kind: str = "all_reduce") -> Link:
    """The link that makes the cost model's ring formula for ``kind`` reproduce the time fitted at ``nproc``
    ranks: an all-reduce moves 2(n-1)/n of the bytes and pays 2(n-1) latencies, an all-gather or
    reduce-scatter (n-1)/n and n-1, a send/recv all of them and one."""
    if nproc < 2 or not fitted:
        return Link(bandwidth=1e12, latency=0.0)
    f = fitted[kind]
    moved, hops = {"all_reduce": (2 * (nproc - 1) / nproc, 2 * (nproc - 1)), "send_recv": (1.0, 1)}.get(
        kind, ((nproc - 1) / nproc, nproc - 1))
    return Link(bandwidth=f["bandwidth"] * moved, latency=f["latency"] / hops)


class Machine:
    """This machine, calibrated for the candidates at hand: one process's step rate at each pass batch, and
    for each process count N, the rate of N processes stepping at once (each with its share of the cores:
    they contend for memory bandwidth too) and their collectives."""

    def __init__(self, workload, cfg, stats: ModelStats, concurrent: bool = True):
        """``concurrent=False``: calibrate with this one process only (each rank's thread count, and the
        loopback transport measured in-process), to test how well the model extrapolates to N processes."""
        self.workload, self.cfg, self.stats, self.concurrent = workload, cfg, stats, concurrent
        self.rates: dict[tuple[int, int], float] = {}  # (processes, pass batch) -> FLOP/s of one rank
        self.links: dict[int, dict[str, Any]] = {}

    def calibrate(self, candidates: list[Candidate], global_batch: int) -> None:
        """Measure every (process count, pass batch) the candidates need, each process count in one go."""
        needed: dict[int, set[int]] = {}
        for c in candidates:
            needed.setdefault(c.layout.world_size, set()).add(pass_batch(c, global_batch))
        for n, batches in sorted(needed.items()):
            if n > 1 and not self.concurrent:
                self.links[n] = calibrate.loopback(n)
                for b in sorted(batches):
                    self.rates[(n, b)] = self._rate(calibrate.step_seconds(self.workload, self.cfg, threads_for(n), b), b)
                continue
            if n == 1:
                for b in sorted(batches):
                    self.rates[(1, b)] = self._rate(calibrate.step_seconds(self.workload, self.cfg, cores(), b), b)
                continue
            by_name = self.cfg.workload if not self.cfg.workload.startswith("python:") else None
            measured = calibrate.spawn(n, self.cfg if by_name else None, sorted(batches))
            self.links[n] = calibrate.fitted(measured["collectives"])
            calibrate.remember(f"gloo-{n}", self.links[n])
            for b in sorted(batches):
                seconds = measured["steps"].get(str(b)) or calibrate.step_seconds(
                    self.workload, self.cfg, threads_for(n), b)  # a Python-API workload: one process at a time
                self.rates[(n, b)] = self._rate(seconds, b)

    def _rate(self, seconds: float, batch: int) -> float:
        return self.stats.flops_per_sample * batch / seconds

    def hardware(self, candidate: Candidate, global_batch: int) -> Hardware:
        n = candidate.layout.world_size
        key = (n, pass_batch(candidate, global_batch))
        if key not in self.rates:
            self.calibrate([candidate], global_batch)
        fitted = self.links.get(n)
        link = link_for(n, fitted)
        kinds = {k: link_for(n, fitted, k) for k in calibrate.KINDS} if fitted else None
        rate = self.rates[key]
        return Hardware(name=f"this machine ({cores()} cores, {n} process{'es' if n > 1 else ''})",
                        device_type="cpu", peak_flops={"fp32": rate, "bf16": rate, "fp16": rate},
                        memory_bytes=ram_bytes() // n, devices_per_node=n, intra=link, inter=link,
                        matmul_efficiency=1.0, max_devices=n, comm_overlap=0.0, kind_links=kinds,
                        notes=f"measured here: {threads_for(n)} threads per rank; gloo over loopback")

    def predict(self, candidate: Candidate, global_batch: int, dtype: str = "fp32") -> Prediction:
        hw = self.hardware(candidate, global_batch)
        return predict_step(self.stats, hw, candidate, global_batch, dtype, nodes=1)


def with_microbatches(candidate: Candidate, microbatches: int | None) -> Candidate:
    return replace(candidate, microbatches=microbatches)
