"""The probe: what a strategy costs a step besides computing and moving the model's bytes, measured.

Each candidate's *fixed cost* — its framework's hooks, the latency of every collective call in the pattern the
strategy really issues them (a ring's ranks arriving as their compute ends, not after a barrier), a pipeline
schedule's per-microbatch work — is measured by running the candidate's own strategy, layout and schedule on a
*probe*: a model of 16-wide blocks with next to nothing to compute or send, under a parameter-free load as
heavy as the real model's (:class:`Ballast`), so that its collectives meet the same competition for the cores.
Where the bytes a strategy moves are the model's, the probe moves them too, shaped as the real model: FSDP's
holds the real blocks' parameter counts (:class:`Padded`), tensor parallelism's has the plan's Linear pairs at
their real widths, a pipeline's has the real stages' loads and boundaries (:class:`Widen`); their transfers are
then measured as they run on busy cores, not at an idle link's speed. :func:`probe_seconds` runs them, in each
rank of :func:`.calibrate.spawn` (or under a fake process group, counting the calls: :class:`CallCount`).
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from parallelnn.measure import MOST_STEPS, timed_steps
from parallelnn.parallel.engine import Engine

PROBE_WIDTH = 16
# Steps of a probe: PROBE_WARMUP, then at least PROBE_STEPS and PROBE_SECONDS' worth as the warm-up's pace
# says (at most MOST_STEPS), the count agreed by all ranks (each must issue the same collectives). Two ranks
# on two cores vary 20-30% from one step to the next; the fixed cost is a difference of two such medians.
PROBE_WARMUP, PROBE_STEPS, PROBE_SECONDS = 5, 12, 0.6


class _Busy(torch.autograd.Function):
    """Identity whose forward and backward keep this rank's cores busy with ``reps`` matrix products each;
    ``anchor`` (a scalar that requires a gradient and never gets one) makes the backward run where ``x`` needs
    no gradient: the first block of a probe, whose real counterpart computes its weights' gradients there."""

    @staticmethod
    def forward(ctx, x, anchor, matrix, forward_reps: int, backward_reps: int):
        for _ in range(forward_reps):
            torch.mm(matrix, matrix)
        ctx.matrix, ctx.reps = matrix, backward_reps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        for _ in range(ctx.reps):
            torch.mm(ctx.matrix, ctx.matrix)
        return grad, None, None, None, None


class Ballast(torch.nn.Module):
    """Compute without parameters or communication: ``seconds_per_sample`` of matrix products per sample in a
    step (a third in the forward, two thirds in the backward), so that a probe's collectives and hooks meet
    the same competition for the cores, and the same drift between ranks, as the real model's do."""

    SIZE = 96

    def __init__(self, seconds_per_sample: float, mm_seconds: float):
        super().__init__()
        self.seconds_per_sample, self.mm_seconds = seconds_per_sample, mm_seconds
        self.matrix = torch.ones(self.SIZE, self.SIZE)
        self.anchor = torch.zeros((), requires_grad=True)  # not a parameter: nothing to gather, reduce or update

    def forward(self, x):
        reps = self.seconds_per_sample * len(x) / self.mm_seconds if self.mm_seconds else 0.0
        return _Busy.apply(x, self.anchor, self.matrix, round(reps / 3), round(2 * reps / 3))


def mm_seconds(batches: int = 7, calls: int = 50) -> float:
    """Seconds of one :class:`Ballast` matrix product here, with this process's threads: the median of
    ``batches`` batches' means (a few milliseconds in all, so that it is measured right before each probe: one
    taken seconds earlier, in a slow spell, made every probe's ballast 30% short here)."""
    m = torch.ones(Ballast.SIZE, Ballast.SIZE)
    torch.mm(m, m)
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(m, m)
        means.append((time.perf_counter() - t0) / calls)
    return statistics.median(means)


class Narrow(torch.nn.Module):
    """The first :data:`PROBE_WIDTH` features of a wider input: what a probe block reads of a :class:`Widen`'s."""

    def forward(self, x):
        return x[..., :PROBE_WIDTH]


