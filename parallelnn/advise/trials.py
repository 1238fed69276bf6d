"""Trials: short real runs of the most promising candidates, each an ordinary ``parallelnn run`` in its own
process group, measured after warm-up. A trial that fails or hangs is recorded with its reason and skipped;
it never stops the advice."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallelnn import parallel
from parallelnn.advise.costs import Candidate
from parallelnn.config import RunConfig, config_to_argv

# Not measured: the first steps pay for allocation, kernel choice and pipeline shape inference, and every run
# profiles steps 2-4 of a multi-rank job (the record's comm_share) and counts tensors on steps 2-3; each rank
# then summarises its profile at its own pace, so step 5 waits for the slowest (3-6x a pipeline's usual step
# here).
WARMUP_STEPS = 5
# Measured: at least MEASURED_STEPS steps and, as predicted, MEASURED_SECONDS of them (at most
# MOST_MEASURED_STEPS). Two ranks sharing two cores vary 20-30% from one step to the next here: the median of
# 12 such steps moves by ~8% from one trial to another, of a second's worth by ~4%.
MEASURED_STEPS = 12
MEASURED_SECONDS = 1.0
MOST_MEASURED_STEPS = 120


def steps_to_measure(predicted_step_seconds: float | None) -> int:
    """Steps a trial measures after warm-up, for a candidate predicted to take ``predicted_step_seconds``."""
    if not predicted_step_seconds or predicted_step_seconds <= 0:
        return MEASURED_STEPS
    wanted = math.ceil(MEASURED_SECONDS / predicted_step_seconds)
    return max(MEASURED_STEPS, min(MOST_MEASURED_STEPS, wanted))


def run_options(candidate: Candidate) -> dict[str, Any]:
    """The ``run`` options that make ``candidate``'s layout (each strategy says its own)."""
    strategy = parallel.get(candidate.strategy)
    opts: dict[str, Any] = {"strategy": candidate.strategy, "nproc": candidate.layout.world_size,
                            **strategy.run_options(candidate.layout)}
    if candidate.microbatches and "microbatches" in strategy.options:
        opts["microbatches"] = candidate.microbatches
    if candidate.schedule and "schedule" in strategy.options:
        opts["schedule"] = candidate.schedule
    return opts


@dataclass
class Trial:
    candidate: Candidate
    command: str
    step_seconds: float | None = None  # median of the measured steps
    steps: int = 0  # how many were measured
    step_iqr: float | None = None  # their interquartile range, relative to the median
    samples_per_second: float | None = None
    tensor_bytes: int | None = None  # largest rank's parameters + gradients + optimizer + saved activations
    peak_memory_bytes: int | None = None
    startup_seconds: float | None = None
    wall_seconds: float = 0.0
    reason: str | None = None  # why it did not give a measurement


def trial_config(cfg: RunConfig, candidate: Candidate, out: Path, train_samples: int,
                 measured: int = MEASURED_STEPS) -> RunConfig:
    """The run of a trial: enough samples for the warm-up and ``measured`` steps (more epochs when the training
    split is smaller than that), every step logged, nothing else."""
    steps = WARMUP_STEPS + measured
    limit = min(cfg.batch_size * steps, train_samples)
    epochs = math.ceil(steps / math.ceil(limit / cfg.batch_size))
    return dataclasses.replace(cfg, **run_options(candidate), limit=limit, epochs=epochs, log_every=1,
                               quiet=True, out=str(out), overwrite=True, checkpoint_every=None, resume=None,
                               eval_every=None, baseline=None, tensorboard=False, eval_pass_at_k=None)


def measured_steps(out: Path) -> list[float]:
    """Seconds of each step after warm-up, from the run's step events (interval throughput per step)."""
    seconds = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "step" and event.get("train/global_step", 0) > WARMUP_STEPS:
            rate = event.get("train/samples_per_second")
            if rate:
                seconds.append(1.0 / rate)  # per sample; times the batch below
    return seconds


def relative_iqr(values: list[float]) -> float:
    """Interquartile range over the median: how much a trial's steps vary (0 for fewer than 4)."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def median_uncertainty(iqr: float | None, steps: int | None) -> float:
    """Relative standard error of the median of ``steps`` steps whose relative interquartile range is ``iqr``:
    about 0.93 IQR / sqrt(n) (for roughly normal steps, the median's error is 1.25 sigma / sqrt(n) and the IQR
    is 1.35 sigma)."""
    return 0.93 * (iqr or 0.0) / math.sqrt(steps) if steps else 0.0


def run_trial(cfg: RunConfig, candidate: Candidate, out: Path, timeout: float, train_samples: int,
              predicted_step_seconds: float | None = None) -> Trial:
    """``candidate`` run as a trial in its own processes, measured for :func:`steps_to_measure` steps."""
    tcfg = trial_config(cfg, candidate, out, train_samples, steps_to_measure(predicted_step_seconds))
    argv = ["run", *config_to_argv(tcfg)]
    trial = Trial(candidate, "parallelnn " + " ".join(argv))
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "parallelnn", *argv], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        trial.wall_seconds = time.monotonic() - t0
        trial.reason = f"did not finish within {timeout:.0f}s (hung or too slow); skipped"
        return trial
    trial.wall_seconds = time.monotonic() - t0
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        trial.reason = (lines[-1].removeprefix("parallelnn: error: ") if lines else f"exit status {proc.returncode}")
        return trial
    record = json.loads((out / "record.json").read_text())
    per_sample = measured_steps(out)
    if not per_sample:
        trial.reason = "no step after warm-up was measured"
        return trial
    trial.step_seconds = statistics.median(per_sample) * cfg.batch_size
    trial.steps = len(per_sample)
    trial.step_iqr = relative_iqr(per_sample)
    trial.samples_per_second = cfg.batch_size / trial.step_seconds
    trial.tensor_bytes = record.get("tensor_bytes")
    trial.peak_memory_bytes = record.get("peak_memory_bytes")
    trial.startup_seconds = record.get("startup_seconds")
    return trial
