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
from parallelnn.parallel import CostModel, Layout, Strategy, data_parallel
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


def sharded(inp, inner, held_parameters: float, *, gathers: float = 2.0, block_fraction: float = 1.0,
            buffers: float | None = None):
    """``inner`` (the cost of one rank of one model copy, holding ``held_parameters`` whole) with FSDP over
    the layout's dp ranks: parameters, gradients and optimizer state divided by dp; the parameters gathered
    ``gathers`` times (forward, and again in backward after resharding) and the gradients reduce-scattered,
    overlapped with the compute by prefetching; the largest block (``block_fraction`` of it held) unsharded
    twice (computing, prefetched) plus its unsharded gradient (or ``buffers`` bytes, when the caller knows)."""
    from parallelnn.advise import costs

    dp = inp.layout.dp
    if dp <= 1:
        return inner
    held = held_parameters * inp.stats.bytes_per_parameter
    comm, exposed = costs.fsdp_sync(inp, inp.group("dp"), held, held, inner.compute_seconds, gathers, block_fraction)
    memory = {k: v / dp if k in ("parameters", "gradients", "optimizer") else v for k, v in inner.memory.items()}
    memory["buffers"] = memory.get("buffers", 0.0) + (costs.fsdp_buffers(inp, block_fraction) if buffers is None
                                                      else buffers)
    return costs.StepCost(inner.compute_seconds, memory, inner.comm_seconds + comm,
                          inner.exposed_comm_seconds + exposed, inner.bubble_seconds, inner.problem,
                          [*inner.assumptions, (f"FSDP: parameters all-gathered {gathers:g}x per step and gradients "
                                                "reduce-scattered at the parameters' dtype (no mixed-precision "
                                                "policy), prefetch overlapping compute; the first block's gather "
                                                "is exposed")])


def cost(inp):
    from parallelnn.advise import costs

    return sharded(inp, costs.replica(inp), inp.stats.parameters)


STRATEGY = Strategy(name="fsdp", summary="FSDP2 fully_shard (ZeRO-3): parameters, gradients, optimizer sharded",
                    layout=data_parallel, apply=apply, options=("reshard_after_forward",), order=20,
                    cost=CostModel(candidates=lambda n, batch: [(Layout(dp=n), None, None)], step=cost))