class Widen(torch.nn.Module):
    """A probe block's output padded with zeros to ``width`` features: a pipeline probe's stage then sends (and
    receives the gradient of) as many bytes as the real stage it stands for, at next to no compute."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x):
        return torch.nn.functional.pad(x, (0, self.width - x.shape[-1]))


class Padded(torch.nn.Module):
    """A probe block holding ``parameters`` in all: its Linear and a padding parameter (its gradient zeros), so
    that a strategy that moves parameters (FSDP's gathers and reduce-scatters) moves the real block's bytes."""

    def __init__(self, linear: torch.nn.Linear, parameters: int):
        super().__init__()
        own = sum(p.numel() for p in linear.parameters())
        self.linear, self.pad = linear, torch.nn.Parameter(torch.zeros(max(1, parameters - own)))

    def forward(self, x):
        return self.linear(x) + self.pad.sum() * 0


def probe_workload(units: int, cfg, ballast: float = 0.0, mm: float = 0.0, samples: int | None = None,
                   ballasts: list[float] | None = None, widths: list[int] | None = None,
                   parameters: list[int] | None = None, pairs: list[list[int]] | None = None):
    """A model with ``units`` blocks (Linear layers of width 16, ReLU between) and nothing else to speak of:
    what a strategy costs on it is what it costs besides FLOPs and bytes. ``ballast``: seconds per sample of
    parameter-free compute in each block (see :class:`Ballast`); ``ballasts``: per block instead. ``widths``:
    features of each block's output but the last (a block wider than 16 pads its output, :class:`Widen`, and
    the next reads the first 16). ``parameters``: each block's parameter count (:class:`Padded`). ``pairs``:
    instead, one block per [input width, output width] of a tensor-parallel Linear pair: the input padded to
    its width into a Linear to 16, a Linear from 16 to the output's width, read back at 16 (so a column-wise
    and row-wise pair all-reduces the real pair's bytes: its output forward, its input's gradient backward,
    at next to no compute). ``samples``: in its training split (default: one batch)."""
    from torch import nn

    from parallelnn.workload import Workload, complete

    ballasts = ballasts or [ballast] * units
    widths = widths or [PROBE_WIDTH] * (units - 1)
    layers: list[nn.Module] = []
    for k, (inputs, outputs) in enumerate(pairs or []):
        layers += [Ballast(ballasts[k], mm)] if ballasts[k] else []
        layers += [Widen(inputs)] if inputs > PROBE_WIDTH else []
        layers += [nn.Linear(max(inputs, PROBE_WIDTH), PROBE_WIDTH), nn.ReLU(), nn.Linear(PROBE_WIDTH, outputs)]
        layers += [Narrow() if outputs > PROBE_WIDTH else Widen(PROBE_WIDTH)] if outputs != PROBE_WIDTH else []
    for k in range(0 if pairs else units):
        layers += [Narrow()] if k and widths[k - 1] > PROBE_WIDTH else []
        # Ballast first: a block's output is then its Linear's (FSDP warns of a module returning a view).
        linear = nn.Linear(PROBE_WIDTH, PROBE_WIDTH)
        layers += ([Ballast(ballasts[k], mm)] if ballasts[k] else []) + [Padded(linear, parameters[k]) if parameters
                                                                          else linear]
        if k < units - 1:
            layers += [nn.ReLU()] + ([Widen(widths[k])] if widths[k] > PROBE_WIDTH else [])
    g = torch.Generator().manual_seed(0)
    n = samples or max(cfg.batch_size, 2)
    x, y = torch.randn(n, PROBE_WIDTH, generator=g), torch.randint(0, PROBE_WIDTH, (n,), generator=g)
    return complete(Workload(model=nn.Sequential(*layers), train=(x, y), test=(x[:2], y[:2])), cfg.seed, "probe")


def block_starts(workload) -> list[int]:
    """Indices of the layers where a probe's blocks 2.. begin (the first layer after a block's ReLU or Widen):
    a pipeline probe of one block per stage splits there (``--split``)."""
    layers = workload.layers(workload.model)
    return [i for i in range(1, len(layers))
            if isinstance(layers[i - 1], (torch.nn.ReLU, Widen)) and not isinstance(layers[i], Widen)]


def probe_units(blocks: int, candidates) -> int:
    """Blocks of the probe: the real model's, and enough for every candidate's pipeline stages."""
    from parallelnn.parallel.pipeline import VIRTUAL

    stages = [c.layout.pp * VIRTUAL.get(c.schedule, 1) for c in candidates]
    return max([2, blocks, *stages])


def _agreed_steps(warm: list[float]) -> int:
    """Steps to measure after warm-up steps of ``warm`` seconds: what every rank asks for, at most."""
    import torch.distributed as dist

    pace = statistics.median(warm[1:] or warm)
    wanted = torch.tensor([max(PROBE_STEPS, min(MOST_STEPS, int(PROBE_SECONDS / max(pace, 1e-6)) + 1))])
    dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    return int(wanted.item())


def _probe_one(cfg, candidate, units: int, rank: int, world: int, ballast: float | list[float] = 0.0,
               mm: float = 0.0, alone: dict | None = None, latency: dict[str, float] | None = None,
               calls: dict[str, dict[str, int]] | None = None, shape: dict | None = None,
               update: float = 0.0) -> float | None:
    """Median step seconds of ``candidate``'s strategy on the probe, less what it would take without fixed
    costs; None when the strategy refuses it. ``ballast``: seconds per sample per block of a rank's real load;
    a list: per block, each a pipeline stage with ``shape["widths"]`` outputs (less its load, bubble and own
    work). ``shape["parameters"]``: the real blocks' sizes (less its load and ``update``, the real optimizer
    step, over the data-parallel ranks). Else less its plain step, timed once per key in ``alone``.
    ``latency``: under a fake process group (rank 0 of ``world``), seconds a call of each kind takes; the
    step's calls are counted (:class:`CallCount`, noted in ``calls``) and their latency added."""
    from dataclasses import replace

    from parallelnn.launch import Context
    from parallelnn.trainer import StopFlag

    shape = shape or {}
    staged, sized = isinstance(ballast, list), shape.get("parameters")
    built = _probe_built(cfg, candidate, units, world, ballast, mm, shape)
    if built is None:
        return None
    ccfg, workload, strategy, layout = built
    ctx = Context(device=torch.device("cpu"), rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                  distributed=True)
    per_rank = ccfg.batch_size // layout.dp
    passes = _plain_passes(ccfg, layout, per_rank)
    loaded = _rank_ballast(ccfg, workload, layout) or sized  # its own ballast says what it would take
    key = (tuple(round(b, 12) for b in (ballast if staged else [ballast])), json.dumps(shape, sort_keys=True),
           per_rank, passes)
    alone = {} if alone is None else alone
    # The plain step's model, copied before the strategy changes the probe in place (FSDP shards it, tensor
    # parallelism makes its weights DTensors): a copy taken after would step with the strategy's collectives,
    # a time-bound number of them on each rank.
    pristine = copy.deepcopy(workload.model) if key not in alone and not loaded else None
    engine = strategy.apply(workload.model, workload, ccfg, ctx, layout, PROBE_WARMUP + MOST_STEPS)
    x = workload.train.inputs[engine.dp_rank * per_rank:(engine.dp_rank + 1) * per_rank]
    y = workload.train.targets[engine.dp_rank * per_rank:(engine.dp_rank + 1) * per_rank]
    # The trainer agrees on stop requests every step: part of a step's fixed cost.
    stop = StopFlag(ctx, backend="gloo" if latency is None else "fake")

    def step() -> float:
        t0 = time.perf_counter()
        engine.train_step(x, y, engine.dp_size / ccfg.batch_size)
        stop.agreed()
        return time.perf_counter() - t0

    warm = [step() for _ in range(PROBE_WARMUP)]
    times = [step() for _ in range(_agreed_steps(warm))]
    waiting = 0.0 if latency is None else _calls_seconds(step, latency, calls, candidate.label())
    stop.drain()
    if sized:
        without = ballast * per_rank * units + update / layout.dp
    elif loaded:  # plus each rank's share of the probe's own layers' work (the real stages' is in their load)
        own = _own_work(ccfg, units, shape, passes, x, y, alone)
        without = _without_fixed(ccfg, workload, layout, alone=latency is not None) + own / layout.pp
    else:
        if key not in alone:
            plain = Engine(pristine, workload, replace(ccfg, grad_accum=passes), ctx.device, total_steps=MOST_STEPS)
            alone[key] = timed_steps(lambda: plain.train_step(x, y, 1.0 / len(x)))
        without = alone[key]
    return max(0.0, statistics.median(times) - without) + waiting


