"""single: the whole model in one process, no process group. The reference every strategy must match."""

from __future__ import annotations

from parallelnn.parallel.engine import Engine


def apply(model, built, cfg, ctx, total_steps: int) -> Engine:
    return Engine(model.to(ctx.device), built, cfg, ctx.device, total_steps)
