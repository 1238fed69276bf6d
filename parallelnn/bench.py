"""``parallelnn bench``: tables of runs, each run a normal run with its own record, plus a comparison.

* ``bench seed``: the study's six rows (Iris baseline, Iris with DataLoader workers, Iris on MPS,
  MNIST baseline, MNIST on MPS, MNIST on CUDA) on whatever this machine has, beside the study's own
  figures, plus our fast path (the memory loader) as extra rows.
* ``bench scaling WORKLOAD``: every strategy that applies, at 1..N processes.

Tables go to stdout and, as Markdown and CSV, next to the records; reports (``parallelnn report``)
can be made from the same records afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from parallelnn.config import RunConfig, validate
from parallelnn.errors import UserError
from parallelnn.record import read_record

# The study's figures: (label, workload, device, loader, workers or None for --workers, seconds, accuracy).
SEED_ROWS = (
    ("Iris baseline", "iris", "cpu", "dataloader", 0, 0.28, 1.00),
    ("Iris batch loading + workers", "iris", "cpu", "dataloader", None, 2.73, 1.00),
    ("Iris on MPS", "iris", "mps", "dataloader", 0, 1.61, 1.00),
    ("MNIST baseline", "mnist", "cpu", "dataloader", 0, 316.18, 0.9909),
    ("MNIST on MPS", "mnist", "mps", "dataloader", 0, 72.64, 0.9912),
    ("MNIST on CUDA", "mnist", "cuda", "dataloader", 0, 148.9, 0.9805),
)
# Our fast path, which the study did not have.
FAST_ROWS = (
    ("Iris fast path (ours)", "iris", "cpu", "memory", 0),
    ("MNIST fast path (ours)", "mnist", "cpu", "memory", 0),
    ("MNIST fast path on MPS (ours)", "mnist", "mps", "memory", 0),
    ("MNIST fast path on CUDA (ours)", "mnist", "cuda", "memory", 0),
)
SEED_COLUMNS = ("row", "dataset", "device", "loader", "workers", "epochs", "seeds", "train_seconds",
                "train_seconds_std", "test_accuracy", "test_accuracy_std", "samples_per_second", "mfu",
                "study_seconds", "study_accuracy", "note")
# Seeds per row unless --seeds says: Iris's test split is 30 samples, so one mistake moves accuracy by
# 1/30 = 0.033 and a single run cannot tell 1.00 from 0.97; its runs take a second. MNIST's take minutes.
DEFAULT_SEEDS = {"iris": 5, "mnist": 1}
SEED_MEANS = ("train_seconds", "test_accuracy", "samples_per_second", "mfu")  # averaged over a row's seeds


def device_missing(device: str) -> str | None:
    import torch

    from parallelnn.launch import mps_available

    if device == "cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device on this machine"
    if device == "mps" and not mps_available():
        return "skipped: no Apple MPS on this machine"
    return None


def add_parser(verbs) -> None:
    p = verbs.add_parser("bench", help="run a table of configurations and compare them")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", parser_class=type(p))
    seed = kinds.add_parser("seed", help="the study's six rows beside its figures, plus our fast path")
    seed.add_argument("--epochs", type=int, help="epochs for every row (default: each workload's)")
    seed.add_argument("--limit", type=int, help="use the first N training samples in every row")
    seed.add_argument("--workers", type=int, default=4, help="workers of the 'batch loading + workers' row")
    seed.add_argument("--mnist-data", metavar="DIR", help="MNIST IDX directory (default: the embedded 5k subset)")
    seed.add_argument("--out", metavar="DIR", help="where records and tables go (default runs/bench-seed-<time>)")
    seed.add_argument("--seeds", type=int, metavar="N",
                      help="runs per row, seeds 0..N-1; the table gives mean and standard deviation "
                           f"(default: {DEFAULT_SEEDS['iris']} for Iris rows, {DEFAULT_SEEDS['mnist']} for MNIST)")
    seed.add_argument("--quiet", action="store_true", help="no progress output")
    seed.set_defaults(handler=cmd_seed)
    p.set_defaults(handler=lambda ns: (_ for _ in ()).throw(UserError("bench needs a kind: seed or scaling")))
    add_scaling_parser(kinds)


def bench_dir(out: str | None, kind: str) -> Path:
    if out:
        path = Path(out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"bench-{kind}-{stamp}"
    if path.exists() and any(path.iterdir()):
        raise UserError(f"--out {path} exists and is not empty")
    return path


def slug(label: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def run_rows(rows: list[tuple[str, RunConfig | None, str]], log) -> list[tuple[str, dict | None, str]]:
    """Run each (label, config, note) row whose config is not None; a failing row is noted, not fatal."""
    from parallelnn.runner import execute

    results = []
    for label, cfg, note in rows:
        if cfg is None:
            log(f"{label}: {note}")
            results.append((label, None, note))
            continue
        log(f"{label}: {cfg.command}")
        try:
            record = execute(cfg)
        except UserError as err:
            record, note = None, f"failed: {err}"
            log(f"{label}: {note}")
        results.append((label, record, note))
    return results


def seed_run_dir(out: Path, label: str, seed: int) -> Path:
    """A row's run with ``seed``: seed 0 (every run's default) keeps the row's name, others add theirs."""
    return out / (slug(label) if seed == 0 else f"{slug(label)}-seed{seed}")


