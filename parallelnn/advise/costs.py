"""The analytic cost model: the mechanisms of a training step, not a curve fit.

* Collectives on a two-level topology (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`,
  :func:`send_recv`): ranks of a group within one node talk over ``hw.intra``, across nodes over
  ``hw.inter``. Ring formulas as NCCL's bus-bandwidth accounting states them (nccl-tests PERFORMANCE.md):
  all-reduce ``2(n-1)/n * bytes / bw + 2(n-1) * latency``; all-gather and reduce-scatter
  ``(n-1)/n * bytes / bw + (n-1) * latency`` (``bytes`` = the full, gathered size). A group spanning
  nodes with several ranks per node is hierarchical: within the node first, across nodes on each rank's
  part, within the node again.
* What one rank holds and computes (:func:`model_state`, :func:`activation_bytes`, :func:`compute_seconds`)
  and the building blocks of each strategy's communication (:func:`ddp_sync`, :func:`fsdp_sync`,
  :func:`tensor_parallel_comm`, :func:`pipeline_p2p`; the bubble is ``parallel.pipeline.bubble``).
* :func:`predict_step`: asks the candidate's strategy (``parallel.get(name).cost``, which each module of
  ``parallelnn/parallel`` defines from these blocks) for its :class:`StepCost`, then checks memory and batch.

Nothing here spells a strategy's name: what a strategy does lives in its module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from parallelnn.advise.hardware import Hardware, Link
from parallelnn.parallel import Layout

BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default
FORWARD_SHARE = 1 / 3  # forward FLOPs of a training step (backward ~ 2x forward)


# -- collectives -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """Where a process group's ranks sit: ``per_node`` of them in each of ``nodes`` nodes."""

    size: int
    per_node: int
    nodes: int