def _own_work(cfg, units: int, shape: dict, passes: int, x, y, alone: dict) -> float:
    """Seconds of a plain step (``passes`` passes) of a pipeline probe of this shape with no load: its own
    layers' work, not the real model's; timed once per shape in ``alone``."""
    from dataclasses import replace

    key = ("own", units, json.dumps(shape, sort_keys=True), len(x), passes)
    if key not in alone:
        bare = probe_workload(units, cfg, ballasts=[0.0] * units, widths=shape.get("widths"))
        plain = Engine(bare.model, bare, replace(cfg, grad_accum=passes), torch.device("cpu"), total_steps=MOST_STEPS)
        alone[key] = timed_steps(lambda: plain.train_step(x, y, 1.0 / len(x)))
    return alone[key]


def _probe_built(cfg, candidate, units: int, world: int, ballast: float | list[float], mm: float, shape: dict):
    """(its config, the probe, its strategy, its layout) for :func:`_probe_one`, or None when the strategy
    refuses the probe."""
    from dataclasses import replace

    from parallelnn import parallel
    from parallelnn.advise.trials import run_options
    from parallelnn.errors import UserError

    ccfg = replace(cfg, **run_options(candidate))
    staged = isinstance(ballast, list)
    workload = probe_workload(units, ccfg, 0.0 if staged else ballast, mm, ballasts=ballast if staged else None,
                              widths=shape.get("widths"), parameters=shape.get("parameters"),
                              pairs=shape.get("pairs"))
    # One stage a block when the blocks stand for the real stages; else split as the strategy splits the probe
    # (not at the real model's --split, whose indices are its layers').
    ccfg = replace(ccfg, split=",".join(map(str, block_starts(workload))) if staged else None)
    try:
        strategy, layout = parallel.resolve(ccfg, world)
        strategy.check(ccfg, workload, layout)
    except UserError:
        return None
    return ccfg, workload, strategy, layout


