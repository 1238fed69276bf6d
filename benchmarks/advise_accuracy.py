"""How good are advise's predictions here? Every candidate layout it can run on this machine is predicted,
then run for real (a short trial, measured after warm-up), and the two are compared.

    python benchmarks/advise_accuracy.py                          # mnist, the digits CNN, the tiny LM; up to 2 processes
    python benchmarks/advise_accuracy.py --workloads mnist --nproc-max 2
    python benchmarks/advise_accuracy.py --extrapolate            # calibrate with 1 process, predict 2
    python benchmarks/advise_accuracy.py --extrapolate --nproc-max 4 --workloads mnist   # and 4, reported apart
    python benchmarks/advise_accuracy.py --device cuda --batch-sizes 64 512 --precisions fp32 bf16   # on a GPU

Prints, per workload, predicted vs measured step time and memory per rank with their errors, and how well
each trial knows its own median (``±meas``: two standard errors, from its steps' interquartile range). The measured
memory is the tensor bytes each trial's largest rank held (parameters, gradients, optimizer state and the
peak of activations saved for backward, counted with saved-tensor hooks: ``measure.TensorBytes``); on a CPU
nothing counts FSDP's transiently gathered blocks or a pipeline's receive buffers, so the prediction compared
is the same parts (its ``buffers`` left out; ``parallelnn advise`` shows them). Then the median and p90 of the step-time errors, the
memory errors, Kendall's tau between the predicted and the measured ranking, and whether advise's recommendation (its
own choice of at most 8 trials) is within 5% of the best candidate measured here. Timings on a shared
machine move: run it when the machine is quiet, and read the ratios, not single figures.

On a GPU (``--device cuda``) the measured memory is ``torch.cuda.max_memory_allocated`` over the whole trial
run (the record's ``peak_memory_bytes``: model, optimizer, batch, activations, the runtime's transients, the
data the memory loader keeps on the device, the final evaluation), against advise's whole estimate per rank
with its resident data taken at the trial's training split. With one GPU the only candidate is the single
process, so the rows are the workloads at each ``--batch-sizes`` x ``--precisions``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallelnn.advise import advisor, trials  # noqa: E402
from parallelnn.advise.costs import ModelStats  # noqa: E402
from parallelnn.advise.local import Machine, resident_bytes  # noqa: E402
from parallelnn.advise.stats import model_stats  # noqa: E402
from parallelnn.config import RunConfig  # noqa: E402
from parallelnn.runner import build_workload, check  # noqa: E402

DEFAULT = ["mnist", "examples/digits_cnn.py:build", "examples/tiny_lm.py:build"]


def kendall_tau(a: list[float], b: list[float]) -> float:
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    score = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return score / len(pairs) if pairs else float("nan")


def evaluate(name: str, nproc_max: int, concurrent: bool, out: Path,
             **options) -> tuple[list[advisor.Row], float | None]:
    cfg = check(RunConfig(workload=name, quiet=True, **options))
    cfg, workload = build_workload(cfg, torch.device("cpu"), lambda m: None)
    stats = ModelStats(**model_stats(workload))
    machine = Machine(workload, cfg, stats, concurrent=concurrent)
    rows = advisor.candidates(nproc_max, cfg, workload)
    advisor.predict_all(rows, machine, cfg)
    for row in rows:
        if row.feasible:
            row.trial = trials.run_trial(cfg, row.candidate, out / advisor.slug(row.candidate), 180,
                                         len(workload.train), row.prediction.step_seconds)
            if on_gpu(cfg):  # the trial keeps only its own training samples on the device
                limit = trials.trial_config(cfg, row.candidate, out, len(workload.train),
                                            trials.steps_to_measure(row.prediction.step_seconds)).limit
                fewer = resident_bytes(workload, limit) - resident_bytes(workload)
                row.prediction.memory_breakdown["data"] += fewer
                row.prediction.memory_bytes_per_rank += fewer
    if on_gpu(cfg):
        return rows, None
    # The noise floor: the first trial (the single process) once more, after all the others.
    first = next(r for r in rows if r.trial)
    again = trials.run_trial(cfg, first.candidate, out / "again", 180, len(workload.train),
                             first.prediction.step_seconds)
    return rows, again.step_seconds


def by_world(rows: list[advisor.Row]) -> dict[int, list[advisor.Row]]:
    """{0: the rows of up to as many processes as cores, then each larger process count: its rows}, the single
    process (the trials' reference, and a recommendation's) in every group."""
    cores = os.cpu_count() or 1
    single = [r for r in rows if r.candidate.layout.world_size == 1]
    groups: dict[int, list[advisor.Row]] = {0: []}
    for r in rows:
        world = r.candidate.layout.world_size
        if world > 1:
            groups.setdefault(world if world > cores else 0, []).append(r)
    return {w: single + g for w, g in sorted(groups.items())}


def on_gpu(cfg) -> bool:
    return cfg.device == "cuda"


def report(name: str, rows: list[advisor.Row], again: float | None, count: int) -> dict:
    measured = [r for r in rows if r.trial and r.trial.step_seconds]
    print(f"\n{name}: {len(measured)} candidates measured of {len(rows)}")
    first = next(r for r in rows if r.trial)
    if first.trial.step_seconds and again:
        print(f"  noise floor: {first.candidate.label()} measured {first.trial.step_seconds * 1e3:.2f} ms first and "
              f"{again * 1e3:.2f} ms after the others ({again / first.trial.step_seconds - 1:+.0%})")
    print(f"  {'candidate':36} {'pred ms':>8} {'meas ms':>8} {'±meas':>6} {'err':>6}   {'pred MB':>8} {'meas MB':>8} "
          f"{'err':>6}")
    time_errors, memory_errors, beyond, known = [], [], 0, []
    for r in sorted(measured, key=lambda r: r.trial.step_seconds):
        p, t = r.prediction, r.trial
        err = (p.step_seconds - t.step_seconds) / t.step_seconds
        time_errors.append(abs(err))
        noise = 2 * trials.median_uncertainty(t.step_iqr, t.steps)  # two standard errors of the trial's median
        known.append(noise)
        beyond += abs(err) > noise
        if t.peak_memory_bytes and "runtime" in p.memory_breakdown:  # a GPU: the allocator's peak, all of it
            counted, seen = p.memory_bytes_per_rank, t.peak_memory_bytes
        else:
            # the largest rank by what the count sees (pipeline stages differ: not always the largest in all)
            counted = max(sum(r.values()) - r.get("buffers", 0.0) for r in p.memory_per_rank or [p.memory_breakdown])
            seen = t.tensor_bytes
        mem = (counted - seen) / seen if seen else float("nan")
        memory_errors.append((r.candidate.strategy, mem))
        print(f"  {r.candidate.label()[:36]:36} {p.step_seconds * 1e3:8.2f} {t.step_seconds * 1e3:8.2f} {noise:6.0%} "
              f"{err:+6.0%}   "
              f"{counted / 1e6:8.2f} {(seen or 0) / 1e6:8.2f} {mem:+6.0%}")
    for r in rows:
        if r.trial and not r.trial.step_seconds:
            print(f"  {r.candidate.label()[:36]:36} trial failed: {r.trial.reason}")
    if len(measured) == 1 and "runtime" in measured[0].prediction.memory_breakdown:
        parts = measured[0].prediction.memory_breakdown
        print("  predicted parts, MB: " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in parts.items()))
    tau = kendall_tau([r.prediction.step_seconds for r in measured], [r.trial.step_seconds for r in measured])
    best = min(r.trial.step_seconds for r in measured)
    chosen = advisor.choose_trials(rows, count, budget=1e9)
    picked = min((r.trial.step_seconds for r in chosen if r.trial and r.trial.step_seconds), default=float("inf"))
    print(f"  ±meas: two standard errors of a trial's median step (0.93 IQR/sqrt(n)), median "
          f"{statistics.median(known):.0%}; {beyond} of {len(measured)} errors are larger than that")
    return {"time": time_errors, "memory": memory_errors, "tau": tau, "recommendation_gap": picked / best - 1}


def summary(results: dict[str, dict]) -> None:
    errors = sorted(e for r in results.values() for e in r["time"])
    if not errors:
        return
    p90 = errors[min(len(errors) - 1, int(round(0.9 * (len(errors) - 1))))]
    print(f"\nstep time: median error {statistics.median(errors):.1%}, p90 {p90:.1%} over {len(errors)} candidates")
    memory = [abs(m) for r in results.values() for _, m in r["memory"] if m == m]
    under = [m for r in results.values() for _, m in r["memory"] if m == m and m < -0.05]
    print(f"memory: median error {statistics.median(memory):.1%}, worst {max(memory):.1%}, "
          f"{len(under)} more than 5% under")
    for name, r in results.items():
        print(f"{name}: Kendall tau {r['tau']:.2f}; advise's pick {r['recommendation_gap']:+.1%} from the best measured")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=DEFAULT)
    p.add_argument("--nproc-max", type=int, default=2)
    p.add_argument("--trials", type=int, default=8, help="advise's trial count, for the recommendation check")
    p.add_argument("--extrapolate", action="store_true",
                   help="calibrate with one process only (rates at each thread count, the collectives between "
                        "thread-ranks, the strategies' own code under a fake process group)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-sizes", type=int, nargs="+", help="each workload at each of these batch sizes")
    p.add_argument("--precisions", nargs="+", default=["fp32"], help="and at each of these precisions")
    args = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in args.workloads:
            for batch in args.batch_sizes or [None]:
                for precision in args.precisions:
                    options = {"device": args.device, "precision": precision,
                               **({"batch_size": batch} if batch else {})}
                    label = " ".join([name, *(f"{k}={v}" for k, v in options.items() if k != "device")])
                    rows, again = evaluate(name, args.nproc_max, not args.extrapolate,
                                           Path(tmp) / f"{Path(name).stem}-{batch}-{precision}", **options)
                    for world, group in by_world(rows).items():  # world 0: up to as many processes as cores
                        results[label + (f" nproc={world}" if world else "")] = report(
                            f"{label}, {world} processes on {os.cpu_count()} cores" if world else label,
                            group, again, args.trials)
    summary({k: v for k, v in results.items() if "nproc=" not in k})
    beyond = {k: v for k, v in results.items() if "nproc=" in k}
    if beyond:
        print(f"\nmore processes than cores ({os.cpu_count()}), reported apart:")
        summary(beyond)
    print(f"({time.time() - t0:.0f} s; calibration {'with one process' if args.extrapolate else 'as advise does'})")


if __name__ == "__main__":
    main()