def seed_summary(records: list[dict]) -> dict[str, Any]:
    """Means over a row's seeds of :data:`SEED_MEANS`, and standard deviations (n-1) of time and accuracy."""
    import statistics

    row: dict[str, Any] = {"seeds": len(records)}
    for key in SEED_MEANS:
        values = [r[key] for r in records if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
        if key in ("train_seconds", "test_accuracy"):
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def cmd_seed(ns: argparse.Namespace) -> int:
    from parallelnn.report import print_table, write_table

    if ns.seeds is not None and ns.seeds < 1:
        raise UserError(f"--seeds must be positive, got {ns.seeds}")
    out = bench_dir(ns.out, "seed")
    log = (lambda m: None) if ns.quiet else (lambda m: print(m, flush=True))
    rows = []
    specs = [(label, wl, dev, loader, ns.workers if workers is None else workers, sec, acc)
             for label, wl, dev, loader, workers, sec, acc in SEED_ROWS]
    specs += [(label, wl, dev, loader, workers, None, None) for label, wl, dev, loader, workers in FAST_ROWS]
    for label, workload, device, loader, workers, _, _ in specs:
        missing = device_missing(device)
        if missing:
            if (label, workload) in [(r[0], r[1]) for r in FAST_ROWS]:
                continue  # an absent device's fast-path row is just left out
            rows.append((label, None, missing))
            continue
        for seed in range(ns.seeds or DEFAULT_SEEDS[workload]):
            run_dir = seed_run_dir(out, label, seed)
            cfg = RunConfig(workload=workload, device=device, loader=loader, workers=workers, epochs=ns.epochs,
                            limit=ns.limit, data=ns.mnist_data if workload == "mnist" else None, seed=seed,
                            out=str(run_dir), quiet=ns.quiet)
            validate(cfg)
            argv = [workload, "--device", device, "--loader", loader, "--out", cfg.out]
            argv += ["--workers", str(workers)] if workers else []
            argv += ["--epochs", str(ns.epochs)] if ns.epochs else []
            argv += ["--limit", str(ns.limit)] if ns.limit else []
            argv += ["--data", ns.mnist_data] if ns.mnist_data and workload == "mnist" else []
            argv += ["--seed", str(seed)] if seed else []
            rows.append((label, dataclasses.replace(cfg, command="parallelnn run " + " ".join(argv)), ""))
    results = run_rows(rows, log)
    study = {s[0]: (s[5], s[6]) for s in specs}
    by_label: dict[str, list[tuple[dict | None, str]]] = {}
    for label, record, note in results:
        by_label.setdefault(label, []).append((record, note))
    table = []
    for label, runs in by_label.items():
        study_s, study_acc = study.get(label, (None, None))
        records = [r for r, _ in runs if r]
        notes = sorted({n for _, n in runs if n})
        row: dict[str, Any] = {"row": label, "study_seconds": study_s, "study_accuracy": study_acc,
                               "note": "; ".join(notes) + (f" ({len(runs) - len(records)} of {len(runs)} seeds)"
                                                           if records and notes else "")}
        if records:
            row.update({k: records[0].get(k) for k in ("dataset", "device", "loader", "workers", "epochs")})
            row.update(seed_summary(records))
        table.append(row)
    paths = write_table(table, SEED_COLUMNS, out / "seed")
    print_table(table, SEED_COLUMNS)
    for row in table:
        if row.get("seeds"):
            study_part = (f" (study: {row['study_accuracy']:.4f}, {row['study_seconds']:g} s)"
                          if row["study_accuracy"] is not None else "")
            print(f"{row['row']}: accuracy {_pm(row['test_accuracy'], row['test_accuracy_std'], 4)}, train "
                f"{_pm(row['train_seconds'], row['train_seconds_std'], 2)} s over {row['seeds']} "
                f"seed{'s' if row['seeds'] > 1 else ''}{study_part}")
    # The report `parallelnn report OUT` makes (table, plots, index), the study's table first; its plots
    # show each row's seed-0 run (all seeds would draw one line per seed).
    ran = [record for label, record, _ in results
           if record and Path(record["out"]).name == slug(label)]
    if ran:
        from parallelnn.report import make_report

        paths.append(make_report(ran, out, ("md", "csv", "html"), title="bench seed",
                                 tables=[("The study's rows beside ours", table, SEED_COLUMNS)])[0])
    print(f"study: the paper's figures (full MNIST, its own hardware; one run each); ours: this machine, mean ± "
          f"standard deviation over seeds 0..N-1 (Iris's test split is 30 samples: one mistake is 0.033 of "
          f"accuracy). Tables: {', '.join(str(p) for p in paths)}")
    return 0


# -- bench scaling -------------------------------------------------------------------------------------

SCALING_COLUMNS = ("strategy", "nproc", "mesh", "samples_per_second", "speedup", "efficiency", "comm_share",
           "train_seconds", "startup_seconds", "test_accuracy", "note")


def add_scaling_parser(kinds) -> None:
    p = kinds.add_parser("scaling", help="every strategy at 1..N processes, with speedup and efficiency")
    p.add_argument("workload")
    p.add_argument("--max-nproc", type=int, help="largest process count (default: GPUs, else CPU cores)")
    p.add_argument("--strategies", help="comma-separated strategies besides the single-process baseline "
                                        "(default: every other one)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, help="first N training samples")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data", metavar="PATH", help="the workload's --data")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--out", metavar="DIR", help="where records and tables go (default runs/bench-scaling-<time>)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_scaling)