def _plain_passes(cfg, layout, per_rank: int) -> int:
    """Forward + backward passes the plain step makes of the batch, as the strategy's step does: a pipeline's
    microbatches (its stages were timed per microbatch, so the per-call cost of each pass is compute, not the
    schedule's), else one."""
    from parallelnn.parallel import pipeline

    if layout.pp < 2:
        return 1
    return pipeline.microbatches(cfg, per_rank, layout.pp * pipeline.VIRTUAL.get(cfg.schedule, 1))


def _calls_seconds(step, latency: dict[str, float], calls: dict[str, dict[str, int]] | None, label: str) -> float:
    """Seconds the collective calls of one more ``step()`` would wait, at ``latency`` seconds a call of each kind
    (:class:`CallCount` counts them); the counts go in ``calls[label]``."""
    with CallCount() as counted:
        step()
    if calls is not None:
        calls[label] = counted.calls
    return sum(n * latency[kind] for kind, n in counted.calls.items())


def _rank_ballast(cfg, workload, layout) -> list[float] | None:
    """Seconds of ballast per sample each rank of a pipeline probe computes (its stages'), or None when the probe
    is no pipeline or carries no ballast."""
    from parallelnn.parallel import pipeline

    layers = workload.layers(workload.model)
    if layout.pp < 2 or not any(isinstance(layer, Ballast) for layer in layers):
        return None
    p, v = layout.pp, pipeline.VIRTUAL.get(cfg.schedule, 1)
    per_stage = [sum(layer.seconds_per_sample for layer in layers[a:b] if isinstance(layer, Ballast))
                 for a, b in pipeline.stage_bounds(cfg, workload, p * v)]
    return [sum(per_stage[r::p]) for r in range(p)]


def _without_fixed(cfg, workload, layout, alone: bool = False) -> float:
    """What a pipeline probe's step would take with no fixed cost, as the cost model puts it: its busiest rank's
    ballast over the per-rank batch (the real stages' timed compute, :func:`probe_seconds`) and the schedule's
    bubble (:func:`pipeline.bubble`), the ranks' shares of the work being their ballast's. The rest of its step
    (the schedule's own work, the boundaries' transfers) is the fixed cost, less each rank's share of the probe's
    own layers' work, timed apart (:func:`_probe_one`). (Other probes subtract their plain step, timed.)
    ``alone``: rank 0 under a fake process group, whose receives wait for no peer: its own ballast, no bubble."""
    from parallelnn.parallel import pipeline

    shares = _rank_ballast(cfg, workload, layout)
    per_rank = cfg.batch_size // layout.dp
    if alone:
        return shares[0] * per_rank
    compute = max(shares) * per_rank
    m = _plain_passes(cfg, layout, per_rank)
    return compute + pipeline.bubble(compute, m, pipeline.VIRTUAL.get(cfg.schedule, 1), shares)