def placement(size: int, stride: int, ranks_per_node: int) -> Group:
    """The group of ``size`` ranks, ``stride`` ranks apart (mesh dimensions inside it), when nodes hold
    ``ranks_per_node`` consecutive ranks."""
    if size <= 1:
        return Group(1, 1, 1)
    per_node = 1 if stride >= ranks_per_node else max(1, min(size, ranks_per_node // stride))
    return Group(size, per_node, math.ceil(size / per_node))


def _ring(factor: int, n: int, nbytes: float, link: Link) -> float:
    """``factor`` = 2 for all-reduce, 1 for all-gather / reduce-scatter, over a ring of ``n`` on one link."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return factor * (n - 1) / n * nbytes / link.bandwidth + factor * (n - 1) * link.latency


def all_reduce(hw: Hardware, group: Group, nbytes: float) -> float:
    """Seconds to all-reduce ``nbytes`` (per rank) over ``group``: a ring within a node or across nodes
    (one rank per node); otherwise reduce-scatter within nodes, all-reduce of each rank's 1/k part across
    nodes (k rings at once, each on its device's share of the NICs), all-gather within nodes."""
    if group.size <= 1 or nbytes <= 0:
        return 0.0
    if group.nodes == 1:
        return _ring(2, group.size, nbytes, hw.link("all_reduce"))
    if group.per_node == 1:
        return _ring(2, group.size, nbytes, hw.inter)
    k = group.per_node
    return 2 * _ring(1, k, nbytes, hw.intra) + _ring(2, group.nodes, nbytes / k, hw.inter)


def all_gather(hw: Hardware, group: Group, nbytes: float, kind: str = "all_gather") -> float:
    """Seconds to all-gather a tensor of ``nbytes`` in all (each rank contributes nbytes / size)."""
    if group.size <= 1 or nbytes <= 0:
        return 0.0
    if group.nodes == 1:
        return _ring(1, group.size, nbytes, hw.link(kind))
    if group.per_node == 1:
        return _ring(1, group.size, nbytes, hw.inter)
    k = group.per_node  # across nodes among same-local-rank peers (1/k of the whole), then within the node
    return _ring(1, group.nodes, nbytes / k, hw.inter) + _ring(1, k, nbytes, hw.intra)


def reduce_scatter(hw: Hardware, group: Group, nbytes: float) -> float:
    """Seconds to reduce-scatter ``nbytes`` (the full size; each rank ends with nbytes / size): the mirror
    image of :func:`all_gather`, same cost."""
    return all_gather(hw, group, nbytes, "reduce_scatter")


def send_recv(hw: Hardware, nbytes: float, same_node: bool) -> float:
    """Seconds for one point-to-point transfer of ``nbytes``; across nodes a lone flow has one NIC."""
    if nbytes <= 0:
        return 0.0
    if same_node:
        link = hw.link("send_recv")
        return nbytes / link.bandwidth + link.latency
    return nbytes / hw.lone_inter_bandwidth() + hw.inter.latency


# -- the model and the candidate -------------------------------------------------------------------------

@dataclass
class ModelStats:
    """What the cost model needs to know of a model (measured on a real one, or on the meta device)."""

    parameters: int
    #: At the training dtype (fp32 master weights: 4 bytes each).
    parameter_bytes: int
    #: Forward + backward FLOPs per sample.
    flops_per_sample: float
    #: Tensors saved for backward, per sample, at the compute dtype.
    activation_bytes_per_sample: float
    #: Units a pipeline can split (e.g. transformer blocks + embedding + head).
    layers: int
    #: The largest group FSDP gathers at once (a block, or the root's own weights: embedding + head).
    largest_layer_parameters: int
    #: The activation passed between consecutive layers, per sample (pipeline send/recv size).
    boundary_bytes_per_sample: float
    #: Bytes tensor-parallel forward all-reduces per sample across all layers (Megatron: 2 per block of
    #: [seq, hidden]); the backward all-reduces as much again.
    tp_allreduce_bytes_per_sample: float
    #: Fraction of the parameters a tensor-parallel plan shards (the rest is replicated on every TP rank).
    tp_sharded_fraction: float
    tokens_per_sample: int | None = None
    #: Forward all-reduces per microbatch under tensor parallelism (0: taken as 2 per layer).
    tp_allreduce_calls: int = 0
    #: The backward's all-reduces (the column-wise layers' input gradients), bytes per sample and calls; None:
    #: as the forward's (a transformer block's are the same [seq, hidden]).
    tp_backward_allreduce_bytes_per_sample: float | None = None
    tp_backward_allreduce_calls: int | None = None
    #: Fractions of the FLOPs and of the saved activations the TP plan shards (None: tp_sharded_fraction).
    tp_sharded_flops_fraction: float | None = None
    tp_sharded_activation_fraction: float | None = None
    #: Saved bytes that do not grow with the batch (e.g. the loss's own), once per step.
    activation_fixed_bytes: float = 0.0
    #: Modules FSDP shards one by one before the root (``parallel.engine.blocks_of``).
    blocks: int = 0
    #: Per pipeline layer (when known): forward FLOPs on a sample batch (what the pipeline balances), parameters
    #: and saved activation bytes per sample. The pipeline cost then splits the stages as the strategy does.
    layer_flops: list[float] | None = None
    layer_parameters: list[int] | None = None
    layer_activation_bytes_per_sample: list[float] | None = None
    #: Per pipeline layer (when known): its output's bytes per sample (what a stage ending there sends).
    layer_output_bytes_per_sample: list[float] | None = None
    #: Bytes the memory-bound ops (everything but the FLOPs counted: matmuls, convolutions, fused attention)
    #: read and write per sample in forward + backward, at the compute dtype; timed at the hardware's
    #: ``memory_bandwidth`` when it has one. Of which: the blocks' forward (what recomputation runs again), and
    #: the part a tensor-parallel plan shards (None: ``tp_sharded_flops_fraction``).
    nonmatmul_bytes_per_sample: float = 0.0
    nonmatmul_block_forward_bytes_per_sample: float = 0.0
    tp_sharded_nonmatmul_fraction: float | None = None
    #: Fraction of the FLOPs inside the repeated blocks (what per-block recomputation runs again); None: all.
    block_flops_fraction: float | None = None

    @property
    def bytes_per_parameter(self) -> float:
        return self.parameter_bytes / self.parameters if self.parameters else 4.0


@dataclass
class Candidate:
    """One way to run: a strategy, its degrees, and for pipelines the microbatches and schedule."""

    strategy: str
    layout: Layout
    microbatches: int | None = None
    schedule: str | None = None
    activation_checkpointing: bool = False

    def label(self) -> str:
        degrees = "x".join(f"{k}{v}" for k, v in (("dp", self.layout.dp), ("pp", self.layout.pp),
                                                  ("tp", self.layout.tp)) if v > 1) or "1"
        extra = [f"{self.schedule} m={self.microbatches}"] if self.microbatches else []
        extra += ["recompute"] if self.activation_checkpointing else []
        return f"{self.strategy} {degrees}" + (f" ({', '.join(extra)})" if extra else "")

    def pass_batch(self, global_batch: int) -> int:
        """Samples one forward/backward pass handles on a rank of this candidate (a pipeline's microbatch)."""
        per_rank = max(1, global_batch // self.layout.dp)
        return max(1, per_rank // self.microbatches) if self.microbatches else per_rank


@dataclass(frozen=True)
class CostInputs:
    """Everything a strategy's cost function reads."""

    stats: ModelStats
    hw: Hardware
    candidate: Candidate
    global_batch: int
    dtype: str
    optimizer_state_bytes_per_param: float
    nodes: int

    @property
    def layout(self) -> Layout:
        return self.candidate.layout

    @property
    def ranks_per_node(self) -> int:
        return max(1, math.ceil(self.layout.world_size / self.nodes))

    @property
    def per_rank_batch(self) -> float:
        """Samples each model copy trains on per step (the global batch over the data-parallel ranks)."""
        return self.global_batch / self.layout.dp

    def group(self, dim: str) -> Group:
        """The placement of one process group along ``dim`` ("dp", "pp" or "tp"). Meshes put tp innermost
        (consecutive ranks), then pp, then dp, as ``make_mesh`` does for (dp, tp) and (dp, pp)."""
        lay = self.layout
        size, stride = {"tp": (lay.tp, 1), "pp": (lay.pp, lay.tp), "dp": (lay.dp, lay.tp * lay.pp)}[dim]
        return placement(size, stride, self.ranks_per_node)


@dataclass
class StepCost:
    """What a strategy's cost function returns: one rank's step (the busiest rank)."""

    compute_seconds: float
    #: parameters, gradients, optimizer, activations, buffers: bytes on one rank.
    memory: dict[str, float]
    #: Seconds of communication in flight per step (overlapped or not).
    comm_seconds: float = 0.0
    #: Of which the step waits for.
    exposed_comm_seconds: float = 0.0
    bubble_seconds: float = 0.0
    #: Why this layout cannot run at all (besides memory), or None.
    problem: str | None = None
    assumptions: list[str] = field(default_factory=list)
    #: Where ranks hold different parts (pipeline stages): each rank's ``memory``; ``memory`` is the largest.
    memory_per_rank: list[dict[str, float]] | None = None

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.bubble_seconds + self.exposed_comm_seconds


# -- building blocks of the strategies' cost functions ---------------------------------------------------

def model_state(inp: CostInputs, parameters: float) -> dict[str, float]:
    """Bytes of ``parameters`` held by a rank: weights and gradients at the training dtype, optimizer state."""
    per = inp.stats.bytes_per_parameter
    return {"parameters": parameters * per, "gradients": parameters * per,
            "optimizer": parameters * inp.optimizer_state_bytes_per_param}


def recomputed_share(inp: CostInputs) -> float:
    """FLOPs recomputed, as a share of a step's: per-block activation checkpointing (``checkpoint_wrapper``
    on each block, as torchtitan and the strategies here apply it) reruns the blocks' forward in backward, not
    the embedding, the LM head or the loss (Korthikanti et al. 2022, arXiv:2205.05198, section 5: full
    recomputation costs one more forward of the recomputed layers). A forward is ``FORWARD_SHARE`` of a step (backward
    ~2x forward: Narayanan et al. 2021, eq. 3 counts 2 forward-equivalents in backward)."""
    if not inp.candidate.activation_checkpointing:
        return 0.0
    f = inp.stats.block_flops_fraction
    return FORWARD_SHARE * (1.0 if f is None else f)


def compute_seconds(inp: CostInputs, samples: float, fraction: float = 1.0, bytes_fraction: float | None = None
                    ) -> float:
    """Forward + backward of ``fraction`` of the model's FLOPs on ``samples`` (with recomputation the blocks'
    forward once more, :func:`recomputed_share`) at ``matmul_efficiency`` of peak, plus, where the hardware
    states its memory bandwidth, the memory-bound ops' bytes (``bytes_fraction`` of them; default ``fraction``)
    at that bandwidth: a roofline sum, each non-matmul op taken as bandwidth-bound and none overlapping a GEMM
    (eager PyTorch runs them as separate kernels; Williams et al. 2009, "Roofline", CACM 52(4)). Without a
    bandwidth (this machine's calibration: a measured whole-step rate) the FLOPs alone."""
    s, hw = inp.stats, inp.hw
    flops = s.flops_per_sample * samples * fraction * (1 + recomputed_share(inp))
    seconds = flops / (hw.peak(inp.dtype) * hw.matmul_efficiency)
    if hw.memory_bandwidth and s.nonmatmul_bytes_per_sample:
        moved = s.nonmatmul_bytes_per_sample
        if inp.candidate.activation_checkpointing:
            moved += s.nonmatmul_block_forward_bytes_per_sample
        seconds += moved * samples * (fraction if bytes_fraction is None else bytes_fraction) / hw.memory_bandwidth
    return seconds


def backward_seconds(inp: CostInputs, compute: float) -> float:
    """The part of ``compute`` after the first gradient exists (backward, and recomputed forwards)."""
    extra = recomputed_share(inp)
    return compute * (1 - FORWARD_SHARE + extra) / (1 + extra)


def activation_bytes(inp: CostInputs, samples: float, layer_share: float = 1.0, shard: float = 1.0) -> float:
    """Saved activations for ``samples`` in flight of the ``layer_share`` of the layers a rank runs (a
    pipeline stage), of which it keeps ``shard`` (tensor parallelism). With recomputation: each layer's
    input (the boundary activation, whole) plus one layer's activations being recomputed."""
    s = inp.stats
    full = (s.activation_bytes_per_sample * samples + s.activation_fixed_bytes) * layer_share * shard
    if not inp.candidate.activation_checkpointing:
        return full
    layers = max(1.0, s.layers * layer_share)
    return min(full, s.boundary_bytes_per_sample * samples * layers + full / layers)


def tp_fractions(stats: ModelStats, tp: int) -> tuple[float, float, float]:
    """(parameters, FLOPs, activations) a tensor-parallel rank holds or computes, as fractions of the model:
    the sharded part over ``tp``, the replicated rest whole."""

    def share(f: float | None) -> float:
        f = stats.tp_sharded_fraction if f is None else f
        return 1 - f + f / tp

    return (share(stats.tp_sharded_fraction), share(stats.tp_sharded_flops_fraction),
            share(stats.tp_sharded_activation_fraction))


def tp_nonmatmul_share(stats: ModelStats, tp: int) -> float:
    """The memory-bound bytes a tensor-parallel rank moves, as a fraction of the model's: what the plan shards
    (per-head and 4h tensors) over ``tp``, the rest (layer norms, residual adds, dropout on [seq, hidden], the
    loss) whole on every rank, as Megatron without sequence parallelism runs them (Korthikanti et al. 2022,
    arXiv:2205.05198, section 4.2.1)."""
    f = stats.tp_sharded_nonmatmul_fraction
    f = (stats.tp_sharded_flops_fraction if stats.tp_sharded_flops_fraction is not None
         else stats.tp_sharded_fraction) if f is None else f
    return 1 - f + f / tp


def ddp_sync(inp: CostInputs, group: Group, grad_bytes: float, overlap: float) -> tuple[float, float]:
    """(comm, exposed) of DDP's gradient all-reduce: bucketed and started during backward, so only what
    outlasts the ``overlap`` window is exposed, plus the last bucket (ready when backward ends)."""
    comm = all_reduce(inp.hw, group, grad_bytes)
    last = all_reduce(inp.hw, group, min(grad_bytes, DDP_BUCKET_BYTES))
    return comm, max(0.0, comm - overlap * inp.hw.comm_overlap) + min(last, comm)


def fsdp_sync(inp: CostInputs, group: Group, parameters: float, gathered_bytes: float, overlap: float,
              gathers: float = 2.0, block_fraction: float = 1.0) -> tuple[float, float]:
    """(comm, exposed) of ZeRO-3 / FSDP over ``parameters``: ``gathers`` all-gathers of them at
    ``gathered_bytes`` a parameter (forward, and again in backward after resharding) and one reduce-scatter
    of their gradients at the parameters' own dtype; prefetch overlaps them with ``overlap`` seconds of
    compute, except the first block's gather (``block_fraction``: the part of a block a rank gathers, e.g.
    1/tp of its sharded weights)."""
    s = inp.stats
    param_bytes = parameters * gathered_bytes
    comm = gathers * all_gather(inp.hw, group, param_bytes) + reduce_scatter(inp.hw, group,
                                                                              parameters * s.bytes_per_parameter)
    first = all_gather(inp.hw, group, min(param_bytes, s.largest_layer_parameters * block_fraction * gathered_bytes))
    return comm, max(0.0, comm - overlap * inp.hw.comm_overlap) + min(first, comm)


def fsdp_buffers(inp: CostInputs, block_fraction: float = 1.0) -> float:
    """FSDP's transient unsharded memory: the largest block gathered twice (computing + prefetched) and its
    unsharded gradient before the reduce-scatter (``block_fraction``: the part a rank holds, e.g. 1/tp)."""
    s = inp.stats
    return 3 * s.largest_layer_parameters * block_fraction * s.bytes_per_parameter


def tensor_parallel_comm(inp: CostInputs, group: Group, samples: float) -> float:
    """Seconds of Megatron-style all-reduces of ``samples``' activations (full size, not sharded): the
    forward's (the row-wise layers' outputs), a recomputed forward's, and the backward's (the column-wise
    layers' input gradients; as many as the forward's unless counted apart); on the critical path, each layer
    waits for its sum."""
    s = inp.stats
    calls = s.tp_allreduce_calls or 2 * s.layers
    back_calls = calls if s.tp_backward_allreduce_calls is None else s.tp_backward_allreduce_calls
    back_bytes = (s.tp_allreduce_bytes_per_sample if s.tp_backward_allreduce_bytes_per_sample is None
                  else s.tp_backward_allreduce_bytes_per_sample)
    forwards = 2 if inp.candidate.activation_checkpointing else 1
    forward = calls * all_reduce(inp.hw, group, s.tp_allreduce_bytes_per_sample * samples / calls)
    backward = back_calls * all_reduce(inp.hw, group, back_bytes * samples / back_calls) if back_calls else 0.0
    return forwards * forward + backward


def pipeline_p2p(inp: CostInputs, group: Group, microbatch: float, microbatches: int, virtual: int = 1) -> float:
    """Seconds of boundary transfers on a pipeline's critical path, forward and backward: the busiest rank
    waits for each of its v*m (chunk) microbatches' transfers over the slowest hop (across nodes when the
    stages span nodes), and the fill and drain cross each of the p-1 hops once. Stages are consecutive
    ranks, so one flow per node crosses at a time."""
    if group.size <= 1:
        return 0.0
    nbytes = inp.stats.boundary_bytes_per_sample * microbatch
    hops = group.size - 1
    crossing = min(hops, group.nodes - 1)
    inside, across = send_recv(inp.hw, nbytes, True), send_recv(inp.hw, nbytes, False)
    slowest = across if crossing else inside
    return 2 * virtual * microbatches * slowest + 2 * ((hops - crossing) * inside + crossing * across)


def replica(inp: CostInputs) -> StepCost:
    """One whole model copy on a rank, training on the per-rank batch: no communication."""
    b = inp.per_rank_batch
    memory = {**model_state(inp, inp.stats.parameters), "activations": activation_bytes(inp, b)}
    return StepCost(compute_seconds(inp, b), memory)


def microbatch_options(per_rank_batch: float, stages: int) -> list[int]:
    """Microbatch counts worth trying: stages, 2x and 4x stages where they divide the per-rank batch (else
    the largest divisor of the batch up to the stages, so there is one)."""
    b = int(per_rank_batch)
    if b < 1:
        return [1]
    found = [m for m in (stages, 2 * stages, 4 * stages) if b % m == 0]
    return found or [max(m for m in range(1, min(b, stages) + 1) if b % m == 0)]


# -- the prediction -------------------------------------------------------------------------------------

@dataclass
class Prediction:
    candidate: Candidate
    step_seconds: float
    samples_per_second: float
    memory_bytes_per_rank: float
    memory_breakdown: dict[str, float]
    compute_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float
    bubble_seconds: float
    feasible: bool
    reason: str
    assumptions: list[str]
    #: Per-step costs besides compute and bytes (hooks, collective calls' latency, schedule), measured on a probe.
    fixed_seconds: float = 0.0
    #: The optimizer step over the parameters a rank holds, once a step (when the hardware says its rate).
    optimizer_seconds: float = 0.0
    #: Where ranks hold different parts (pipeline stages): each rank's breakdown, as ``memory_breakdown`` (the
    #: largest of them, by its total); None where every rank holds the same.
    memory_per_rank: list[dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"strategy": c.strategy, "dp": c.layout.dp, "tp": c.layout.tp, "pp": c.layout.pp,
                "microbatches": c.microbatches, "schedule": c.schedule,
                "activation_checkpointing": c.activation_checkpointing, "label": c.label(),
                **{k: getattr(self, k) for k in ("step_seconds", "samples_per_second", "memory_bytes_per_rank",
                                                  "memory_breakdown", "compute_seconds", "comm_seconds",
                                                  "exposed_comm_seconds", "bubble_seconds", "fixed_seconds",
                                                  "optimizer_seconds", "memory_per_rank", "feasible",
                                                  "reason", "assumptions")}}


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _batch_problem(inp: CostInputs) -> str | None:
    lay, c = inp.layout, inp.candidate
    if inp.global_batch % lay.dp:
        return f"the global batch of {inp.global_batch} does not divide over {lay.dp} data-parallel ranks"
    if c.microbatches and int(inp.per_rank_batch) % c.microbatches:
        return f"{c.microbatches} microbatches do not divide the per-rank batch of {int(inp.per_rank_batch)}"
    if lay.world_size > inp.hw.max_devices:
        return f"needs {lay.world_size} devices, {inp.hw.name} has {inp.hw.max_devices}"
    return None


#: Optimizer state a parameter holds, in bytes: Adam(W)'s two fp32 moments.
ADAM_STATE_BYTES = 8


def predict_step(stats: ModelStats, hw: Hardware, candidate: Candidate, global_batch: int, dtype: str = "bf16",
                 optimizer_state_bytes_per_param: float = ADAM_STATE_BYTES, nodes: int | None = None,
                 fixed_seconds: float = 0.0, extra_memory: dict[str, float] | None = None) -> Prediction:
    """One training step of ``candidate`` on ``hw``: time, memory per rank, and whether it can run.
    ``fixed_seconds``: what the step costs besides compute and bytes, when measured (then ``hw``'s links
    carry no latency: the measurement holds it). ``extra_memory``: parts a rank holds besides the model's
    state, activations and buffers (on a GPU here: the runtime's measured share and the resident data)."""
    from parallelnn import parallel

    strategy = parallel.get(candidate.strategy)
    nodes = nodes or hw.nodes_for(candidate.layout.world_size)
    inp = CostInputs(stats, hw, candidate, global_batch, dtype, optimizer_state_bytes_per_param, nodes)
    problem = strategy.nproc_problem(candidate.layout.world_size) or _batch_problem(inp)
    if strategy.cost is None:
        problem = problem or f"no cost model for strategy {candidate.strategy}"
        cost = StepCost(0.0, {})
    else:
        cost = strategy.cost.step(inp)
        problem = problem or cost.problem
    def breakdown(held: dict[str, float]) -> dict[str, float]:
        parts = {k: float(held.get(k, 0.0)) for k in ("parameters", "gradients", "optimizer", "activations", "buffers")}
        return {**parts, **(extra_memory or {})}

    memory = breakdown(cost.memory)
    per_rank = [breakdown(r) for r in cost.memory_per_rank] if cost.memory_per_rank else None
    total = sum(memory.values())
    if problem is None and total > hw.memory_bytes:
        problem = f"needs {gb(total)} per {'GPU' if hw.device_type == 'cuda' else 'device'}, has {gb(hw.memory_bytes)}"
    update = memory["parameters"] / inp.stats.bytes_per_parameter * hw.optimizer_seconds_per_parameter
    step = cost.step_seconds + fixed_seconds + update
    return Prediction(candidate=candidate, step_seconds=step,
                      samples_per_second=global_batch / step if step > 0 else 0.0,
                      memory_bytes_per_rank=total, memory_breakdown=memory, compute_seconds=cost.compute_seconds,
                      comm_seconds=cost.comm_seconds, exposed_comm_seconds=cost.exposed_comm_seconds,
                      bubble_seconds=cost.bubble_seconds, feasible=problem is None, reason=problem or "",
                      assumptions=list(cost.assumptions), fixed_seconds=fixed_seconds, optimizer_seconds=update,
                      memory_per_rank=per_rank)
