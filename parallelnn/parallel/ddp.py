"""ddp: DistributedDataParallel. Every rank holds the whole model and trains on its share of each
global batch; gradients are all-reduced (averaged) during backward, bucketed and overlapped."""

from __future__ import annotations

from parallelnn.launch import make_mesh
from parallelnn.parallel import Layout, Strategy, data_parallel
from parallelnn.parallel.engine import Engine


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    from torch.nn.parallel import DistributedDataParallel

    mesh = make_mesh((layout.dp,), ("dp",), ctx.device)
    model = model.to(ctx.device)
    wrapped = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                      process_group=mesh.get_group("dp"))
    return Engine(wrapped, workload, cfg, ctx.device, total_steps, dp_rank=mesh.get_local_rank(), dp_size=layout.dp,
                  no_sync=wrapped.no_sync, describe={"mesh": layout.mesh()})


STRATEGY = Strategy(name="ddp", summary="DistributedDataParallel: whole model per rank, gradients all-reduced",
                    layout=data_parallel, apply=apply, order=10)
