"""pipeline: the model's layers split into consecutive stages, one (or, interleaved, two) per rank,
driven by ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``
/ ``ScheduleInterleaved1F1B``). Each batch is cut into ``--microbatches`` so stages work at once.

Stages are split where ``--split`` says, else to balance forward FLOPs (counted per layer with
``torch.utils.flop_counter``), each stage holding at least one layer with parameters.

Stages infer tensor shapes on their first step, so a batch of another size (the last of an epoch)
gets its own stage objects over the same modules (cached by batch size). Under a fake process group
(advise's one-process calibration) no peer answers, so the stages are given their shapes, worked out on
two samples run through the whole model (``Stages.io``). If a batch does not
divide into the microbatches, it uses the largest divisor below --microbatches (interleaved 1F1B: the largest
it accepts, :func:`fitting_microbatches`; and, 1F1B needing a microbatch per stage, GPipe's order when that
leaves fewer microbatches than stages). Same gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallelnn.errors import UserError
from parallelnn.launch import make_mesh, no_peers
from parallelnn.parallel import CostModel, Layout, Strategy, parse_split
from parallelnn.parallel.engine import Engine, contiguous_layout

VIRTUAL = {"interleaved-1f1b": 2}  # stages per rank


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def layer_costs(layers: list[nn.Module], x: torch.Tensor) -> list[float]:
    """Forward FLOPs of each layer on a sample batch (parameter-free layers cost ~0)."""
    from torch.utils.flop_counter import FlopCounterMode

    costs = []
    with torch.no_grad():
        for layer in layers:
            with FlopCounterMode(display=False) as counter:
                x = layer(x)
            costs.append(float(counter.get_total_flops()))
    return costs


def balanced_split(costs: list[float], has_params: list[bool], n_stages: int) -> list[int]:
    """Start indices of stages 1..n-1 minimising the costliest stage; every stage holds parameters."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    params_prefix = [0]
    for p in has_params:
        params_prefix.append(params_prefix[-1] + int(p))
    inf = float("inf")
    # best[k][i]: minimal max-stage cost splitting layers[:i] into k stages; cut[k][i]: start of the k-th.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(1, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or params_prefix[i] - params_prefix[j] == 0:
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    points, i = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][i]
        points.append(i)
    return sorted(points)[1:]


def stage_bounds(cfg, workload, n_stages: int) -> list[tuple[int, int]]:
    layers = workload.layers(workload.model)
    parameterised = [_has_params(m) for m in layers]
    if n_stages > sum(parameterised):
        raise UserError(f"{n_stages} pipeline stages but the {cfg.workload} model has only {sum(parameterised)} "
                        "layers with parameters to split")
    if cfg.split:
        points = parse_split(cfg.split)
        if len(points) != n_stages - 1 or points[-1] >= len(layers):
            raise UserError(f"--split {cfg.split}: {n_stages} stages need {n_stages - 1} increasing start indices "
                            f"below {len(layers)} (the model's layer count)")
    else:
        sample = workload.train.head(2)
        points = balanced_split(layer_costs(layers, sample.prepare(sample.inputs)), parameterised, n_stages)
    bounds = list(zip([0, *points], [*points, len(layers)]))
    for a, b in bounds:
        if not any(parameterised[a:b]):
            raise UserError(f"pipeline stage of layers {a}..{b - 1} has no parameters; choose another --split")
    return bounds


def default_microbatches(per_rank_batch: int, n_stages: int) -> int:
    for m in (2 * n_stages, n_stages, 1):
        if per_rank_batch % m == 0:
            return m
    return 1


def microbatches(cfg, per_rank_batch: int, n_stages: int) -> int:
    m = cfg.microbatches or default_microbatches(per_rank_batch, n_stages)
    if per_rank_batch % m:
        raise UserError(f"--microbatches {m} does not divide the per-rank batch of {per_rank_batch}")
    ranks = n_stages // VIRTUAL.get(cfg.schedule, 1)
    fits = fitting_microbatches(per_rank_batch, m, ranks, cfg.schedule == "interleaved-1f1b")
    if fits != m:
        raise UserError(f"interleaved 1F1B over {ranks} ranks needs --microbatches to be a multiple of its rounds "
                        f"({m} // {ranks} = {m // ranks}); {m} is not (try {fits})")
    return m


