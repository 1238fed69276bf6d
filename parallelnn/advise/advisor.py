"""``parallelnn advise``: which strategy pays off for this model, here — estimated, predicted, then tried.

    parallelnn advise mnist                               # every candidate up to the cores, 8 trials at most
    parallelnn advise examples/tiny_lm.py:build --nproc-max 2 --budget-seconds 60 --json
    parallelnn advise gpt2 --predict 8xH100-nvlink        # also: predicted curves on hardware you do not have

1. The model is measured once (parameters, FLOPs, activations, layers: :mod:`.stats`).
2. Every candidate layout (strategy x degrees x microbatches, up to ``--nproc-max`` processes) is checked
   the way ``run`` checks it, its memory per rank estimated and its step time predicted by the cost model
   (:mod:`.costs`, each strategy's own ``cost``) on this machine as calibrated (:mod:`.local`).
3. The single process and the most promising candidates are tried: short real runs, measured after
   warm-up, within ``--budget-seconds`` (:mod:`.trials`). A failing trial is noted and skipped.
4. The answer: a ranked table, one sentence with its reason in numbers, ``OUT/advice.json`` and a plot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from parallelnn import parallel
from parallelnn.advise import trials as trials_
from parallelnn.advise.costs import Candidate, ModelStats, Prediction
from parallelnn.advise.local import Machine, cores
from parallelnn.advise.stats import model_stats
from parallelnn.errors import UserError

MAX_TRIALS = 8
# A trial's start-up before its first step: one process, or a torchrun job of several.
START_SECONDS, JOB_START_SECONDS = 4.0, 8.0
# Options advise chooses itself (the layout: strategy, processes and every strategy's own options) or that
# trials do not use: giving them would contradict the advice.
CHOSEN = ("strategy", "nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_timeout", "max_restarts", "resume",
          "checkpoint_every", "checkpoint_dir", "keep", "baseline", "eval_every", "tensorboard",
          *sorted(parallel.strategy_options()))
ADVICE = "advice.json"


def add_parser(verbs) -> None:
    from parallelnn.options import add_run_options

    p = verbs.add_parser("advise", help="predict, try and recommend a strategy for a workload",
                         description="Estimate memory, predict step time for every strategy and layout, try the most "
                                     "promising, and recommend one (writes OUT/advice.json).")
    add_run_options(p, skip=CHOSEN)
    g = p.add_argument_group("advice")
    g.add_argument("--nproc-max", type=int, metavar="N", help="largest process count to consider (default: the cores)")
    g.add_argument("--budget-seconds", type=float, default=100.0, metavar="S",
                   help="wall-clock budget of the trials (default: 100)")
    g.add_argument("--trials", type=int, default=MAX_TRIALS, metavar="K",
                   help=f"short measured runs at most, the single process included (default and most: {MAX_TRIALS}); "
                        "0 with --predict: prediction only, the model built on the meta device (no memory)")
    g.add_argument("--predict", metavar="HW", help="also predict on other hardware: a preset (8xH100-nvlink, "
                   "2x8xH100-ib, 8xA100-pcie, 4x8xV100-ib1) or figures 'gpus_per_node=8,bf16_tflops=989,...'")
    g.add_argument("--json", action="store_true", help="print the advice as JSON")
    p.set_defaults(handler=cmd_advise)


@dataclass
class Row:
    """One candidate: its prediction, whether it can run here and why not, and its trial if it had one."""

    candidate: Candidate
    prediction: Prediction | None
    reason: str | None = None
    trial: trials_.Trial | None = None

    @property
    def feasible(self) -> bool:
        return self.reason is None

    @property
    def measured(self) -> float | None:
        return self.trial.step_seconds if self.trial else None


def _settings(ns: argparse.Namespace, cfg) -> tuple[int, float, int]:
    nproc_max = ns.nproc_max if ns.nproc_max is not None else (
        torch.cuda.device_count() if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else cores())
    if nproc_max < 1:
        raise UserError(f"--nproc-max {nproc_max}: at least one process is needed")
    if cfg.device == "cuda" and nproc_max > torch.cuda.device_count():
        raise UserError(f"--nproc-max {nproc_max}: this machine has {torch.cuda.device_count()} GPUs")
    if nproc_max > 4 * cores():
        raise UserError(f"--nproc-max {nproc_max}: {nproc_max} processes on {cores()} cores cannot tell anything "
                        f"about speed (at most {4 * cores()})")
    if not (1 if not ns.predict else 0) <= ns.trials <= MAX_TRIALS:
        raise UserError(f"--trials {ns.trials}: between 1 and {MAX_TRIALS} (0 only with --predict)")
    if not ns.budget_seconds > 0:
        raise UserError(f"--budget-seconds {ns.budget_seconds}: must be positive")
    if ns.budget_seconds < START_SECONDS:  # refused before calibrating: no prediction can make it enough
        raise UserError(f"--budget-seconds {ns.budget_seconds:g} is too small for one trial: the single process needs "
                        f"{START_SECONDS:g} s to start, and its steps besides")
    return nproc_max, ns.budget_seconds, ns.trials


def _out_dir(cfg) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or Path("runs") / f"advise-{stamp}-{Path(cfg.workload).stem.split(':')[0]}")
    if (out / ADVICE).exists() and not cfg.overwrite:
        raise UserError(f"--out {out} already holds advice; choose another --out or add --overwrite")
    from parallelnn.record import check_writable_place

    check_writable_place(out, "--out")
    return out


def candidates(nproc_max: int, cfg, workload) -> list[Row]:
    """Every layout up to ``nproc_max`` processes, each checked as ``run`` would check it."""
    from parallelnn.advise.predict import candidates as layouts

    rows = []
    for n in range(1, nproc_max + 1):
        for cand in layouts(n, None, cfg.batch_size):
            if n == 1 and parallel.get(cand.strategy).needs_process_group:
                continue  # one process of a distributed strategy computes what the single process does
            opts = trials_.run_options(cand)
            try:
                strategy, layout = parallel.resolve(replace(cfg, **opts))
                strategy.check(replace(cfg, **opts), workload, layout)
                reason = None
            except UserError as err:
                reason = str(err)
            rows.append(Row(cand, None, reason))
    return rows


def predict_all(rows: list[Row], machine: Machine, cfg) -> None:
    dtype = "fp32" if cfg.precision == "fp32" else cfg.precision
    machine.calibrate([r.candidate for r in rows if r.feasible], cfg.batch_size)
    for row in rows:
        if row.feasible:
            row.prediction = machine.predict(row.candidate, cfg.batch_size, dtype)
            if not row.prediction.feasible:
                row.reason = row.prediction.reason


def trial_seconds(row: Row, n: int) -> float:
    """Wall-clock estimate of a trial: start-up (one process, or a torchrun job) and its steps."""
    predicted = row.prediction.step_seconds if row.prediction else 0.1
    steps = trials_.WARMUP_STEPS + trials_.steps_to_measure(predicted)
    return (START_SECONDS if n == 1 else JOB_START_SECONDS) + steps * 2 * predicted


def choose_trials(rows: list[Row], count: int, budget: float) -> list[Row]:
    """The single process first, then the fastest predicted of each other strategy, then the next fastest."""
    ok = sorted((r for r in rows if r.feasible), key=lambda r: r.prediction.step_seconds)
    if not ok:
        return []
    reference = next((r for r in ok if r.candidate.layout.world_size == 1), ok[0])
    need = trial_seconds(reference, 1)
    if budget < need:
        raise UserError(f"--budget-seconds {budget:g} is too small for one trial: the single process needs about "
                        f"{need:.0f} s here")
    chosen, seen = [reference], {reference.candidate.strategy}
    for r in ok:  # the best of each strategy first, so that every strategy is measured once
        if len(chosen) < count and r.candidate.strategy not in seen:
            chosen.append(r)
            seen.add(r.candidate.strategy)
    chosen += [r for r in ok if r not in chosen][:max(0, count - len(chosen))]
    return chosen


def run_trials(chosen: list[Row], cfg, out: Path, budget: float, train_samples: int, log) -> None:
    start = time.monotonic()
    for i, row in enumerate(chosen):
        n = row.candidate.layout.world_size
        left = budget - (time.monotonic() - start)
        if i and left < trial_seconds(row, n):
            log(f"trial {row.candidate.label()}: not run, the budget's {left:.0f} s left are too few")
            continue
        timeout = max(left, trial_seconds(row, n) * 3) if i == 0 else left
        row.trial = trials_.run_trial(cfg, row.candidate, out / "trials" / slug(row.candidate), timeout,
                                      train_samples, row.prediction.step_seconds)
        t = row.trial
        log(f"trial {row.candidate.label()}: " + (f"{t.samples_per_second:,.0f} samples/s ({t.step_seconds * 1e3:.1f} ms "
            f"a step; predicted {row.prediction.step_seconds * 1e3:.1f} ms)" if t.step_seconds else f"{t.reason}"))


def slug(c: Candidate) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", c.label().lower()).strip("-")


def meta_stats(cfg) -> ModelStats:
    """The model's statistics without building it: its factory called on the meta device (no memory), for
    models larger than this machine holds."""
    from torch import nn

    from parallelnn import workloads
    from parallelnn.advise.predict import stats_from_meta
    from parallelnn.workload import to_split

    made = workloads.builder(cfg.workload)(cfg, torch.device("cpu"), lambda m: None)
    if isinstance(made.model, nn.Module) or not callable(made.model):
        raise UserError("--trials 0 builds the model on the meta device: give Workload(model=...) a function that "
                        "returns the model, not the model itself")
    sample = to_split(made.train, "train", made.columns).head(1)
    x = sample.prepare(sample.inputs)
    return stats_from_meta(made.model, tuple(x.shape), input_dtype=x.dtype, blocks=made.blocks)


def cmd_advise(ns: argparse.Namespace) -> int:
    from parallelnn.options import config_from_args
    from parallelnn.runner import build_workload, check

    cfg = check(config_from_args(ns))
    nproc_max, budget, count = _settings(ns, cfg)
    hardware = None
    if ns.predict:
        from parallelnn.advise.hardware import parse_hardware

        hardware = parse_hardware(ns.predict)
    out = _out_dir(cfg)
    log = (lambda m: None) if (cfg.quiet or ns.json) else (lambda m: print(m, flush=True))
    if ns.trials == 0:
        from parallelnn.advise.answer import predict_only

        return predict_only(meta_stats(cfg), cfg, out, hardware, ns.json, log)
    t0 = time.monotonic()
    cfg, workload = build_workload(cfg, torch.device("cpu"), log=lambda m: None)
    stats = ModelStats(**model_stats(workload))
    machine = Machine(workload, cfg, stats)
    rows = candidates(nproc_max, cfg, workload)
    where = f"{torch.cuda.device_count()} GPUs" if machine.device.type == "cuda" else f"{cores()} cores"
    log(f"advise {cfg.workload}: {len(rows)} candidate layouts up to {nproc_max} processes on {where}; "
        f"{stats.parameters:,} parameters, {stats.flops_per_sample:,.4g} FLOP a sample")
    predict_all(rows, machine, cfg)
    for problem in machine.problems:
        log(f"warning: {problem}")
    chosen = choose_trials(rows, count, budget)
    run_trials(chosen, replace(cfg, out=None), out, budget - (time.monotonic() - t0), len(workload.train), log)
    from parallelnn.advise.answer import write_answer

    return write_answer(rows, cfg, stats, machine, out, hardware, ns.json, log)

