"""hybrid: two strategies on a 2-D mesh ``--mesh DPxN``.

* ``--hybrid tensor`` (default), mesh (dp, tp): tensor parallelism inside each group of N ranks
  first, then FSDP2 ``fully_shard`` over the dp dimension — the order torchtitan uses, since FSDP
  shards the (already tensor-sharded) DTensor parameters.
* ``--hybrid pipeline``, mesh (dp, pp): pipeline stages over N ranks, each stage module sharded
  with ``fully_shard`` over dp; the pipeline stage handles FSDP's gradient sync per microbatch.
"""

from __future__ import annotations

from parallelnn.errors import UserError
from parallelnn.launch import make_mesh
from parallelnn.parallel import Layout, Strategy, fsdp, parse_mesh, pipeline, tensor
from parallelnn.parallel.engine import Engine, contiguous_layout


def layout(cfg, world_size: int) -> Layout:
    if not cfg.mesh:
        raise UserError("--strategy hybrid needs --mesh DPxTP (or DPxPP with --hybrid pipeline), e.g. 2x2")
    dp, other = parse_mesh(cfg.mesh)
    if dp * other != world_size:
        raise UserError(f"--mesh {cfg.mesh} has {dp * other} ranks but the job has {world_size} "
                        f"(--nproc {cfg.nproc} x --nnodes {cfg.nnodes})")
    return Layout(dp=dp, pp=other) if cfg.hybrid == "pipeline" else Layout(dp=dp, tp=other)


def check(cfg, workload, layout: Layout) -> None:
    (pipeline.check if layout.pp > 1 else tensor.check)(cfg, workload, layout)


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    if layout.pp > 1:
        def wrap(stage, mesh):  # each stage module sharded over its row of the mesh's "dp" dimension
            return fsdp.shard(contiguous_layout(stage), workload, mesh["dp"], cfg.reshard_after_forward)

        return pipeline.apply(model, workload, cfg, ctx, layout, total_steps, wrap=wrap)
    mesh = make_mesh((layout.dp, layout.tp), ("dp", "tp"), ctx.device)
    dp_mesh = mesh["dp"]
    model = contiguous_layout(model).to(ctx.device)
    described = tensor.plan_of(workload).apply(model, mesh["tp"])
    model = fsdp.shard(model, workload, dp_mesh, cfg.reshard_after_forward)
    return Engine(model, workload, cfg, ctx.device, total_steps, dp_rank=dp_mesh.get_local_rank(),
                  dp_size=layout.dp, counts_outputs=mesh["tp"].get_local_rank() == 0,
                  no_sync=fsdp.no_sync_of(model), describe={"mesh": layout.mesh(), **described})


STRATEGY = Strategy(name="hybrid", summary="a 2-D mesh: tensor (or pipeline) parallel inside, FSDP across",
                    layout=layout, apply=apply, check=check, min_nproc=2,
                    options=("mesh", "hybrid", "reshard_after_forward", "schedule", "microbatches", "split"),
                    order=50, bench_args=lambda n: ["--mesh", f"{n // 2}x2"] if n >= 4 and n % 2 == 0 else None)
