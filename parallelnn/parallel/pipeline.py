"""pipeline: the model's layers split into consecutive stages, one (or, interleaved, two) per rank,
driven by ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``
/ ``ScheduleInterleaved1F1B``). Each batch is cut into ``--microbatches`` so stages work at once.

Stages are split where ``--split`` says, else to balance forward FLOPs (counted per layer with
``torch.utils.flop_counter``), each stage holding at least one layer with parameters.

Stages infer tensor shapes on their first step, so a batch of another size (the last of an epoch)
gets its own stage objects over the same modules (cached by batch size); if that batch does not
divide into the microbatches, it uses the largest divisor below --microbatches (and, 1F1B needing a
microbatch per stage, GPipe's order when that leaves fewer microbatches than stages). Same gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from parallelnn.config import parse_split
from parallelnn.errors import UserError
from parallelnn.launch import make_mesh
from parallelnn.parallel.engine import Engine, contiguous_layout

VIRTUAL = {"interleaved-1f1b": 2}  # stages per rank


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def layer_costs(layers: list[nn.Module], x: torch.Tensor) -> list[float]:
    """Forward FLOPs of each layer on a sample batch (parameter-free layers cost ~0)."""
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


def stage_bounds(cfg, built, n_stages: int, sample: torch.Tensor) -> list[tuple[int, int]]:
    layers = built.layers(built.model)
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
        points = balanced_split(layer_costs(layers, sample), parameterised, n_stages)
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
    return m


def check(cfg, built, world_size: int, pp: int | None = None, dp: int = 1) -> None:
    """Before spawning: the layers split into the stages and the batch into the microbatches."""
    pp = pp or world_size
    if built.layers is None:
        raise UserError(f"the {cfg.workload} model cannot be split into pipeline stages")
    if cfg.grad_accum > 1:
        raise UserError("--grad-accum does not combine with pipeline stages; use --microbatches")
    n_stages = pp * VIRTUAL.get(cfg.schedule, 1)
    sample = built.train.head(2)
    stage_bounds(cfg, built, n_stages, sample.prepare(sample.inputs))
    microbatches(cfg, cfg.batch_size // dp, n_stages)


class PipelineEngine(Engine):
    """Runs a pipeline schedule per batch; only the last stage sees outputs and losses."""

    def __init__(self, stage_modules, stage_ids, n_stages, built, cfg, ctx, total_steps, *, pp_group,
                 dp_rank=0, dp_size=1, describe=None, n_microbatches=1):
        super().__init__(nn.ModuleList(stage_modules), built, cfg, ctx.device, total_steps, dp_rank=dp_rank,
                         dp_size=dp_size, counts_outputs=n_stages - 1 in stage_ids, norm_group=pp_group,
                         describe=describe)
        self.stage_modules, self.stage_ids, self.n_stages = stage_modules, stage_ids, n_stages
        self.pp_group, self.schedule_name = pp_group, cfg.schedule
        self.n_microbatches = n_microbatches
        self.is_first, self.is_last = 0 in stage_ids, n_stages - 1 in stage_ids
        self._schedules: dict[int, object] = {}
        self._scale = 1.0
        self.tied: list[torch.nn.Parameter] = []  # weights shared by the first and last stage (e.g. GPT-2's)
        self.tied_group = None

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

            m = self.n_microbatches
            while batch % m:
                m -= 1
            stages = [PipelineStage(mod, sid, self.n_stages, self.device, group=self.pp_group)
                      for mod, sid in zip(self.stage_modules, self.stage_ids)]
            if self.schedule_name == "interleaved-1f1b":
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
        sched = self._schedule(len(x))
        args = (x,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": y, "losses": losses} if self.is_last else {}
        with self.autocast():
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
        total = (torch.stack([l.detach() for l in losses]).sum() / scale if losses
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


def build_stages(model, model_layers, bounds, stage_ids, device):
    """Stage modules over the model's own layer objects, and for each a map from its state-dict keys
    to the original model's (found by tensor identity, so workload-made wrapper layers work too)."""
    original = {id(t): k for k, t in reversed(list(model.state_dict(keep_vars=True).items()))}
    stages, names = [], []
    for a, b in (bounds[s] for s in stage_ids):
        stage = nn.Sequential(*model_layers[a:b])
        names.append({k: original.get(id(t), k) for k, t in stage.state_dict(keep_vars=True).items()})
        stages.append(contiguous_layout(stage).to(device))
    return stages, names


