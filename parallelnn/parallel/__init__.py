"""Strategies: how a model is spread over processes. One module each, one :class:`Strategy` object each.

Every module in this package that defines ``STRATEGY = Strategy(...)`` is a strategy: the registry is
discovered from the package's modules, so adding a file adds a strategy, and nothing outside this
package spells a strategy's name. Config validation, ``bench scaling``'s plan, report ordering and the
CLI's choices all ask :func:`names`, :func:`get` and the object itself.

A strategy says, for a world size and a config, its :class:`Layout` (the degrees it uses: data-,
tensor- and pipeline-parallel), whether a layout can work for a workload (``check``, before any
process starts, one-line reason) and how to ``apply`` itself: wrap the model with the torch.distributed
building block (DDP, FSDP2 ``fully_shard``, ``pipelining``, DTensor ``parallelize_module``) on a
``DeviceMesh`` and return the :class:`~parallelnn.parallel.engine.Engine` the trainer drives.

Strategy modules import torch.distributed's heavy parts inside ``apply`` only: discovering the
registry (every CLI call does) must stay cheap.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parallelnn.config import RunConfig, option_name
from parallelnn.errors import UserError

if TYPE_CHECKING:
    from parallelnn.parallel.engine import Engine
    from parallelnn.workload import Workload


@dataclass(frozen=True)
class Layout:
    """The degrees of a job: how its ranks divide the work. ``dp * tp * pp`` is the world size.

    dp: data-parallel ranks, each training on its share of every global batch (replicas or shards);
    tp: tensor-parallel ranks sharing each layer's weights; pp: pipeline stages (ranks) per model copy.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def mesh(self) -> dict[str, int]:
        """The mesh dimensions with more than one rank, outermost first: {'dp': 2, 'tp': 2} ({'dp': 1} alone)."""
        return {k: v for k, v in (("dp", self.dp), ("pp", self.pp), ("tp", self.tp)) if v > 1} or {"dp": self.dp}


def no_check(cfg: RunConfig, workload: Workload, layout: Layout) -> None:
    """The strategy applies to any workload."""


@dataclass(frozen=True)
class CostModel:
    """How ``parallelnn advise`` predicts a strategy without running it (built from the blocks of
    :mod:`parallelnn.advise.costs`, imported inside the functions: discovering the registry stays cheap)."""

    #: (world size, global batch) -> the settings worth predicting at that size: (layout, microbatches or
    #: None, pipeline schedule or None) each.
    candidates: Callable[[int, int], list[tuple[Layout, int | None, str | None]]]
    #: ``costs.CostInputs`` -> ``costs.StepCost``: one step's compute, communication, bubble and memory per rank.
    step: Callable[[Any], Any]
    #: ``costs.ModelStats`` -> how many times a step pays the strategy's fixed costs (hooks, collective calls):
    #: advise times them on probe models of two sizes and reads them at the real model's count along the line
    #: through the two (a part paid once a step, a part per unit). None: once a step, whatever the model.
    fixed_units: Callable[[Any], float] | None = None
    #: True: what the strategy moves each step is the parameters (FSDP's gathers and reduce-scatters), so advise's
    #: probe holds the real blocks' parameter counts and its measured fixed cost includes moving those bytes
    #: under the real load; the links then carry none of its collectives (no byte counted twice).
    probe_real_parameters: bool = False
    #: True: what it moves each step is activations at its sharded Linear pairs (tensor parallelism's all-reduces):
    #: advise's probe has the plan's pairs with their real input and output widths (next to no compute between),
    #: so its fixed cost includes those all-reduces as they run under load; the links then carry none of them.
    probe_real_activations: bool = False


