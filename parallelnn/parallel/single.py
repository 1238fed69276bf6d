"""single: the whole model in one process, no process group. The reference every strategy must match."""

from __future__ import annotations

from parallelnn.parallel import CostModel, Layout, Strategy
from parallelnn.parallel.engine import Engine


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    if cfg.cuda_graph:
        from parallelnn.errors import UserError
        from parallelnn.parallel.engine import GraphedEngine

        if ctx.device.type != "cuda":
            raise UserError(f"--cuda-graph needs a CUDA device, not {ctx.device.type}")
        return GraphedEngine(model.to(ctx.device), workload, cfg, ctx.device, total_steps)
    return Engine(model.to(ctx.device), workload, cfg, ctx.device, total_steps)


def cost(inp):
    """The whole model on one device: compute only."""
    from parallelnn.advise import costs

    return costs.replica(inp)


STRATEGY = Strategy(name="single", summary="the whole model in one process (the reference)",
                    layout=lambda cfg, world_size: Layout(), apply=apply, max_nproc=1, order=0,
                    options=("compile", "cuda_graph"),
                    cost=CostModel(candidates=lambda n, batch: [(Layout(), None, None)], step=cost))