def fitting_microbatches(batch: int, most: int, ranks: int, interleaved: bool) -> int:
    """The most microbatches, at most ``most``, that a batch of ``batch`` samples divides into; for interleaved
    1F1B over ``ranks`` ranks also a multiple of its rounds (``max(1, m // ranks)``), which torch requires
    (a last batch of 20 at --microbatches 8 on two ranks: 4, not 5)."""
    m = most
    while batch % m or (interleaved and m % max(1, m // ranks)):
        m -= 1
    return m


def check(cfg, workload, layout: Layout) -> None:
    """Before spawning: the layers split into the stages and the batch into the microbatches."""
    if workload.layers is None:
        raise UserError(f"the {cfg.workload} model cannot be split into pipeline stages: make it an nn.Sequential, "
                        "or give Workload(layers=...) (its layers in order, their composition being its forward)")
    if cfg.grad_accum > 1:
        raise UserError("--grad-accum does not combine with pipeline stages; use --microbatches")
    n_stages = layout.pp * VIRTUAL.get(cfg.schedule, 1)
    stage_bounds(cfg, workload, n_stages)
    microbatches(cfg, cfg.batch_size // layout.dp, n_stages)


class PipelineEngine(Engine):
    """Runs a pipeline schedule per batch; only the last stage sees outputs and losses."""

    def __init__(self, stages: Stages, workload, cfg, ctx, total_steps, *, pp_group, dp_rank=0, dp_size=1,
                 describe=None, n_microbatches=1, tied: Tied | None = None):
        stage_ids, n_stages = stages.ids, stages.count
        super().__init__(nn.ModuleList(stages.modules), workload, cfg, ctx.device, total_steps, dp_rank=dp_rank,
                         dp_size=dp_size, counts_outputs=n_stages - 1 in stage_ids, norm_group=pp_group,
                         describe=describe)
        self.stage_modules, self.stage_ids, self.n_stages = stages.modules, stage_ids, n_stages
        self.original_names = stages.original_names
        self.pp_group, self.schedule_name = pp_group, cfg.schedule
        self.n_microbatches = n_microbatches
        self.stage_io = stages.io
        self.is_first, self.is_last = 0 in stage_ids, n_stages - 1 in stage_ids
        self._schedules: dict[int, object] = {}
        self._scale = 1.0
        # Weights shared by the first and last stage (e.g. GPT-2's embedding and head), and the group of
        # the two ranks holding them.
        self.tied: list[torch.nn.Parameter] = tied.params if tied else []
        self.tied_group = tied.group if tied else None

    def _sync_gradients(self) -> None:
        """Tied weights live twice, on the first and last stage: both take the sum of both gradients,
        so the two copies stay equal and equal the single model's one weight."""
        import torch.distributed as dist

        for p in self.tied:
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=self.tied_group)

    def norm_parameters(self):
        if self.is_last and not self.is_first and self.tied:  # the first stage counts the tied weights
            tied = {id(p) for p in self.tied}
            return [p for p in self.parameters() if id(p) not in tied]
        return self.parameters()

    def _loss(self, output, target):
        return self.loss_fn(output, target) * self._scale

    def _schedule(self, batch: int):
        """The schedule for batches of this size (stages infer shapes once, so one per size)."""
        if batch not in self._schedules:
            from torch.distributed.pipelining import PipelineStage, schedules

            interleaved = self.schedule_name == "interleaved-1f1b"
            m = fitting_microbatches(batch, self.n_microbatches, self.n_stages // len(self.stage_ids), interleaved)
            io = self.stage_io or [None] * len(self.stage_ids)
            stages = [PipelineStage(mod, sid, self.n_stages, self.device, group=self.pp_group,
                                    **_examples(shapes, batch // m, self.device, sid == 0))
                      for mod, sid, shapes in zip(self.stage_modules, self.stage_ids, io)]
            if interleaved:
                sched = schedules.ScheduleInterleaved1F1B(stages, m, loss_fn=self._loss, scale_grads=False)
            else:
                # 1F1B needs a microbatch per stage; a batch with fewer (a short last batch, or a per-rank
                # batch whose only divisor is 1) runs all-forward-then-all-backward: same gradients.
                gpipe = self.schedule_name == "gpipe" or m < self.n_stages
                cls = schedules.ScheduleGPipe if gpipe else schedules.Schedule1F1B
                sched = cls(stages[0], m, loss_fn=self._loss, scale_grads=False)
            self._schedules[batch] = sched
        return self._schedules[batch]

    def _run(self, x, y, train: bool):
        first = len(x) not in self._schedules
        sched = self._schedule(len(x))
        args = (x,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": y, "losses": losses} if self.is_last else {}
        # With no peers, the stages' first-step vote on static shapes must hear "static" from them.
        answer = _ReceivedOnes() if first and self.stage_io else contextlib.nullcontext()
        with self.autocast(), answer:
            out = sched.step(*args, **kwargs) if train else sched.eval(*args, **kwargs)
        return out, losses

    def train_step(self, x, y, scale):
        self.optimizer.zero_grad(set_to_none=True)
        if len(x) == 0:
            # This data-parallel group's share of a short last batch is empty, but its peers' FSDP
            # collectives need every stage to run: one zero sample runs with its loss scaled by 0.
            self._scale = 0.0
            self._run(x.new_zeros((1, *x.shape[1:])), y.new_zeros((1, *y.shape[1:])), train=True)
            return torch.zeros((), device=self.device), self._step_optimizer()
        self._scale = scale
        _, losses = self._run(x, y, train=True)
        total = (torch.stack([loss.detach() for loss in losses]).sum() / scale if losses
                 else torch.zeros((), device=self.device))
        return total, self._step_optimizer()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's full weights, renamed to the original model's keys, merged on rank 0."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        local = {}
        for module, names in zip(self.stage_modules, self.original_names):
            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
            local.update({names.get(k, k): v.detach().cpu() for k, v in state.items()})
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if parts else {}

    # Checkpoints carry the original model's names (stage modules number their layers from 0), so a
    # pipeline checkpoint loads under another split or strategy, and stages never write the same key.
    def _to_original(self, fqn: str) -> str:
        stage, _, rest = fqn.partition(".")
        return self.original_names[int(stage)].get(rest, fqn)

    def _rename(self, model_sd, optim_sd, name):
        def flat(key):  # "state.<fqn>.<leaf>" / "param_groups.<fqn>.<leaf>"
            kind, _, rest = key.partition(".")
            fqn, _, leaf = rest.rpartition(".")
            return f"{kind}.{name(fqn)}.{leaf}"

        model_sd = {name(k): v for k, v in model_sd.items()}
        if "state" in optim_sd and isinstance(optim_sd["state"], dict):  # nested (full) form
            optim_sd = {"state": {name(k): v for k, v in optim_sd["state"].items()},
                        "param_groups": [{**g, "params": [name(p) for p in g["params"]]}
                                         for g in optim_sd["param_groups"]]}
        else:
            optim_sd = {flat(k): v for k, v in optim_sd.items()}
        return model_sd, optim_sd

    def checkpoint_state(self, full: bool = False):
        return self._rename(*super().checkpoint_state(full), self._to_original)

    def load_checkpoint_state(self, model_sd, optim_sd, full: bool) -> None:
        local = {}
        for i, names in enumerate(self.original_names):
            local.update({orig: f"{i}.{key}" for key, orig in names.items()})
        if full:  # a whole-model checkpoint: keep this rank's stages only
            model_sd = {k: v for k, v in model_sd.items() if k in local}
            optim_sd = {"state": {k: v for k, v in optim_sd["state"].items() if k in local},
                        "param_groups": [{**g, "params": [p for p in g["params"] if p in local]}
                                         for g in optim_sd["param_groups"]]}
        super().load_checkpoint_state(*self._rename(model_sd, optim_sd, lambda k: local.get(k, k)), full)

    @torch.no_grad()
    def eval_step(self, x, y=None):
        self._scale = 1.0
        if len(x) == 0:  # an empty share (see train_step): run one zero sample, return none of it
            dummy_y = None if y is None else y.new_zeros((1, *y.shape[1:]))
            out, _ = self._run(x.new_zeros((1, *x.shape[1:])), dummy_y, train=False)
            return out[:0] if self.is_last and out is not None else None
        out, _ = self._run(x, y, train=False)
        return out if self.is_last else None


@dataclass
class Stages:
    """This rank's stage modules, their indices among ``count`` stages, and for each a map from its
    state-dict keys to the original model's."""

    modules: list[nn.Module]
    ids: list[int]
    count: int
    original_names: list[dict[str, str]]
    #: per stage: the (per-sample shape, dtype) of each tensor it takes and of each it returns; None: inferred
    #: from the peers on the first step, as torch.distributed.pipelining does by default
    io: list[tuple[list, list]] | None = None


@dataclass
class Tied:
    """The parameters this rank holds that another stage holds too, and the group that keeps them equal."""

    params: list[torch.nn.Parameter]
    group: Any


def build_stages(model, model_layers, bounds, stage_ids, device) -> Stages:
    """Stage modules over the model's own layer objects, and for each a map from its state-dict keys
    to the original model's (found by tensor identity, so workload-made wrapper layers work too)."""
    original = {id(t): k for k, t in reversed(list(model.state_dict(keep_vars=True).items()))}
    stages, names = [], []
    for a, b in (bounds[s] for s in stage_ids):
        stage = nn.Sequential(*model_layers[a:b])
        names.append({k: original.get(id(t), k) for k, t in stage.state_dict(keep_vars=True).items()})
        stages.append(contiguous_layout(stage).to(device))
    return Stages(stages, stage_ids, len(bounds), names)


def apply(model, workload, cfg, ctx, layout: Layout, total_steps: int, *, wrap=None) -> Engine:
    """Pipeline stages over the "pp" dimension of the layout's mesh; with ``dp > 1`` (hybrid), ``wrap``
    is applied to each stage module with the mesh (data parallelism over "dp")."""
    mesh = make_mesh((layout.dp, layout.pp), ("dp", "pp"), ctx.device)
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    virtual = VIRTUAL.get(cfg.schedule, 1)
    bounds = stage_bounds(cfg, workload, layout.pp * virtual)
    layers = workload.layers(model)
    tied_keys = tied_names(model, layers, bounds)  # before wrapping replaces the parameters
    ids = [pp_rank + v * layout.pp for v in range(virtual)]
    io = example_io(cfg, workload, layers, bounds, ids) if no_peers(mesh.get_group("pp")) else None
    stages = build_stages(model, layers, bounds, ids, ctx.device)
    stages.io = io
    if wrap is not None:
        stages.modules = [wrap(m, mesh) for m in stages.modules]
    m = microbatches(cfg, cfg.batch_size // layout.dp, stages.count)
    describe = {"mesh": layout.mesh(), "schedule": cfg.schedule, "microbatches": m,
                "stages": [list(range(a, b)) for a, b in bounds], "per_rank": {"stages": stages.ids}}
    tied = None
    if tied_keys:
        tied = tie_first_and_last(stages, tied_keys, mesh)
        describe["tied_weights"] = sorted(tied_keys)
    return PipelineEngine(stages, workload, cfg, ctx, total_steps, pp_group=mesh.get_group("pp"), dp_rank=dp_rank,
                          dp_size=layout.dp, describe=describe, n_microbatches=m, tied=tied)


def example_io(cfg, workload, layers, bounds, ids: list[int]) -> list[tuple[list, list]]:
    """For stages ``ids``: the (per-sample shape, dtype) of each tensor the stage takes and of each it returns,
    from two training samples run through the model's layers (under the run's autocast, which sets the dtypes)."""
    from parallelnn.parallel.engine import AUTOCAST

    def metas(t) -> list:
        return [(tuple(v.shape[1:]), v.dtype) for v in (t if isinstance(t, (tuple, list)) else (t,))]

    sample = workload.train.head(2)
    x = sample.prepare(sample.inputs)
    dtype = AUTOCAST.get(cfg.precision)
    found = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        for a, b in bounds:
            y = x
            for layer in layers[a:b]:
                y = layer(y)
            found.append((metas(x), metas(y)))
            x = y
    return [found[s] for s in ids]


def _examples(shapes: tuple[list, list] | None, batch: int, device, first: bool) -> dict[str, Any]:
    """``PipelineStage``'s ``input_args``/``output_args`` for microbatches of ``batch`` samples (none: inferred).
    A floating tensor requires a gradient, as a real step's would, but the data into the ``first`` stage:
    the stage allocates gradient buffers only for what does."""
    if shapes is None:
        return {}

    def example(shape, dtype, grad: bool) -> torch.Tensor:
        return torch.zeros((batch, *shape), dtype=dtype, device=device, requires_grad=grad and dtype.is_floating_point)

    inputs, outputs = shapes
    return {"input_args": tuple(example(s, d, not first) for s, d in inputs),
            "output_args": tuple(example(s, d, True) for s, d in outputs)}


class _ReceivedOnes(torch.utils._python_dispatch.TorchDispatchMode):
    """Meanwhile every receive finds ones in its buffer, as if a peer had sent them (under a fake process
    group, which sends nothing): the stages' vote on static shapes then hears every stage agree."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.namespace == "c10d" and func._schema.name.split("::")[-1].startswith("recv"):
            for t in args[0]:
                t.fill_(1)
        return result


def tied_names(model, layers, bounds) -> set[str]:
    """Names of the weights that the first and the last stage share (GPT-2's embedding and head)."""
    first = {id(p) for m in layers[bounds[0][0]:bounds[0][1]] for p in m.parameters()}
    shared = {id(p) for m in layers[bounds[-1][0]:bounds[-1][1]] for p in m.parameters() if id(p) in first}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in shared}


def tie_first_and_last(stages: Stages, names: set[str], mesh) -> Tied:
    """The tied weights this rank holds, and a group (first and last stage) in which to sum their gradients."""
    import torch.distributed as dist

    group = None
    for row in mesh.mesh.tolist():  # rows: one pipeline (dp index), columns: pp rank; every rank creates
        made = dist.new_group([row[0], row[-1]])  # every group, in the same order
        if dist.get_rank() in (row[0], row[-1]):
            group = made
    params: list[torch.nn.Parameter] = []
    if 0 in stages.ids or stages.count - 1 in stages.ids:
        for module, mapping in zip(stages.modules, stages.original_names):
            # named_parameters: the very tensors the optimizer steps (FSDP's state_dict hooks hand out
            # other, unsharded views)
            local = dict(module.named_parameters())
            params += [local[k] for k, orig in mapping.items() if orig in names and k in local]
    return Tied(list({id(p): p for p in params}.values()), group)


# -- cost model (parallelnn advise) ----------------------------------------------------------------------

def shape_of(inp) -> tuple[int, int, int]:
    """(stages p, virtual stages per rank v, microbatches m) of a candidate."""
    p, v = inp.layout.pp, VIRTUAL.get(inp.candidate.schedule, 1)
    return p, v, inp.candidate.microbatches or default_microbatches(max(1, int(inp.per_rank_batch)), p * v)


def actions(schedule: str | None, p: int, m: int, v: int, rank: int) -> list[tuple[bool, int]]:
    """The passes ``rank`` runs in a step, in order, as ``torch.distributed.pipelining`` orders them: each a
    (forward?, local chunk). GPipe (and 1F1B with fewer microbatches than stages, which runs GPipe's order):
    all forwards, then all backwards. 1F1B: p - rank forwards, then a backward and a forward each. Interleaved
    1F1B as ``ScheduleInterleaved1F1B`` (its ``_get_1f1b_rank_ops``): warm-up forwards round by round of
    chunks, (v-1) rounds plus 2 per hop from the last rank, then a forward and a backward each, backwards
    through the chunks in reverse."""
    if v == 1:
        warmup = m if schedule == "gpipe" or m < p else min(m, p - rank)
        steady = [forward for _ in range(m - warmup) for forward in (False, True)]
        return [(forward, 0) for forward in [True] * warmup + steady + [False] * warmup]
    per_round = m // max(1, m // p)
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), v * m)
    forwards = [(True, (i // per_round) % v) for i in range(v * m)]
    backwards = [(False, v - 1 - (j // per_round) % v) for j in range(v * m)]
    steady = [a for pair in zip(forwards[warmup:], backwards) for a in pair]
    return forwards[:warmup] + steady + backwards[v * m - warmup:]


def held(order: list[tuple[bool, int]], chunk_bytes: list[float]) -> float:
    """The most activation bytes a rank holds at once along ``order`` (:func:`actions`): a chunk's forward
    saves ``chunk_bytes[chunk]`` for its backward, which frees them."""
    now = peak = 0.0
    for forward, chunk in order:
        now += chunk_bytes[chunk] if forward else -chunk_bytes[chunk]
        peak = max(peak, now)
    return peak


def in_flight(schedule: str | None, p: int, m: int, v: int) -> float:
    """Microbatches whose activations the busiest rank holds at once, its chunks equal: GPipe all m; 1F1B up to
    p; interleaved 1F1B, m a multiple of p, p + (p-1)/v (Narayanan et al. 2021)."""
    return max(held(actions(schedule, p, m, v, r), [1 / v] * v) for r in range(p))


def stage_parameters(stats, p: int) -> float:
    """Parameters of a rank's stages: an even share, at least the largest layer."""
    return max(stats.parameters / p, min(stats.largest_layer_parameters, stats.parameters))


def stage_shares(stats, p: int, v: int) -> list[dict[str, float]] | None:
    """Per rank, when the model's layers are known: its share of the FLOPs, its parameters, its stages' layer
    bounds and each stage's (chunk's) activation bytes per sample, with the stages split as :func:`stage_bounds`
    splits them (balanced forward FLOPs)."""
    flops, params, acts = stats.layer_flops, stats.layer_parameters, stats.layer_activation_bytes_per_sample
    if not flops or not params or not acts or p * v > sum(1 for n in params if n):
        return None
    points = balanced_split(flops, [n > 0 for n in params], p * v)
    bounds = list(zip([0, *points], [*points, len(flops)]))
    total = sum(flops) or 1.0
    ranks = []
    for r in range(p):
        stages = [bounds[r + k * p] for k in range(v)]
        layers = [i for a, b in stages for i in range(a, b)]
        ranks.append({"flops": sum(flops[i] for i in layers) / total, "parameters": sum(params[i] for i in layers),
                      "chunks": [sum(acts[a:b]) for a, b in stages], "last": r == (p * v - 1) % p,
                      "stages": stages})
    return ranks


def receive_buffers(stats, p: int, v: int, rank: int, batch: float, bounds: list | None = None) -> float:
    """Bytes of the buffers ``rank`` receives into, which ``torch.distributed.pipelining`` allocates once per
    microbatch and keeps between steps: for each of its stages, the input activations of its whole per-rank
    ``batch`` unless it is the first stage, and the gradients of its outputs unless it is the last. With the
    stages' layer ``bounds`` (first, end) and the layers' output sizes known, each boundary at its own size;
    else each at the model's largest."""
    outputs = stats.layer_output_bytes_per_sample
    if bounds is None or not outputs:
        stages = [rank + k * p for k in range(v)]
        return sum((s > 0) + (s < p * v - 1) for s in stages) * batch * stats.boundary_bytes_per_sample
    last = len(outputs)
    return batch * sum((outputs[a - 1] if a > 0 else 0.0) + (outputs[b - 1] if b < last else 0.0) for a, b in bounds)


def bubble(compute: float, m: int, v: int, shares: list[float]) -> float:
    """Seconds the busiest rank idles in a step of ``compute`` seconds of its own work: the fill and drain
    pass each other rank's chunk of one microbatch once, so ``sum(others) / v`` of a microbatch's time (ranks'
    ``shares`` of the work). Equal shares give the textbook (p-1)/(v*m) of the compute, i.e. an idle
    fraction (p-1)/(v*m+p-1) (Narayanan et al. 2021); unequal stages idle less than the busiest one's share
    suggests, since the bottleneck is busy while the light stages fill."""
    busiest = max(shares)
    return compute / m * (sum(shares) - busiest) / busiest / v if busiest > 0 else 0.0


def cost(inp):
    """The busiest rank computes its stages' share of the FLOPs for every microbatch (stages split as the
    strategy splits them, when the layers are known; else 1/p each); the schedule's bubble idles it
    (p-1)/(v*m+p-1) of the step (equal stages; see :func:`bubble`); boundary activations are sent forward and
    their gradients back."""
    from parallelnn.advise import costs

    s, c = inp.stats, inp.candidate
    p, v, m = shape_of(inp)
    b = inp.per_rank_batch
    ranks = stage_shares(s, p, v)
    if ranks is None:
        share, memory = 1 / p, {**costs.model_state(inp, stage_parameters(s, p)),
                                "activations": costs.activation_bytes(inp, b / m * in_flight(c.schedule, p, m, v), 1 / p),
                                "buffers": max(receive_buffers(s, p, v, r, b) for r in range(p))}
        split = "stages balanced (1/p of FLOPs and parameters each, at least the largest layer)"
    else:
        share = max(r["flops"] for r in ranks)
        per_rank = [{**costs.model_state(inp, r["parameters"]),
                     "activations": b / m * held(actions(c.schedule, p, m, v, i), r["chunks"])
                     + (s.activation_fixed_bytes if r["last"] else 0.0),
                     "buffers": receive_buffers(s, p, v, i, b, r["stages"])} for i, r in enumerate(ranks)]
        memory = max(per_rank, key=lambda h: sum(h.values()))
        split = "stages split as the strategy splits them (balanced forward FLOPs of the model's layers)"
    compute = costs.compute_seconds(inp, b, share)
    shares = [r["flops"] for r in ranks] if ranks else [share] * p
    timed = inp.hw.stage_seconds
    if timed and len(timed) == p * v:  # stage k runs on rank k % p
        shares = [sum(timed[r::p]) for r in range(p)]
    p2p = costs.pipeline_p2p(inp, inp.group("pp"), b / m, m, v)
    problem = f"{p * v} pipeline stages but the model has {s.layers} layers to split" if p * v > s.layers else None
    return costs.StepCost(compute, memory, p2p, p2p, bubble(compute, m, v, shares), problem, [
        f"pipeline: {split}; boundary sends not overlapped; tied first/last-stage weights' gradient sum not "
        "counted; receive buffers counted whole besides the activations (a stage that saves its received input "
        "holds those bytes once)"], memory_per_rank=None if ranks is None else per_rank)


def cost_candidates(world_size: int, global_batch: int, dp: int = 1) -> list[tuple[Layout, int | None, str | None]]:
    """Every schedule with a few microbatch counts (pp, 2pp, 4pp that divide the per-rank batch)."""
    from parallelnn.advise import costs
    from parallelnn.config import SCHEDULES

    pp = world_size // dp
    return [(Layout(dp=dp, pp=pp), m, schedule) for schedule in SCHEDULES
            for m in costs.microbatch_options(global_batch // dp, pp)]


def _pipeline_layout(cfg, world_size: int) -> Layout:
    return Layout(pp=world_size)


STRATEGY = Strategy(name="pipeline", summary="torch.distributed.pipelining: consecutive layers as stages",
                    layout=_pipeline_layout, apply=apply, check=check, min_nproc=2,
                    options=("schedule", "microbatches", "split"), order=30,
                    cost=CostModel(candidates=cost_candidates, step=cost))
