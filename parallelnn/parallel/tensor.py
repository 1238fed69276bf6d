"""tensor: DTensor tensor parallelism (``parallelize_module``) over all ranks.

Generic plan for sequential models (:class:`SequentialPlan`): consecutive Linear layers separated
only by parameter-free layers (ReLU, dropout …) form Megatron-style pairs — the first
``ColwiseParallel`` (output features split over ranks), the second ``RowwiseParallel`` (input
features split, outputs summed with one all-reduce). Every other layer (convolutions, an unpaired
last Linear) stays replicated: each rank computes it whole, on the same input, so its gradients agree
without communication. The record lists both. A workload may supply its own plan
(``Workload.tensor_plan``, a :class:`~parallelnn.workloads.TensorPlan`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from parallelnn.errors import UserError
from parallelnn.launch import make_mesh
from parallelnn.parallel import CostModel, Layout, Strategy
from parallelnn.parallel.engine import Engine


def sequential_pairs(model: nn.Module) -> tuple[dict[str, str], list[str]]:
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


class SequentialPlan:
    """The generic plan: Linear pairs among a module's direct children, sharded Megatron-style."""

    def check(self, model: nn.Module, tp: int) -> None:
        plan, _ = sequential_pairs(model)
        if not plan:
            raise UserError("the model has no pair of consecutive Linear layers among its children to shard over "
                            "tensor-parallel ranks; give Workload(tensor_plan={'name': 'colwise', ...})")
        for name, style in plan.items():
            layer = getattr(model, name)
            dim = layer.out_features if style == "colwise" else layer.in_features
            if dim % tp:
                raise UserError(f"tensor-parallel degree {tp} does not divide layer {name}'s {dim} features")

    def layers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(the layers this plan shards, the row-wise ones whose outputs are all-reduced)."""
        plan, _ = sequential_pairs(model)
        return ([getattr(model, n) for n in plan], [getattr(model, n) for n, s in plan.items() if s == "rowwise"])

    def apply(self, model: nn.Module, tp_mesh) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan, replicated = sequential_pairs(model)
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in plan.items()})
        return {"sharded": plan, "replicated": replicated}


class NamedPlan:
    """A user's plan: {submodule name: "colwise" | "rowwise"}, for ``nn.Linear`` submodules."""

    def __init__(self, styles: dict[str, str]):
        self.styles = styles

    def check(self, model: nn.Module, tp: int) -> None:
        modules = dict(model.named_modules())
        for name, style in self.styles.items():
            layer = modules.get(name)
            if style not in ("colwise", "rowwise"):
                raise UserError(f"tensor plan: {name} has style {style!r}; use 'colwise' or 'rowwise'")
            if not isinstance(layer, nn.Linear):
                raise UserError(f"tensor plan: the model has no Linear layer named {name!r}")
            dim = layer.out_features if style == "colwise" else layer.in_features
            if dim % tp:
                raise UserError(f"tensor-parallel degree {tp} does not divide layer {name}'s {dim} features")

    def layers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        modules = dict(model.named_modules())
        return ([modules[n] for n in self.styles], [modules[n] for n, s in self.styles.items() if s == "rowwise"])

    def apply(self, model: nn.Module, tp_mesh) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in self.styles.items()})
        sharded = {n for n in self.styles}
        return {"sharded": dict(self.styles),
                "replicated": [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in sharded]}


def linear_pairs(workload, model: nn.Module) -> list[list[int]] | None:
    """[input features, output features] of each column-wise + row-wise Linear pair the plan shards, in order;
    None when the plan is not such pairs one after another (or cannot apply)."""
    try:
        sharded, reduced = plan_of(workload).layers(model)
    except (UserError, AttributeError, NotImplementedError):
        return None
    rows = {id(m) for m in reduced}
    if not sharded or len(sharded) % 2 or not all(isinstance(m, nn.Linear) for m in sharded):
        return None
    pairs = list(zip(sharded[::2], sharded[1::2]))
    if any(id(col) in rows or id(row) not in rows for col, row in pairs):
        return None
    return [[col.in_features, row.out_features] for col, row in pairs]


def plan_of(workload):
    """The workload's own plan (a TensorPlan, or a dict of styles), else the generic Linear-pair plan."""
    plan = workload.tensor_plan
    if plan is None:
        return SequentialPlan()
    return NamedPlan(plan) if isinstance(plan, dict) else plan


def check(cfg, workload, layout: Layout) -> None:
    plan_of(workload).check(workload.model, layout.tp)


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int) -> Engine:
    mesh = make_mesh((layout.tp,), ("tp",), ctx.device)
    model = model.to(ctx.device)
    described = plan_of(workload).apply(model, mesh)
    # Every tensor-parallel rank holds the same outputs: only the first counts them.
    return Engine(model, workload, cfg, ctx.device, total_steps, counts_outputs=mesh.get_local_rank() == 0,
                  describe={"mesh": layout.mesh(), **described})


def cost(inp):
    """Megatron-style: the sharded fraction of parameters, FLOPs and activations over tp ranks, the rest
    replicated; each TP forward and backward all-reduces full activations, on the critical path. Every tp
    rank trains on the whole per-rank batch."""
    from parallelnn.advise import costs

    params, flops, acts = costs.tp_fractions(inp.stats, inp.layout.tp)
    b = inp.per_rank_batch
    comm = costs.tensor_parallel_comm(inp, inp.group("tp"), b)
    memory = {**costs.model_state(inp, inp.stats.parameters * params),
              "activations": costs.activation_bytes(inp, b, shard=acts)}
    compute = costs.compute_seconds(inp, b, flops, costs.tp_nonmatmul_share(inp.stats, inp.layout.tp))
    return costs.StepCost(compute, memory, comm, comm, assumptions=[
        ("tensor parallel: all-reduces not overlapped with compute (no sequence parallelism, no async TP); "
         "replicated layers computed whole on every tp rank")])


STRATEGY = Strategy(name="tensor", summary="DTensor tensor parallelism: Linear pairs sharded over ranks",
                    layout=lambda cfg, world_size: Layout(tp=world_size), apply=apply, check=check,
                    min_nproc=2, order=40,
                    cost=CostModel(candidates=lambda n, batch: [(Layout(tp=n), None, None)], step=cost,
                                   fixed_units=lambda stats: stats.tp_allreduce_calls or 2 * stats.layers,
                                   probe_real_activations=True))
