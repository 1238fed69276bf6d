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
from parallelnn.parallel import CostModel, Layout, Strategy, fsdp, parse_mesh, pipeline, tensor
from parallelnn.parallel.engine import Engine, contiguous_layout


def layout(cfg, world_size: int) -> Layout:
    if not cfg.mesh:
        raise UserError("--strategy hybrid needs --mesh DPxTP (or DPxPP with --hybrid pipeline), e.g. 2x2")
    dp, other = parse_mesh(cfg.mesh)
    if dp * other != world_size:
        raise UserError(f"--mesh {cfg.mesh} has {dp * other} ranks but the job has {world_size} "
                        f"(--nproc {cfg.nproc} x --nnodes {cfg.nnodes})")
    return Layout(dp=dp, pp=other) if cfg.hybrid == "pipeline" else Layout(dp=dp, tp=other)


def run_options(layout: Layout) -> dict:
    """The inverse of :func:`layout`: the options that make this 2-D layout."""
    inner = "pipeline" if layout.pp > 1 else "tensor"
    return {"mesh": f"{layout.dp}x{layout.pp * layout.tp}", "hybrid": inner}


def check(cfg, workload, layout: Layout) -> None:
    if layout.pp > 1 and cfg.reduce_precision != "fp32":
        raise UserError("--reduce-precision applies to --hybrid tensor (pipeline stages run under autocast)")
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
    mp = fsdp.policies(cfg)
    model = fsdp.shard(model, workload, dp_mesh, cfg.reshard_after_forward, mp)
    return Engine(model, workload, cfg, ctx.device, total_steps, dp_rank=dp_mesh.get_local_rank(),
                  dp_size=layout.dp, counts_outputs=mesh["tp"].get_local_rank() == 0,
                  no_sync=fsdp.no_sync_of(model), autocast=mp is None,
                  describe={"mesh": layout.mesh(), **described, **fsdp.describe_policy(cfg)})


def cost(inp):
    """The inner strategy's cost for one dp row, then FSDP over dp (whose groups span nodes once the inner
    dimension fills a node). Pipeline stages under FSDP: torch.distributed.pipelining keeps a stage's
    parameters unsharded through backward and its gradients unsharded until the last microbatch
    (``set_reshard_after_backward(False)``, ``set_requires_gradient_sync(False)``), and resharding after each
    forward re-gathers about once per microbatch."""
    from parallelnn.advise import costs

    if inp.layout.pp > 1:
        _, _, m = pipeline.shape_of(inp)
        held = pipeline.stage_parameters(inp.stats, inp.layout.pp)
        step = fsdp.sharded(inp, pipeline.cost(inp), held, gathers=m + 1,
                            buffers=2 * held * inp.stats.bytes_per_parameter if inp.layout.dp > 1 else 0.0,
                            policy=False)  # stages are sharded without a mixed-precision policy (apply)
        step.assumptions.append("hybrid pipeline: parameters re-gathered ~once per microbatch (+1); unsharded "
                                "stage parameters and gradients held through the step")
        return step
    params, _, _ = costs.tp_fractions(inp.stats, inp.layout.tp)
    return fsdp.sharded(inp, tensor.cost(inp), inp.stats.parameters * params, block_fraction=params)


def factor_pairs(n: int) -> list[tuple[int, int]]:
    """(dp, inner) with both above 1: 16 -> (2, 8), (4, 4), (8, 2)."""
    return [(d, n // d) for d in range(2, n // 2 + 1) if n % d == 0]


def cost_candidates(world_size: int, global_batch: int):
    found = []
    for dp, inner in factor_pairs(world_size):
        found.append((Layout(dp=dp, tp=inner), None, None))
        found += pipeline.cost_candidates(world_size, global_batch, dp=dp)
    return found


STRATEGY = Strategy(name="hybrid", summary="a 2-D mesh: tensor (or pipeline) parallel inside, FSDP across",
                    layout=layout, apply=apply, check=check, min_nproc=2,
                    options=("mesh", "hybrid", "reshard_after_forward", "schedule", "microbatches", "split", "reduce_precision"),
                    order=50, run_options=run_options, bench_args=lambda n: ["--mesh", f"{n // 2}x2"] if n >= 4 and n % 2 == 0 else None,
                    cost=CostModel(candidates=cost_candidates, step=cost))
