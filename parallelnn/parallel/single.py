"""single: the whole model in one process, no process group. The reference every strategy must match."""

from __future__ import annotations

from parallelnn.parallel import Layout, Strategy
from parallelnn.parallel.engine import Engine


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    return Engine(model.to(ctx.device), workload, cfg, ctx.device, total_steps)


STRATEGY = Strategy(name="single", summary="the whole model in one process (the reference)",
                    layout=lambda cfg, world_size: Layout(), apply=apply, max_nproc=1, order=0)
