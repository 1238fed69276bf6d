"""What FSDP costs a step beyond the plain step, on the MNIST CNN and on two probes with its block count and
ballast matching its compute: advise's 16-wide probe, and one whose blocks carry the real blocks' parameter
counts (``advise.probe.Padded``: a padding parameter each, whose gradient is zeros; what advise's FSDP probe is
now). Two ranks bound to their cores, gloo, batch 64.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/fsdp_probe_sizes.py

The question it answers: does the probe's fixed cost miss FSDP's per-byte work under load (the real blocks'
all-gathers and reduce-scatters sharing each rank's one core with its compute)? A third probe has the real
sizes and memory-bound ballast (streaming through 8 MB) instead of a cache-resident matrix product; its
ballast is timed on one rank alone, so with both ranks streaming its plain step runs long (20 vs 12 ms here).
"""

import copy
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from parallelnn import measure
from parallelnn.advise import probe as probes
from parallelnn.config import RunConfig
from parallelnn.launch import Context, bind_cores, set_threads
from parallelnn.parallel import Layout, fsdp
from parallelnn.parallel.engine import Engine, blocks_of
from parallelnn.runner import build_workload, check


class _Stream(torch.autograd.Function):
    """Identity whose forward and backward stream ``reps`` times through a buffer larger than the caches."""

    @staticmethod
    def forward(ctx, x, buf, out, forward_reps: int, backward_reps: int):
        for _ in range(forward_reps):
            torch.add(buf, 1.0, out=out)
        ctx.buf, ctx.out, ctx.reps = buf, out, backward_reps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        for _ in range(ctx.reps):
            torch.add(ctx.buf, 1.0, out=ctx.out)
        return grad, None, None, None, None


class StreamBallast(nn.Module):
    """Like advise's Ballast, but memory-bound: ``seconds_per_sample`` of streaming through 8 MB per sample."""

    def __init__(self, seconds_per_sample: float, op_seconds: float):
        super().__init__()
        self.seconds_per_sample, self.op_seconds = seconds_per_sample, op_seconds
        self.buf, self.out = torch.ones(1 << 20), torch.empty(1 << 20)

    def forward(self, x):
        reps = self.seconds_per_sample * len(x) / self.op_seconds
        return _Stream.apply(x, self.buf, self.out, round(reps / 3), round(2 * reps / 3))


def stream_seconds() -> float:
    buf, out = torch.ones(1 << 20), torch.empty(1 << 20)
    return measure.timed_steps(lambda: torch.add(buf, 1.0, out=out))


def timed(step, steps: int = 40, warmup: int = 8) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bind_cores(rank, 2)
    set_threads(None, 2)  # as the ranks of a run: the cores shared evenly
    cfg = check(RunConfig(workload="mnist", quiet=True, strategy="fsdp", nproc=2, batch_size=64))
    cfg, real = build_workload(cfg, torch.device("cpu"), lambda msg: None)
    ctx = Context(device=torch.device("cpu"), rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                  distributed=True)

    def overhead(workload, label: str) -> float:
        sample = workload.train.head(64)
        x = sample.prepare(sample.inputs)[rank * 32:(rank + 1) * 32]
        y = sample.targets[rank * 32:(rank + 1) * 32]
        plain = Engine(copy.deepcopy(workload.model), workload, cfg, ctx.device, total_steps=100)
        alone = timed(lambda: plain.train_step(x, y, 1 / 32))
        engine = fsdp.apply(workload.model, workload, cfg, ctx, Layout(dp=2), 100)
        sharded = timed(lambda: engine.train_step(x, y, 1 / 64))
        if rank == 0:
            print(f"{label:26s} plain {1e3 * alone:6.2f} ms  fsdp {1e3 * sharded:6.2f} ms  "
                  f"overhead {1e3 * (sharded - alone):6.2f} ms", flush=True)
        return alone

    counts = [sum(p.numel() for p in b.parameters()) for b in blocks_of(real.model, real)]
    ballast = overhead(real, "MNIST CNN") / 32 / len(counts)  # the real plain step, per sample per block
    mm = probes.mm_seconds()
    op = stream_seconds()
    for label, padded, streaming in (("probe, 16 wide", False, False), ("probe, real block sizes", True, False),
                                     ("real sizes, streaming", True, True)):
        probe = probes.probe_workload(len(counts), cfg, ballast, mm, samples=64)
        if streaming:
            for j, layer in enumerate(probe.model):
                if isinstance(layer, probes.Ballast):
                    probe.model[j] = StreamBallast(ballast, op)
        if padded:
            linears = [j for j, layer in enumerate(probe.model) if isinstance(layer, nn.Linear)]
            for j, n in zip(linears, counts):
                probe.model[j] = probes.Padded(probe.model[j], n)
        overhead(probe, label)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