@dataclass(frozen=True)
class Strategy:
    """One way of spreading training over processes; each module of this package defines one."""

    name: str
    #: One line for ``--help`` and tables.
    summary: str
    #: (cfg, world size) -> the layout; raises UserError when this strategy cannot use that many ranks
    #: (e.g. a hybrid mesh whose product is not the world size).
    layout: Callable[[RunConfig, int], Layout]
    #: (model, workload, cfg, ctx, layout, total optimizer steps) -> the Engine the trainer drives.
    apply: Callable[..., Engine]
    #: Refuses a layout that cannot work for this workload, before any process starts (UserError).
    check: Callable[[RunConfig, Workload, Layout], None] = no_check
    #: Fewest processes that make sense (pipeline and tensor need two to split anything).
    min_nproc: int = 1
    #: Most processes (single: 1); None for no limit.
    max_nproc: int | None = None
    #: Config fields only this strategy reads: setting one for another strategy is an error.
    options: tuple[str, ...] = ()
    #: Position in tables, plots and help (then the name).
    order: int = 50
    #: Layout -> the run options that make it (the inverse of ``layout``; e.g. hybrid's --mesh), for advise's
    #: trials.
    run_options: Callable[[Layout], dict[str, Any]] = lambda layout: {}
    #: nproc -> extra ``run`` arguments for ``bench scaling`` at that size, or None to leave it out.
    bench_args: Callable[[int], list[str] | None] | None = None
    #: How ``advise`` predicts this strategy's memory and step time; None leaves it out of predictions.
    cost: CostModel | None = None

    @property
    def needs_process_group(self) -> bool:
        """Whether even one process of this strategy runs in a (one-rank) process group."""
        return self.max_nproc != 1

    def nproc_problem(self, world_size: int) -> str | None:
        """Why this strategy cannot run ``world_size`` processes, or None."""
        if world_size < self.min_nproc:
            return f"--strategy {self.name} needs at least {self.min_nproc} processes (--nproc {self.min_nproc})"
        if self.max_nproc is not None and world_size > self.max_nproc:
            others = ", ".join(n for n in names() if (get(n).max_nproc or world_size) >= world_size)
            return (f"--strategy {self.name} runs at most {self.max_nproc} process"
                    f"{'es' if self.max_nproc > 1 else ''}; for {world_size} choose {others}")
        return None

    def bench_variants(self, nproc: int) -> list[str] | None:
        """The extra arguments for a ``bench scaling`` run at ``nproc``, or None when it does not apply."""
        if self.nproc_problem(nproc):
            return None
        return self.bench_args(nproc) if self.bench_args is not None else []


@functools.cache
def registry() -> dict[str, Strategy]:
    """Every strategy of this package, in table order."""
    found: list[Strategy] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        strategy = getattr(module, "STRATEGY", None)
        if isinstance(strategy, Strategy):
            found.append(strategy)
    return {s.name: s for s in sorted(found, key=lambda s: (s.order, s.name))}


def names() -> list[str]:
    return list(registry())


def get(name: str) -> Strategy:
    try:
        return registry()[name]
    except KeyError:
        raise UserError(f"unknown strategy '{name}': choose one of {', '.join(names())}") from None


def order(name: Any) -> int:
    """Position of a strategy's name in tables (unknown names last)."""
    known = names()
    return known.index(name) if name in known else len(known)


def strategy_options() -> set[str]:
    return {o for s in registry().values() for o in s.options}


def resolve(cfg: RunConfig, world_size: int | None = None) -> tuple[Strategy, Layout]:
    """The strategy ``cfg`` names and its layout for the job, checked as far as it can be without the
    workload: the process count, the degrees, and options given to a strategy that does not read them."""
    strategy = get(cfg.strategy)
    world_size = cfg.world_size if world_size is None else world_size
    problem = strategy.nproc_problem(world_size)
    if problem:
        raise UserError(problem)
    defaults = {f.name: f.default for f in RunConfig.__dataclass_fields__.values()}
    for name in sorted(strategy_options() - set(strategy.options)):
        if getattr(cfg, name) != defaults[name]:
            users = [s.name for s in registry().values() if name in s.options]
            raise UserError(f"{option_name(name)} applies to --strategy {' or '.join(users)} only")
    layout = strategy.layout(cfg, world_size)
    if layout.world_size != world_size:  # a strategy's own bug, not the user's
        raise AssertionError(f"{strategy.name}: layout {layout} does not cover {world_size} ranks")
    return strategy, layout


# -- layouts shared by several strategies ----------------------------------------------------------------

def data_parallel(cfg: RunConfig, world_size: int) -> Layout:
    """Every rank a data-parallel rank (ddp, fsdp)."""
    return Layout(dp=world_size)


def parse_mesh(text: str | None) -> tuple[int, int]:
    """``--mesh AxB`` -> (A, B), positive integers."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"--mesh '{text}' is not of the form AxB with positive integers, e.g. 2x2")
    return int(m.group(1)), int(m.group(2))


def parse_split(text: str) -> list[int]:
    """``--split 4,7`` -> [4, 7]: increasing layer indices where pipeline stages 2.. begin."""
    try:
        points = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--split '{text}' must be comma-separated layer indices, e.g. 4,7") from None
    if not points or points != sorted(set(points)) or points[0] < 1:
        raise UserError(f"--split '{text}' must be increasing layer indices of at least 1")
    return points
