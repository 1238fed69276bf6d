"""ddp: DistributedDataParallel. Every rank holds the whole model and trains on its share of each
global batch; gradients are all-reduced (averaged) during backward, bucketed and overlapped."""

from __future__ import annotations

from parallelnn.launch import make_mesh, no_peers
from parallelnn.parallel import CostModel, Layout, Strategy, data_parallel
from parallelnn.parallel.engine import Engine


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    from torch.nn.parallel import DistributedDataParallel

    mesh = make_mesh((layout.dp,), ("dp",), ctx.device)
    model = model.to(ctx.device)
    # Gradients as views into DDP's all-reduce buckets: no second copy of the gradients (same values).
    group = mesh.get_group("dp")
    wrapped = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                      process_group=group, gradient_as_bucket_view=True)
    if no_peers(group):  # the reducer's built-in hook reads the all-reduce's result, which a fake group lacks
        wrapped.register_comm_hook(group, _allreduce_in_place)
    return Engine(wrapped, workload, cfg, ctx.device, total_steps, dp_rank=mesh.get_local_rank(), dp_size=layout.dp,
                  no_sync=wrapped.no_sync, describe={"mesh": layout.mesh()},
                  compile_modules=[model])  # --compile: the model's forward; DDP's hooks and all-reduces outside


def _allreduce_in_place(group, bucket):
    """DDP's default hook as a Python one (average the bucket in place with one all-reduce) whose future
    answers with the bucket, as the built-in one's does with the all-reduce's result. (torch's own Python
    ``default_hooks.allreduce_hook`` reads that result too, ``fut.value()[0]``, and fails the same way.)"""
    import torch.distributed as dist

    buffer = bucket.buffer().div_(dist.get_world_size(group))
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda _: buffer)


def cost(inp):
    """A whole replica per rank; gradients all-reduced in buckets during backward (only what outlasts the
    backward, and the last bucket, is exposed). The gradients are views into DDP's buckets
    (``gradient_as_bucket_view=True``), so the buckets cost no second copy."""
    from parallelnn.advise import costs

    step = costs.replica(inp)
    if inp.layout.dp > 1:
        grads = step.memory["gradients"]
        step.comm_seconds, step.exposed_comm_seconds = costs.ddp_sync(
            inp, inp.group("dp"), grads, costs.backward_seconds(inp, step.compute_seconds))
        step.assumptions.append("DDP: gradient buckets (25 MB) all-reduced at the parameters' dtype during "
                                "backward; the gradients are views into the buckets (no second copy)")
    return step


STRATEGY = Strategy(name="ddp", summary="DistributedDataParallel: whole model per rank, gradients all-reduced",
                    layout=data_parallel, apply=apply, order=10, options=("compile",),
                    cost=CostModel(candidates=lambda n, batch: [(Layout(dp=n), None, None)], step=cost))
