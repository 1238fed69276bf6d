"""single: the whole model in one process, no process group. The reference every strategy must match."""

from __future__ import annotations

from parallelnn.parallel import CostModel, Layout, Strategy
from parallelnn.parallel.engine import Engine


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    return Engine(model.to(ctx.device), workload, cfg, ctx.device, total_steps)


def cost(inp):
    """The whole model on one device: compute only."""
    from parallelnn.advise import costs

    return costs.replica(inp)


STRATEGY = Strategy(name="single", summary="the whole model in one process (the reference)",
                    layout=lambda cfg, world_size: Layout(), apply=apply, max_nproc=1, order=0,
                    cost=CostModel(candidates=lambda n, batch: [(Layout(), None, None)], step=cost))