def apply(model, built, cfg, ctx, total_steps: int, *, mesh=None, wrap=None) -> Engine:
    """Pure pipeline over all ranks, or (from hybrid) over the mesh's "pp" dimension with ``wrap``
    applied to each stage module (data parallelism over "dp")."""
    if mesh is None:
        mesh = make_mesh((ctx.world_size,), ("pp",), ctx.device)
    pp = mesh["pp"].size() if mesh.ndim > 1 else mesh.size()
    pp_rank = mesh["pp"].get_local_rank() if mesh.ndim > 1 else mesh.get_local_rank()
    dp_size = mesh["dp"].size() if mesh.ndim > 1 else 1
    dp_rank = mesh["dp"].get_local_rank() if mesh.ndim > 1 else 0
    virtual = VIRTUAL.get(cfg.schedule, 1)
    n_stages = pp * virtual
    sample = built.train.head(2)
    bounds = stage_bounds(cfg, built, n_stages, sample.prepare(sample.inputs))
    stage_ids = [pp_rank + v * pp for v in range(virtual)]
    layers = built.layers(model)
    tied = tied_names(model, layers, bounds)  # before wrapping replaces the parameters
    modules, names = build_stages(model, layers, bounds, stage_ids, ctx.device)
    if wrap is not None:
        modules = [wrap(m) for m in modules]
    m = microbatches(cfg, cfg.batch_size // dp_size, n_stages)
    describe = {"mesh": {"dp": dp_size, "pp": pp} if dp_size > 1 else {"pp": pp}, "schedule": cfg.schedule,
                "microbatches": m, "stages": [list(range(a, b)) for a, b in bounds],
                "per_rank": {"stages": stage_ids}}
    engine = PipelineEngine(modules, stage_ids, n_stages, built, cfg, ctx, total_steps,
                            pp_group=mesh.get_group("pp"), dp_rank=dp_rank, dp_size=dp_size,
                            describe=describe, n_microbatches=m)
    engine.original_names = names
    if tied:
        tie_first_and_last(engine, tied, mesh, describe)
    return engine


def tied_names(model, layers, bounds) -> set[str]:
    """Names of the weights that the first and the last stage share (GPT-2's embedding and head)."""
    first = {id(p) for m in layers[bounds[0][0]:bounds[0][1]] for p in m.parameters()}
    shared = {id(p) for m in layers[bounds[-1][0]:bounds[-1][1]] for p in m.parameters() if id(p) in first}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in shared}


def tie_first_and_last(engine, names: set[str], mesh, describe) -> None:
    """Give the holders of tied weights a group in which to sum their gradients."""
    import torch.distributed as dist

    ranks = mesh.mesh.reshape(-1, mesh.mesh.shape[-1])  # rows: one pipeline (dp index), columns: pp rank
    for row in ranks.tolist():  # every rank creates every group, in the same order
        group = dist.new_group([row[0], row[-1]])
        if dist.get_rank() in (row[0], row[-1]):
            engine.tied_group = group
    if engine.is_first or engine.is_last:
        for module, mapping in zip(engine.stage_modules, engine.original_names):
            # named_parameters: the very tensors the optimizer steps (FSDP's state_dict hooks hand out
            # other, unsharded views)
            local = dict(module.named_parameters())
            engine.tied += [local[k] for k, orig in mapping.items() if orig in names and k in local]
        engine.tied = list({id(p): p for p in engine.tied}.values())
    describe["tied_weights"] = sorted(names)

