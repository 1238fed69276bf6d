"""This machine as a :class:`~parallelnn.advise.hardware.Hardware` the cost model can read, per candidate.

On a CPU, N ranks share C cores: each rank computes with C/N threads, at the rate the calibration measured
for that thread count and the batch one compute pass handles (the per-rank batch; for a pipeline, its
busiest rank's stages timed on a microbatch); the optimizer step apart, per parameter a rank updates; its
memory is the N-th part of RAM; its links are gloo over loopback, fitted per collective kind from N real
processes (with ``concurrent=False``, N gloo ranks that are threads of one process); collectives do not hide
behind compute (gloo's threads need the same cores), so ``comm_overlap`` is 0. What a step costs besides computing and moving bytes — the strategy's hooks, each
collective call's latency in the pattern the strategy issues them, a schedule's per-microbatch work — is
each candidate's *fixed cost*, measured on a probe model (:func:`.probe.probe_seconds`; with
``concurrent=False``, in one process under a fake process group, its calls' latency added as counted); the
links then carry bandwidth only, so no latency counts twice, and nothing for a candidate whose probe moved the
real bytes between real processes (FSDP's, a pipeline's: ``carried``).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import replace
from typing import Any

from parallelnn.advise import calibrate, probe
from parallelnn.advise.costs import Candidate, ModelStats, Prediction, predict_step
from parallelnn.advise.hardware import Hardware, Link


def cores() -> int:
    return os.cpu_count() or 1


def ram_bytes() -> int:
    from parallelnn.record import memory_bytes

    return memory_bytes()


def threads_for(nproc: int) -> int:
    return max(1, cores() // nproc)


def link_for(nproc: int, fitted: dict[str, Any] | None, kind: str = "all_reduce", latency: bool = True) -> Link:
    """The link that makes the cost model's ring formula for ``kind`` reproduce the time fitted at ``nproc``
    ranks: an all-reduce moves 2(n-1)/n of the bytes and pays 2(n-1) latencies, an all-gather or
    reduce-scatter (n-1)/n and n-1, a send/recv all of them and one. ``latency=False``: bandwidth only (the
    calls' latency is in the candidate's measured fixed cost)."""
    if nproc < 2 or not fitted:
        return Link(bandwidth=1e12, latency=0.0)
    f = fitted[kind]
    moved, hops = {"all_reduce": (2 * (nproc - 1) / nproc, 2 * (nproc - 1)), "send_recv": (1.0, 1)}.get(
        kind, ((nproc - 1) / nproc, nproc - 1))
    return Link(bandwidth=f["bandwidth"] * moved, latency=f["latency"] / hops if latency else 0.0)


class Machine:
    """This machine, calibrated for the candidates at hand: one process's step rate at each pass batch, and
    for each process count N, the rate of N processes stepping at once (each with its share of the cores:
    they contend for memory bandwidth too) and their collectives."""

    def __init__(self, workload, cfg, stats: ModelStats, concurrent: bool = True):
        """``concurrent=False``: calibrate with one process only (each rank's thread count; gloo ranks as threads;
        the strategies' code under a fake process group), to test how well the model extrapolates to N
        processes."""
        self.workload, self.cfg, self.stats, self.concurrent = workload, cfg, stats, concurrent
        self.rates: dict[tuple[int, int], float] = {}  # (processes, pass batch) -> FLOP/s of one rank
        self.links: dict[int, dict[str, Any]] = {}
        self.fixed: dict[str, float] = {}  # candidate label -> seconds a step pays besides FLOPs and bytes
        self.updates: dict[int, list[float]] = {}  # processes -> optimizer seconds per parameter, per measurement
        self.stage_rates: dict[str, float] = {}  # pipeline candidate label -> FLOP/s of its busiest rank, as timed
        self.stage_times: dict[str, list[float]] = {}  # pipeline candidate label -> seconds of each stage, in order
        from parallelnn.launch import resolve_device

        self.device = resolve_device(cfg.device)
        self.step_bytes: dict[int, int] = {}  # on a GPU: pass batch -> allocator's peak bytes of one process's step
        self.loop: float | None = None  # seconds the training loop adds to every step (calibrate.loop_seconds)
        self.problems: list[str] = []  # what could not be measured, said with the advice
        self._probes: dict[int, ModelStats] = {}  # probe block count -> its stats
        self.carried: set[str] = set()  # candidates whose probe sent the real boundaries' bytes between processes

    def calibrate(self, candidates: list[Candidate], global_batch: int) -> None:
        """Measure every (process count, pass batch) the candidates need, each process count in one go."""
        if self.loop is None:
            self.loop = calibrate.loop_seconds(self.cfg, self.device)
        if self.device.type == "cuda":
            return self._calibrate_gpus(candidates, global_batch)
        needed: dict[int, set[int]] = {}
        for c in candidates:
            needed.setdefault(c.layout.world_size, set()).add(c.pass_batch(global_batch))
        for n, batches in sorted(needed.items()):
            group = [c for c in candidates if c.layout.world_size == n]
            stages = sorted({job for c in group for job in self._stage_jobs(c, global_batch)})
            steps: dict[int, tuple[float, float]] = {}
            staged: dict[str, float] = {}
            if n > 1 and self.concurrent:
                steps, staged = self._together(n, group, batches, stages)
            threads = cores() if n == 1 else threads_for(n)
            for b in sorted(batches):
                if b not in steps:
                    steps[b] = calibrate.step_seconds(self.workload, self.cfg, threads, b)
                passes, update = steps[b]
                self.rates[(n, b)] = self._rate(passes, b)
                self.updates.setdefault(n, []).append(update / max(self.stats.parameters, 1))
            if stages and not staged:
                staged = calibrate.stage_seconds(self.workload, self.cfg, stages, threads)
            if n > 1 and n not in self.links:
                self._alone(n, group, steps, staged)
            for c in group:
                self._stage_rate(c, global_batch, staged)
        if len(needed) > 1:  # the single process timed again after the others, the faster of the two (fastest)
            for b in needed.get(1, ()):
                passes, _ = calibrate.step_seconds(self.workload, self.cfg, cores(), b)
                self.rates[(1, b)] = max(self.rates[(1, b)], self._rate(passes, b))

    def _together(self, n: int, group: list[Candidate], batches: set[int], stages: list) -> tuple[dict, dict]:
        """The model's steps, pipeline stages, collectives and fixed costs measured in ``n`` processes at once;
        ({}, {}) and a note in ``problems`` if that fails (then one process measures, as with ``concurrent=False``:
        the advice goes on)."""
        by_name = not self.cfg.workload.startswith("python:")  # else: one process at a time, in calibrate
        units = probe.probe_units(self.stats.blocks, group)
        shapes = self._shapes(group)
        try:
            measured = calibrate.spawn(n, self.cfg, sorted(batches) if by_name else [], stages if by_name else [],
                                       group, units, {c.label(): self._load(c) for c in group},
                                       resized=self._resized(group, units, shapes), shapes=shapes)
        except Exception as err:  # noqa: BLE001 - a failed calibration costs accuracy, not the advice
            self.problems.append(f"calibrating {n} processes at once failed ({_last_line(err)}); their predictions "
                                 "use one process's measurements")
            return {}, {}
        self.links[n] = calibrate.fitted(measured["collectives"])
        self._fixed(group, measured, units, shapes)
        self.carried |= {label for label, shape in shapes.items()
                         if (shape.get("widths") or full_size(shape)) and label in measured["fixed"]}
        return {int(b): tuple(v) for b, v in measured["steps"].items()}, measured["stages"]

    def _alone(self, n: int, group: list[Candidate], steps: dict[int, tuple[float, float]],
               staged: dict[str, float]) -> None:
        """The links and fixed costs of ``n`` processes, measured in one (:func:`.calibrate.alone_seconds`):
        what the strategies' own code costs and how long their calls take, not how ranks sharing the cores
        slow each other. If even that fails, it is noted and communication is left out."""
        units = probe.probe_units(self.stats.blocks, group)
        shapes = self._shapes(group)
        try:
            measured = calibrate.alone_seconds(n, self.cfg, group, units, {c.label(): self._load(c) for c in group},
                                               steps, resized=self._resized(group, units, shapes), shapes=shapes,
                                               staged=staged)
        except Exception as err:  # noqa: BLE001 - as in _together: a failed calibration costs accuracy only
            self.problems.append(f"calibrating {n} ranks in one process failed ({_last_line(err)}); their "
                                 "collectives and fixed costs are not predicted (taken as free)")
            self.links[n] = {}
            return
        self.links[n] = calibrate.fitted(measured["collectives"])
        self._fixed(group, measured, units, shapes)

    def _calibrate_gpus(self, candidates: list[Candidate], global_batch: int) -> None:
        """On GPUs every rank has a device of its own: one GPU's steps, timed here at each pass batch, stand for
        every rank's, and the allocator's peak of that step is measured with them. The collectives are NCCL's,
        timed between N processes, one per GPU. No probe: the links keep each call's latency."""
        import torch

        from parallelnn.runner import set_matmul_precision

        set_matmul_precision(self.cfg, self.device)  # TF32 or true fp32, as the run will have it
        for c in candidates:
            n, b = c.layout.world_size, c.pass_batch(global_batch)
            if b not in self.step_bytes:
                passes, update = calibrate.step_seconds(self.workload, self.cfg, torch.get_num_threads(), b,
                                                        self.device)
                self.rates[(1, b)] = self._rate(passes, b)
                self.updates.setdefault(1, []).append(update / max(self.stats.parameters, 1))
                self.step_bytes[b] = calibrate.cuda_step_bytes(self.workload, self.cfg, b, self.device)
            self.rates[(n, b)] = self.rates[(1, b)]
            self.updates[n] = self.updates[1]
            if n > 1 and n not in self.links:
                self.links[n] = calibrate.fitted(calibrate.spawn(n, device_type="cuda")["collectives"])

    def _gpu_memory(self, candidate: Candidate, global_batch: int, hw: Hardware, dtype: str) -> dict[str, float]:
        """What a GPU rank holds besides the modelled state: the allocator's measured peak of one process's step at
        this pass batch less the parts the model counts for it (cuBLAS' workspace, backward's temporaries,
        autocast copies), and the data a memory loader keeps on the device (each rank holds every split)."""
        from parallelnn.advise.costs import ADAM_STATE_BYTES, CostInputs, activation_bytes, model_state

        b = candidate.pass_batch(global_batch)
        whole = replace(candidate, activation_checkpointing=False)  # as calibrated: the whole model, plainly
        inp = CostInputs(self.stats, hw, whole, b, dtype, ADAM_STATE_BYTES, 1)
        counted = sum(model_state(inp, self.stats.parameters).values()) + activation_bytes(inp, b)
        return {"runtime": max(0.0, self.step_bytes[b] - counted),
                "data": resident_bytes(self.workload) if self.cfg.loader == "memory" else 0.0}

    def _load(self, candidate: Candidate) -> float:
        """The share of a whole forward + backward (at its per-rank batch) a rank of ``candidate`` computes,
        for the probe's ballast: a tensor-parallel rank its sharded share; a pipeline the whole, which its
        stages split (the probe then subtracts its stages' compute and bubble as the cost model puts them:
        what is left is the schedule's own work, its sends and receives meeting busy cores)."""
        from parallelnn.advise.costs import tp_fractions

        return tp_fractions(self.stats, candidate.layout.tp)[1] if candidate.layout.tp > 1 else 1.0

    def _pipeline_ranks(self, candidate: Candidate) -> list[dict] | None:
        from parallelnn.parallel.pipeline import VIRTUAL, stage_shares

        if candidate.layout.pp < 2 or self.workload.layers is None:
            return None
        return stage_shares(self.stats, candidate.layout.pp, VIRTUAL.get(candidate.schedule, 1))

    def _shapes(self, group: list[Candidate]) -> dict[str, dict]:
        """Probes shaped as the real model (:func:`.probe.probe_seconds`). A pipeline's as its real stages:
        the stages' layers in order, and each stage's output in floats per sample (at least the probe's width;
        None when the layers' outputs are not known). A strategy that moves parameters
        (``probe_real_parameters``): the real blocks' parameter counts, the root's own added to the first (the
        root gathers before the first block does). One whose bytes are activations at Linear pairs
        (``probe_real_activations``): the pairs' input and output widths."""
        from parallelnn import parallel
        from parallelnn.parallel.engine import blocks_of
        from parallelnn.parallel.tensor import linear_pairs

        shapes = {}
        for c in group:
            ranks = self._pipeline_ranks(c)
            if parallel.get(c.strategy).cost.probe_real_parameters and c.layout.world_size == c.layout.dp:
                counts = [sum(p.numel() for p in b.parameters()) for b in blocks_of(self.workload.model, self.workload)]
                if len(counts) >= 2:
                    counts[0] += max(0, self.stats.parameters - sum(counts))
                    shapes[c.label()] = {"parameters": counts}
            if parallel.get(c.strategy).cost.probe_real_activations and c.layout.world_size == c.layout.tp:
                pairs = linear_pairs(self.workload, self.workload.model)
                if pairs:
                    shapes[c.label()] = {"pairs": pairs}
            if not ranks:
                continue
            stages = in_order(ranks)
            out = self.stats.layer_output_bytes_per_sample
            widths = [max(probe.PROBE_WIDTH, math.ceil(out[b - 1] / 4)) for _, b in stages[:-1]] if out else None
            shapes[c.label()] = {"stages": [list(s) for s in stages], "widths": widths}
        return shapes

    def _stage_jobs(self, candidate: Candidate, global_batch: int) -> list[tuple[int, int, int]]:
        """(first layer, end layer, microbatch) of every stage of a pipeline candidate, to be timed."""
        ranks = self._pipeline_ranks(candidate)
        batch = candidate.pass_batch(global_batch)
        return [(a, b, batch) for r in ranks or [] for a, b in r["stages"]]

    def _stage_rate(self, candidate: Candidate, global_batch: int, staged: dict[str, float]) -> None:
        """A pipeline candidate's rate: its busiest rank's stages, as timed, per microbatch, over the FLOP
        share the cost model gives that rank (stages differ in how fast they compute: a convolution runs
        nearer the peak than a pooling layer); and each stage's seconds, from which the bubble reads the ranks'
        shares of the work (``Hardware.stage_seconds``)."""
        ranks = self._pipeline_ranks(candidate)
        if not ranks:
            return
        batch = candidate.pass_batch(global_batch)
        times = [sum(staged.get(f"{a}-{b}-{batch}", 0.0) for a, b in r["stages"]) for r in ranks]
        if min(times) > 0:
            share = max(r["flops"] for r in ranks)
            self.stage_rates[candidate.label()] = self.stats.flops_per_sample * batch * share / max(times)
            self.stage_times[candidate.label()] = [staged[f"{a}-{b}-{batch}"] for a, b in in_order(ranks)]

    def _probe_counts(self, strategy: str, size: int) -> float:
        """How many times a probe of ``size`` blocks pays ``strategy``'s growing fixed costs (its ``fixed_units``)."""
        from parallelnn import parallel
        from parallelnn.advise.stats import model_stats

        if size not in self._probes:
            self._probes[size] = ModelStats(**model_stats(probe.probe_workload(size, self.cfg)))
        return parallel.get(strategy).cost.fixed_units(self._probes[size])

    def _resized(self, group: list[Candidate], units: int, shapes: dict[str, dict]) -> dict[str, int]:
        """A second probe size for each candidate whose fixed cost grows with the model (its strategy's
        ``fixed_units``) and whose count differs on the probe: the size whose count comes nearest the real
        model's (at most 4x the probe's blocks). Two sizes tell what a step pays once (the optimizer over
        sharded parameters, the loss's input, the stop flag) from what it pays per block or call. ``shapes``: the
        group's probe shapes (:meth:`_shapes`)."""
        from parallelnn import parallel

        resized = {}
        for c in group:
            grows = parallel.get(c.strategy).cost.fixed_units
            if grows is None or full_size(shapes.get(c.label())):  # a probe of the real size: no carrying
                continue
            want, first = grows(self.stats), self._probe_counts(c.strategy, units)
            sizes = [u for u in range(2, 4 * units + 1) if u != units]
            near = min(sizes, key=lambda u: (abs(self._probe_counts(c.strategy, u) - want), u))
            if want != first and self._probe_counts(c.strategy, near) != first:
                resized[c.label()] = near
        return resized

    def _fixed(self, group: list[Candidate], measured: dict[str, Any], units: int, shapes: dict[str, dict]) -> None:
        """Each candidate's measured fixed cost, carried from the probe's block count to the model's where the
        strategy says how it grows (FSDP: per block; tensor parallel: per all-reduce): along the line through
        the two probe sizes (:func:`per_unit_line`), or in proportion when only one was timed; as measured when
        its probe had the real model's shape (``shapes``)."""
        from parallelnn import parallel

        again = measured.get("fixed_resized", {})
        for c in group:
            if c.label() not in measured["fixed"]:
                continue
            seconds, grows = measured["fixed"][c.label()], parallel.get(c.strategy).cost.fixed_units
            if grows is None or full_size(shapes.get(c.label())):
                self.fixed[c.label()] = seconds
                continue
            points = [(self._probe_counts(c.strategy, units), seconds)]
            if c.label() in again:
                size, other = again[c.label()]
                points.append((self._probe_counts(c.strategy, int(size)), other))
            self.fixed[c.label()] = per_unit_line(points, grows(self.stats))

    def _rate(self, seconds: float, batch: int) -> float:
        return self.stats.flops_per_sample * batch / seconds

    def hardware(self, candidate: Candidate, global_batch: int) -> Hardware:
        n = candidate.layout.world_size
        key = (n, candidate.pass_batch(global_batch))
        if key not in self.rates:
            self.calibrate([candidate], global_batch)
        fitted = self.links.get(n)
        latency = candidate.label() not in self.fixed
        link = link_for(n, fitted, latency=latency)
        kinds = {k: link_for(n, fitted, k, latency) for k in calibrate.KINDS} if fitted else None
        if kinds and candidate.label() in self.carried:  # its probe's fixed cost holds the transfers, as they ran
            link = Link(bandwidth=1e18, latency=0.0)
            kinds = {k: link for k in kinds}
        rate = self.stage_rates.get(candidate.label(), self.rates[key])
        if self.device.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(self.device)
            return Hardware(name=f"this machine ({n} x {props.name})", device_type="cuda",
                            peak_flops={"fp32": rate, "tf32": rate, "bf16": rate, "fp16": rate},
                            memory_bytes=props.total_memory, devices_per_node=n, intra=link, inter=link,
                            matmul_efficiency=1.0, max_devices=torch.cuda.device_count(), kind_links=kinds,
                            optimizer_seconds_per_parameter=statistics.median(self.updates[n]),
                            notes=f"measured here: one GPU's steps at {self.cfg.precision}; NCCL between processes")
        return Hardware(name=f"this machine ({cores()} cores, {n} process{'es' if n > 1 else ''})",
                        device_type="cpu", peak_flops={"fp32": rate, "bf16": rate, "fp16": rate},
                        memory_bytes=ram_bytes() // n, devices_per_node=n, intra=link, inter=link,
                        matmul_efficiency=1.0, max_devices=n, comm_overlap=0.0, kind_links=kinds,
                        optimizer_seconds_per_parameter=statistics.median(self.updates[n]),
                        stage_seconds=self.stage_times.get(candidate.label()),
                        notes=f"measured here: {threads_for(n)} threads per rank; gloo over loopback")

    def predict(self, candidate: Candidate, global_batch: int, dtype: str = "fp32") -> Prediction:
        hw = self.hardware(candidate, global_batch)
        extra = self._gpu_memory(candidate, global_batch, hw, dtype) if self.device.type == "cuda" else None
        return predict_step(self.stats, hw, candidate, global_batch, dtype, nodes=1,
                            fixed_seconds=self.fixed.get(candidate.label(), 0.0) + (self.loop or 0.0),
                            extra_memory=extra)


def in_order(ranks: list[dict]) -> list[tuple[int, int]]:
    """A pipeline's stages (first layer, end layer) in the model's order, from its ranks' (``stage_shares``)."""
    return sorted(s for r in ranks for s in r["stages"])


def full_size(shape: dict | None) -> bool:
    """Whether a probe of this shape has the real model's count of what its strategy's fixed cost grows with
    (FSDP's blocks, tensor parallelism's pairs): its fixed cost is then taken as measured."""
    return bool(shape) and ("parameters" in shape or "pairs" in shape)


def per_unit_line(points: list[tuple[float, float]], count: float) -> float:
    """A fixed cost at ``count`` units from probes' (units, seconds): with one probe, in proportion (all of it
    per unit); with two, the line ``once + per_unit * units`` through them, its slope kept >= 0 and read from
    the probe nearest ``count``, never below 0."""
    if len(points) == 1:
        units, seconds = points[0]
        return seconds * count / max(units, 1e-9)
    (u1, s1), (u2, s2) = sorted(points)
    slope = max(0.0, (s2 - s1) / (u2 - u1)) if u2 > u1 else 0.0
    units, seconds = min(points, key=lambda p: abs(p[0] - count))
    return max(0.0, seconds + slope * (count - units))


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:200]


def resident_bytes(workload, train_samples: int | None = None) -> float:
    """Bytes of the data the memory loader keeps on the device: every split, prepared whole (of the training
    split, its first ``train_samples`` only when given, as a run with ``--limit`` keeps it)."""
    total = 0.0
    for split, kept in ((workload.train, train_samples), (workload.test, None)):
        if split is None or not len(split):
            continue
        one = split.head(1)
        x, y = one.prepare(one.inputs), one.targets
        total += min(len(split), kept or len(split)) * (x.numel() * x.element_size() + y.numel() * y.element_size())
    return total


def with_microbatches(candidate: Candidate, microbatches: int | None) -> Candidate:
    return replace(candidate, microbatches=microbatches)
