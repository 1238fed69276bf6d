"""hybrid: two strategies on a 2-D mesh ``--mesh DPxN``.

* ``--hybrid tensor`` (default), mesh (dp, tp): tensor parallelism inside each group of N ranks
  first, then FSDP2 ``fully_shard`` over the dp dimension — the order torchtitan uses, since FSDP
  shards the (already tensor-sharded) DTensor parameters.
* ``--hybrid pipeline``, mesh (dp, pp): pipeline stages over N ranks, each stage module sharded
  with ``fully_shard`` over dp; the pipeline stage handles FSDP's gradient sync per microbatch.
"""

from __future__ import annotations

from parallelnn.config import parse_mesh
from parallelnn.launch import make_mesh
from parallelnn.parallel import fsdp, pipeline, tensor
from parallelnn.parallel.engine import Engine, contiguous_layout


def dp_degree(cfg, world_size: int) -> int:
    return parse_mesh(cfg.mesh)[0]


def check(cfg, built, world_size: int) -> None:
    dp, other = parse_mesh(cfg.mesh)
    if cfg.hybrid == "pipeline":
        pipeline.check(cfg, built, world_size, pp=other, dp=dp)
    else:
        tensor.check(cfg, built, world_size, tp=other)


def apply(model, built, cfg, ctx, total_steps: int) -> Engine:
    dp, other = parse_mesh(cfg.mesh)
    second = "pp" if cfg.hybrid == "pipeline" else "tp"
    mesh = make_mesh((dp, other), ("dp", second), ctx.device)
    dp_mesh = mesh["dp"]
    if cfg.hybrid == "pipeline":
        def wrap(stage):
            return fsdp.shard(contiguous_layout(stage), built, dp_mesh, cfg.reshard_after_forward)

        return pipeline.apply(model, built, cfg, ctx, total_steps, mesh=mesh, wrap=wrap)
    model = contiguous_layout(model).to(ctx.device)
    layout = tensor.parallelize(model, built, mesh["tp"])
    model = fsdp.shard(model, built, dp_mesh, cfg.reshard_after_forward)
    return Engine(model, built, cfg, ctx.device, total_steps, dp_rank=dp_mesh.get_local_rank(),
                           dp_size=dp, counts_outputs=mesh["tp"].get_local_rank() == 0,
                           no_sync=fsdp.no_sync_of(model), describe={"mesh": {"dp": dp, "tp": other}, **layout})