def probe_seconds(cfg, candidates, units: int, rank: int, world: int, loads: dict[str, float],
                  passes: dict[int, tuple[float, float]], latency: dict[str, float] | None = None,
                  calls: dict[str, dict[str, int]] | None = None, resized: dict[str, int] | None = None,
                  shapes: dict[str, dict] | None = None, staged: dict[str, float] | None = None
                  ) -> tuple[dict[str, float], dict[str, list]]:
    """Every candidate's fixed cost; under the compute load of the real model where its step was timed:
    ``loads[label]`` (the share of a whole forward + backward a rank of that candidate computes) times the
    pass seconds measured at the batch one of its passes handles (a pipeline's microbatch), spread over the
    probe's blocks. ``latency``: one process under a fake process group (see :func:`_probe_one`); a strategy
    that cannot run so is left out. ``resized``: candidates timed again on a probe of another size (label ->
    its block count), so that what a step pays once is told from what it pays per block or call. ``shapes``:
    pipeline candidates' real stages (label -> {"stages": [[first layer, end layer], ...] in order, "widths":
    each stage's output in floats per sample}): their probe has a block per stage, loaded with that stage's
    timed seconds (``staged``, keyed as :func:`stage_seconds` keys them) and sending its real boundary's bytes;
    or the real blocks' parameter counts (label -> {"parameters": [...]}): a probe of as many blocks, as large;
    or a tensor-parallel plan's Linear pairs (label -> {"pairs": [[input width, output width], ...]}): a probe of
    as many pairs, all-reducing as many bytes.
    Returns ({label: seconds}, {label: [blocks, seconds] of the resized probe})."""
    import torch.distributed as dist

    found: dict[str, float] = {}
    again: dict[str, list] = {}
    alone: dict = {}
    for c in candidates:
        batch = c.pass_batch(cfg.batch_size)
        measured = passes.get(batch)
        shape = (shapes or {}).get(c.label())
        first = len(shape.get("stages") or shape.get("parameters") or shape["pairs"]) if shape else units
        for size in [first] + ([resized[c.label()]] if resized and c.label() in resized and not shape else []):
            ballast = loads.get(c.label(), 0.0) * measured[0] / batch / size if measured else 0.0
            if shape and "stages" in shape:
                timed = [(staged or {}).get(f"{a}-{b}-{batch}") for a, b in shape["stages"]]
                ballast = [t / batch for t in timed] if all(timed) else [ballast] * size
            mm = mm_seconds()  # now: the machine's pace moves over seconds, and the ballast must keep time
            dist.barrier()
            try:
                seconds = _probe_one(cfg, c, size, rank, world, ballast, mm, alone, latency,
                                     calls if size == first else None, shape, measured[1] if measured else 0.0)
            except Exception:  # noqa: BLE001 - with real ranks a failure is the calibration's; alone, one candidate's
                if latency is None:
                    raise
                seconds = None
            if seconds is None:
                break
            if size == first:
                found[c.label()] = seconds
            else:
                again[c.label()] = [size, seconds]
    return found, again


#: Collective ops, as the dispatcher names them (c10d's and the functional ones DTensor issues), by kind.
CALL_KINDS = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
              "all_reduce_coalesced": "all_reduce", "broadcast_": "all_reduce", "barrier": "all_reduce",
              "_allgather_base_": "all_gather", "allgather_": "all_gather",
              "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
              "all_gather_into_tensor_coalesced": "all_gather", "_reduce_scatter_base_": "reduce_scatter",
              "reduce_scatter_": "reduce_scatter", "reduce_scatter_tensor_coalesced_": "reduce_scatter",
              "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
              "send": "send_recv", "recv_": "send_recv", "recv_any_source_": "send_recv"}


class CallCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the collective calls issued meanwhile, by kind (``calls``)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            kind = CALL_KINDS.get(func._schema.name.split("::")[-1])
            if kind:
                self.calls[kind] = self.calls.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))
