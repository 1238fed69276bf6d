"""ddp: DistributedDataParallel. Every rank holds the whole model and trains on its share of each
global batch; gradients are all-reduced (averaged) during backward, bucketed and overlapped."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from parallelnn.launch import make_mesh
from parallelnn.parallel.engine import Engine


def dp_degree(cfg, world_size: int) -> int:
    return world_size


def apply(model, built, cfg, ctx, total_steps: int) -> Engine:
    mesh = make_mesh((ctx.world_size,), ("dp",), ctx.device)
    model = model.to(ctx.device)
    wrapped = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                      process_group=mesh.get_group("dp"))
    return Engine(wrapped, built, cfg, ctx.device, total_steps, dp_rank=ctx.rank, dp_size=ctx.world_size,
                  no_sync=wrapped.no_sync, describe={"mesh": {"dp": ctx.world_size}})