def default_max_nproc(device: str) -> int:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def plan(strategies: list[str], max_nproc: int) -> list[tuple[str, int, list[str]]]:
    """(strategy, nproc, extra arguments) rows, the single-process baseline first: each strategy at each
    process count it can run (each strategy says which, and with what arguments)."""
    from parallelnn import parallel

    reference = parallel.names()[0]
    rows: list[tuple[str, int, list[str]]] = [(reference, 1, [])]
    for n in range(1, max_nproc + 1):
        for name in strategies:
            args = parallel.get(name).bench_variants(n)
            if args is not None:
                rows.append((name, n, args))
    return rows


def chosen_strategies(text: str | None) -> list[str]:
    """``--strategies a,b`` (default: every strategy but the single-process reference), checked."""
    from parallelnn import parallel

    known = parallel.names()
    strategies = [s.strip() for s in text.split(",") if s.strip()] if text else known[1:]
    unknown = set(strategies) - set(known[1:])
    if unknown:
        raise UserError(f"--strategies: unknown {', '.join(sorted(unknown))}: choose among {', '.join(known[1:])}")
    return strategies


def cmd_scaling(ns: argparse.Namespace) -> int:
    strategies = chosen_strategies(ns.strategies)
    max_nproc = ns.max_nproc or default_max_nproc(ns.device)
    if max_nproc < 1:
        raise UserError("--max-nproc must be positive")
    out = bench_dir(ns.out, "scaling")
    common = [ns.workload, "--epochs", str(ns.epochs), "--device", ns.device, "--quiet"]
    for flag, value in (("--limit", ns.limit), ("--batch-size", ns.batch_size), ("--data", ns.data)):
        if value is not None:
            common += [flag, str(value)]
    log = (lambda m: None) if ns.quiet else (lambda m: print(m, flush=True))
    table: list[dict[str, Any]] = []
    baseline: Path | None = None
    for i, (strategy, n, extra) in enumerate(plan(strategies, max_nproc)):
        run_dir = out / f"{strategy}-{n}"
        argv = ["run", *common, "--strategy", strategy, "--nproc", str(n), *extra, "--out", str(run_dir)]
        if baseline is not None:
            argv += ["--baseline", str(baseline)]
        log("parallelnn " + " ".join(shlex.quote(a) for a in argv))
        proc = subprocess.run([sys.executable, "-m", "parallelnn", *argv], capture_output=True, text=True)
        row: dict[str, Any] = {"strategy": strategy, "nproc": n}
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            reason = lines[-1].removeprefix("parallelnn: error: ") if lines else f"exit {proc.returncode}"
            row["note"] = ("skipped: " if proc.returncode == 2 else "failed: ") + reason
            log(f"  {row['note']}")
            if i == 0:
                raise UserError(f"the single-process baseline failed: {reason}")
            table.append(row)
            continue
        rec = read_record(run_dir)
        if i == 0:  # the plan's first row is the single-process baseline
            baseline = run_dir / "record.json"
            rec.update(speedup=1.0, efficiency=1.0)
        shares = [r.get("comm_share") for r in rec.get("per_rank", []) if r.get("comm_share") is not None]
        mesh = rec.get("mesh") or {}
        row.update({k: rec.get(k) for k in SCALING_COLUMNS if k in rec},
                   mesh="x".join(f"{k}{v}" for k, v in mesh.items()) if mesh else "",
                   comm_share=sum(shares) / len(shares) if shares else None)
        table.append(row)
    from parallelnn.report import print_table, write_table

    paths = write_table(table, SCALING_COLUMNS, out / "scaling")
    paths += _report(out, table)
    print_table(table, SCALING_COLUMNS)
    print(f"speedup: samples/s over the single-process row; efficiency: speedup / processes; comm share: time "
          f"with collectives in flight over step time (3 profiled steps, may overlap compute). Files: "
          f"{', '.join(str(p) for p in paths)}")
    return 0


def _report(out: Path, table: list[dict[str, Any]]) -> list[Path]:
    """Plots and an index of the same records, made by the report code (``parallelnn report``)."""
    from parallelnn.report import make_report

    runs = sorted(p for p in out.iterdir() if (p / "record.json").is_file())
    return make_report(runs, out / "report", ("md",), title="bench scaling",
                       tables=[("Scaling on this machine", table, SCALING_COLUMNS)])
