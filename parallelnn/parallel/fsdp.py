"""fsdp: FSDP2 ``fully_shard`` (ZeRO-3). Parameters, gradients and optimizer state are sharded over
the data-parallel ranks; each block's weights are all-gathered just before it runs and (with
``--reshard-after-forward``, the default) freed after, gradients are reduce-scattered.

Blocks are sharded one by one (the workload's ``blocks``, else each layer with parameters), then
the root, so that gathering one block overlaps computing another.
"""

from __future__ import annotations

import contextlib

import torch

from parallelnn.launch import make_mesh
from parallelnn.parallel import Layout, Strategy, data_parallel
from parallelnn.parallel.engine import Engine, contiguous_layout


def blocks_of(model, workload) -> list[torch.nn.Module]:
    """The modules sharded one by one before the root: the workload's ``blocks``; else its pipeline ``layers``
    that hold parameters; else the entries of the model's largest ``nn.ModuleList`` (a transformer's
    layers); else none (the root alone is one shard group)."""
    if workload.blocks is not None:
        return list(workload.blocks(model))
    if workload.layers is not None:
        return [m for m in workload.layers(model) if any(True for _ in m.parameters())]
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


def shard(model, workload, mesh, reshard_after_forward: bool):
    from torch.distributed.fsdp import fully_shard

    for block in blocks_of(model, workload):
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


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    mesh = make_mesh((layout.dp,), ("dp",), ctx.device)
    model = shard(contiguous_layout(model).to(ctx.device), workload, mesh, cfg.reshard_after_forward)
    return Engine(model, workload, cfg, ctx.device, total_steps, dp_rank=mesh.get_local_rank(), dp_size=layout.dp,
                  no_sync=no_sync_of(model),
                  describe={"mesh": layout.mesh(), "reshard_after_forward": cfg.reshard_after_forward,
                            "sharded_blocks": len(blocks_of(model, workload))})


STRATEGY = Strategy(name="fsdp", summary="FSDP2 fully_shard (ZeRO-3): parameters, gradients, optimizer sharded",
                    layout=data_parallel, apply=apply, options=("reshard_after_forward",), order=20)
