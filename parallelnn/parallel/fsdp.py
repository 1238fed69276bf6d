"""fsdp: FSDP2 ``fully_shard`` (ZeRO-3). Parameters, gradients and optimizer state are sharded over
the data-parallel ranks; each block's weights are all-gathered just before it runs and (with
``--reshard-after-forward``, the default) freed after, gradients are reduce-scattered.

Blocks are sharded one by one (the workload's ``blocks``, else each layer with parameters), then
the root, so that gathering one block overlaps computing another.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import fully_shard

from parallelnn.launch import make_mesh
from parallelnn.parallel.engine import Engine, contiguous_layout


def dp_degree(cfg, world_size: int) -> int:
    return world_size


def blocks_of(model, built) -> list[torch.nn.Module]:
    if built.blocks is not None:
        return list(built.blocks(model))
    if built.layers is not None:
        return [m for m in built.layers(model) if any(True for _ in m.parameters())]
    return []


def shard(model, built, mesh, reshard_after_forward: bool):
    for block in blocks_of(model, built):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def no_sync_of(module):
    """FSDP2's counterpart of DDP.no_sync: accumulate unsharded gradients, reduce on the last chunk."""

    @contextlib.contextmanager
    def no_sync():
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return no_sync


def apply(model, built, cfg, ctx, total_steps: int) -> Engine:
    mesh = make_mesh((ctx.world_size,), ("dp",), ctx.device)
    model = shard(contiguous_layout(model).to(ctx.device), built, mesh, cfg.reshard_after_forward)
    return Engine(model, built, cfg, ctx.device, total_steps, dp_rank=ctx.rank, dp_size=ctx.world_size,
                      no_sync=no_sync_of(model),
                      describe={"mesh": {"dp": ctx.world_size},
                                "reshard_after_forward": cfg.reshard_after_forward,
                                "sharded_blocks": len(blocks_of(model, built))})
