"""tensor: DTensor tensor parallelism (``parallelize_module``) over all ranks.

Generic plan for sequential models: consecutive Linear layers separated only by parameter-free
layers (ReLU, dropout …) form Megatron-style pairs — the first ``ColwiseParallel`` (output
features split over ranks), the second ``RowwiseParallel`` (input features split, outputs summed
with one all-reduce). Every other layer (convolutions, an unpaired last Linear) stays replicated:
each rank computes it whole, on the same input, so its gradients agree without communication.
The record lists both. A workload may supply its own plan (``Built.tensor_plan``).
"""

from __future__ import annotations

from torch import nn

from parallelnn.errors import UserError
from parallelnn.launch import make_mesh
from parallelnn.parallel.engine import Engine


def sequential_plan(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """({layer name: "colwise"|"rowwise"}, [names of parameterised layers left replicated])."""
    names = [name for name, _ in model.named_children()]
    layers = [getattr(model, n) for n in names]
    plan: dict[str, str] = {}
    i = 0
    while i < len(layers):
        if isinstance(layers[i], nn.Linear):
            j = i + 1
            while j < len(layers) and not any(True for _ in layers[j].parameters()):
                j += 1
            if j < len(layers) and isinstance(layers[j], nn.Linear) and all(
                    not isinstance(layers[k], nn.Flatten) for k in range(i + 1, j)):
                plan[names[i]], plan[names[j]] = "colwise", "rowwise"
                i = j + 1
                continue
        i += 1
    replicated = [n for n, m in zip(names, layers) if n not in plan and any(True for _ in m.parameters())]
    return plan, replicated


def check(cfg, built, world_size: int, tp: int | None = None) -> None:
    tp = tp or world_size
    if built.tensor_plan is not None:
        built.tensor_plan(built.model, None, tp)  # validates divisibility without a mesh
        return
    plan, _ = sequential_plan(built.model)
    if not plan:
        raise UserError(f"the {cfg.workload} model has no pair of Linear layers to shard over tensor-parallel ranks")
    for name, style in plan.items():
        layer = getattr(built.model, name)
        dim = layer.out_features if style == "colwise" else layer.in_features
        if dim % tp:
            raise UserError(f"tensor-parallel degree {tp} does not divide layer {name}'s {dim} features")


def parallelize(model: nn.Module, built, tp_mesh) -> dict:
    """Shard ``model`` in place over ``tp_mesh``; returns what was sharded and what stayed replicated."""
    if built.tensor_plan is not None:
        return built.tensor_plan(model, tp_mesh, tp_mesh.size())
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan, replicated = sequential_plan(model)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in plan.items()})
    return {"sharded": plan, "replicated": replicated}


def dp_degree(cfg, world_size: int) -> int:
    return 1


def apply(model, built, cfg, ctx, total_steps: int) -> Engine:
    mesh = make_mesh((ctx.world_size,), ("tp",), ctx.device)
    model = model.to(ctx.device)
    layout = parallelize(model, built, mesh)
    # Every tensor-parallel rank holds the same outputs: only the first counts them.
    return Engine(model, built, cfg, ctx.device, total_steps, counts_outputs=mesh.get_local_rank() == 0,
                  describe={"mesh": {"tp": ctx.world_size}, **layout})
