"""``parallelnn bench scaling WORKLOAD``: every strategy that applies, at 1..N processes, on this machine.

Each row is a real ``parallelnn run`` command (printed, so it can be rerun alone) with its own
record; speedup and efficiency are against the single-process row measured in the same bench.
A configuration a strategy cannot take (e.g. more pipeline stages than layers) is listed with the
reason instead of a number.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from parallelnn.errors import UserError
from parallelnn.record import read_record

COLUMNS = ("strategy", "nproc", "mesh", "samples_per_second", "speedup", "efficiency", "comm_share",
           "train_seconds", "startup_seconds", "test_accuracy", "note")


def add_parser(kinds) -> None:
    p = kinds.add_parser("scaling", help="every strategy at 1..N processes, with speedup and efficiency")
    p.add_argument("workload", choices=("iris", "mnist", "gpt2"))
    p.add_argument("--max-nproc", type=int, help="largest process count (default: GPUs, else CPU cores)")
    p.add_argument("--strategies", default="ddp,fsdp,pipeline,tensor,hybrid",
                   help="comma-separated strategies besides the single-process baseline")
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
    """(strategy, nproc, extra arguments) rows, the single-process baseline first."""
    rows = [("single", 1, [])]
    for n in range(1, max_nproc + 1):
        for strategy in strategies:
            if strategy in ("ddp", "fsdp"):
                rows.append((strategy, n, []))
            elif strategy in ("pipeline", "tensor") and n >= 2:
                rows.append((strategy, n, []))
            elif strategy == "hybrid" and n >= 4 and n % 2 == 0:
                rows.append((strategy, n, ["--mesh", f"{n // 2}x2"]))
    return rows


def cmd_scaling(ns: argparse.Namespace) -> int:
    from parallelnn.bench import bench_dir

    strategies = [s.strip() for s in ns.strategies.split(",") if s.strip()]
    unknown = set(strategies) - {"ddp", "fsdp", "pipeline", "tensor", "hybrid"}
    if unknown:
        raise UserError(f"--strategies: unknown {', '.join(sorted(unknown))}")
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
    for strategy, n, extra in plan(strategies, max_nproc):
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
            if strategy == "single":
                raise UserError(f"the single-process baseline failed: {reason}")
            table.append(row)
            continue
        rec = read_record(run_dir)
        if strategy == "single":
            baseline = run_dir / "record.json"
            rec.update(speedup=1.0, efficiency=1.0)
        shares = [r.get("comm_share") for r in rec.get("per_rank", []) if r.get("comm_share") is not None]
        mesh = rec.get("mesh") or {}
        row.update({k: rec.get(k) for k in COLUMNS if k in rec},
                   mesh="x".join(f"{k}{v}" for k, v in mesh.items()) if mesh else "",
                   comm_share=sum(shares) / len(shares) if shares else None)
        table.append(row)
    from parallelnn.report import print_table, write_table

    paths = write_table(table, COLUMNS, out / "scaling")
    paths += _report(out, table)
    print_table(table, COLUMNS)
    print(f"speedup: samples/s over the single-process row; efficiency: speedup / processes; comm share: time "
          f"with collectives in flight over step time (3 profiled steps, may overlap compute). Files: "
          f"{', '.join(str(p) for p in paths)}")
    return 0


def _report(out: Path, table: list[dict[str, Any]]) -> list[Path]:
    """Plots and an index of the same records, made by the report code (``parallelnn report``)."""
    from parallelnn.report import make_report

    runs = sorted(p for p in out.iterdir() if (p / "record.json").is_file())
    return make_report(runs, out / "report", ("md",), title="bench scaling",
                       tables=[("Scaling on this machine", table, COLUMNS)])
