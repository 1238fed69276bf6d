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
from parallelnn.parallel.engine import Engine, blocks_of, contiguous_layout


def policies(cfg) -> tuple | None:
    """FSDP2's mixed precision for ``--precision bf16``, as FSDP users expect it (no autocast): parameters
    all-gathered and computed in bf16, gradients reduced in ``--reduce-precision`` (fp32 by default) into
    fp32 shards, the optimizer stepping fp32 master weights. (blocks' policy, the root's policy): the root
    also returns fp32 outputs, so the loss is computed in fp32 as under autocast. None for other precisions
    (fp16 keeps autocast and its loss scaler)."""
    if cfg.precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = torch.float32 if cfg.reduce_precision == "fp32" else torch.bfloat16
    return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce),
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce, output_dtype=torch.float32))


def describe_policy(cfg) -> dict:
    if cfg.precision != "bf16":
        return {}
    return {"mixed_precision": {"param_dtype": "bf16", "reduce_dtype": cfg.reduce_precision, "output_dtype": "fp32",
                                "by": "FSDP2 MixedPrecisionPolicy"}}


def shard(model, workload, mesh, reshard_after_forward: bool, mp: tuple | None = None):
    """``fully_shard`` each block, then the root; ``mp``: (blocks' policy, root's policy) from :func:`policies`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_mp, root_mp = mp or (MixedPrecisionPolicy(), MixedPrecisionPolicy())
    for block in blocks_of(model, workload):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=block_mp)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=root_mp)


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
    blocks = blocks_of(model, workload)
    mp = policies(cfg)
    model = shard(contiguous_layout(model).to(ctx.device), workload, mesh, cfg.reshard_after_forward, mp)
    # --compile: each block on its own (torchtitan's way), so FSDP's hooks between blocks stay outside graphs.
    return Engine(model, workload, cfg, ctx.device, total_steps, dp_rank=mesh.get_local_rank(), dp_size=layout.dp,
                  no_sync=no_sync_of(model), autocast=mp is None, compile_modules=blocks or None,
                  describe={"mesh": layout.mesh(), "reshard_after_forward": cfg.reshard_after_forward,
                            "sharded_blocks": len(blocks), **describe_policy(cfg)})


def gather_bytes_per_parameter(inp, policy: bool = True) -> float:
    """Bytes per parameter FSDP all-gathers. Under ``--precision bf16`` :func:`policies` gives ``fully_shard`` a
    ``MixedPrecisionPolicy(param_dtype=bfloat16)``: FSDP2 casts each fp32 shard to bf16 before the all-gather
    and gathers bf16 (PyTorch docs, torch.distributed.fsdp.MixedPrecisionPolicy: "param_dtype ... the dtype for
    the unsharded parameter and hence the dtype for forward/backward computation and the parameter
    all-gather"), half the fp32 volume; gradients are reduce-scattered in ``--reduce-precision``, fp32 by
    default (taken here). Without a policy (``policy=False``, other precisions) the parameters' own dtype."""
    from parallelnn.advise import costs

    per = inp.stats.bytes_per_parameter
    return min(per, costs.BYTES["bf16"]) if policy and inp.dtype == "bf16" else per


def sharded(inp, inner, held_parameters: float, *, gathers: float = 2.0, block_fraction: float = 1.0,
            buffers: float | None = None, policy: bool = True):
    """``inner`` (the cost of one rank of one model copy, holding ``held_parameters`` whole) with FSDP over
    the layout's dp ranks: parameters, gradients and optimizer state divided by dp; the parameters gathered
    ``gathers`` times (forward, and again in backward after resharding; at :func:`gather_bytes_per_parameter`,
    ``policy``: whether the bf16 mixed-precision policy applies) and the gradients reduce-scattered,
    overlapped with the compute by prefetching; the largest block (``block_fraction`` of it held) unsharded
    twice (computing, prefetched) plus its unsharded gradient (or ``buffers`` bytes, when the caller knows)."""
    from parallelnn.advise import costs

    dp = inp.layout.dp
    if dp <= 1:
        return inner
    per = inp.stats.bytes_per_parameter
    gathered = gather_bytes_per_parameter(inp, policy)
    comm, exposed = costs.fsdp_sync(inp, inp.group("dp"), held_parameters, gathered, inner.compute_seconds, gathers,
                                    block_fraction)
    def shard(held: dict[str, float]) -> dict[str, float]:
        memory = {k: v / dp if k in ("parameters", "gradients", "optimizer") else v for k, v in held.items()}
        memory["buffers"] = memory.get("buffers", 0.0) + (costs.fsdp_buffers(inp, block_fraction) if buffers is None
                                                          else buffers)
        return memory

    per_rank = [shard(r) for r in inner.memory_per_rank] if inner.memory_per_rank else None
    memory = max(per_rank, key=lambda h: sum(h.values())) if per_rank else shard(inner.memory)
    dtype = "bf16 (mixed-precision policy)" if gathered < per else "the parameters' dtype (no mixed-precision policy)"
    return costs.StepCost(inner.compute_seconds, memory, inner.comm_seconds + comm,
                          inner.exposed_comm_seconds + exposed, inner.bubble_seconds, inner.problem,
                          [*inner.assumptions, (f"FSDP: parameters all-gathered {gathers:g}x per step at {dtype}, "
                                                "gradients reduce-scattered at the parameters' dtype, prefetch "
                                                "overlapping compute; the first block's gather is exposed")],
                          memory_per_rank=per_rank)


def cost(inp):
    from parallelnn.advise import costs

    return sharded(inp, costs.replica(inp), inp.stats.parameters)


STRATEGY = Strategy(name="fsdp", summary="FSDP2 fully_shard (ZeRO-3): parameters, gradients, optimizer sharded",
                    layout=data_parallel, apply=apply, order=20,
                    options=("reshard_after_forward", "reduce_precision", "compile"),
                    cost=CostModel(candidates=lambda n, batch: [(Layout(dp=n), None, None)], step=cost,
                                   fixed_units=lambda stats: stats.blocks + 1,  # each block and the root
                                   probe_real_parameters=True))
