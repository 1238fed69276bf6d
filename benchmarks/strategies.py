"""MNIST CNN: samples/s of every strategy at 2 processes beside the single-process run, and the time
from pressing enter to the first training step.

    python benchmarks/strategies.py                      # embedded 4k images, 1 epoch, 3 rounds
    python benchmarks/strategies.py --data ../shared/data/mnist --rounds 1

Every configuration is a real ``parallelnn run`` command, run in alternating rounds so that drift of
the machine's speed hits all of them alike; medians are printed, each with its ratio to the
single-process run of the same round. ``startup`` is the record's ``startup_seconds`` (process start
of the command -> first step begins: interpreter, imports, spawning ranks, rendezvous, data, model);
``wall`` is the whole command as the shell sees it. Not a test: it prints, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "single x1": ["--strategy", "single"],
    "ddp x2": ["--strategy", "ddp", "--nproc", "2"],
    "fsdp x2": ["--strategy", "fsdp", "--nproc", "2"],
    "pipeline x2 (1f1b)": ["--strategy", "pipeline", "--nproc", "2"],
    "tensor x2": ["--strategy", "tensor", "--nproc", "2"],
}


def run(args: list[str], data: str | None, epochs: int, limit: int | None) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "parallelnn", "run", "mnist", *args, "--epochs", str(epochs), "--quiet",
               "--out", tmp + "/r"]
        cmd += ["--data", data] if data else []
        cmd += ["--limit", str(limit)] if limit else []
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        with open(tmp + "/r/record.json") as fh:
            return json.load(fh), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {name: {"sps": [], "ratio": [], "startup": [], "wall": [],
                                                         "comm": []} for name in CONFIGS}
    for r in range(args.rounds):
        base = None
        for name, extra in CONFIGS.items():
            rec, wall = run(extra, args.data, args.epochs, args.limit)
            sps = rec["samples_per_second"]
            base = base or sps
            shares = [x["comm_share"] for x in rec["per_rank"] if "comm_share" in x]
            res = results[name]
            res["sps"].append(sps)
            res["ratio"].append(sps / base)
            res["startup"].append(rec["startup_seconds"])
            res["wall"].append(wall)
            res["comm"].append(sum(shares) / len(shares) if shares else 0.0)
            print(f"round {r + 1} {name:20s} {sps:8.0f} samples/s  x{sps / base:.2f}  startup {rec['startup_seconds']:.2f}s"
                  f"  wall {wall:.2f}s", flush=True)
    print(f"\nmedians over {args.rounds} rounds ({rec['dataset']}, {rec['train_samples']} samples x {args.epochs} epochs, "
          f"{rec['hardware']['cores']} cores):")
    print(f"{'configuration':20s} {'samples/s':>10s} {'vs single':>10s} {'comm share':>11s} {'startup s':>10s} {'wall s':>8s}")
    for name, res in results.items():
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{name:20s} {med['sps']:10.0f} {med['ratio']:10.2f} {med['comm']:11.2f} {med['startup']:10.2f} "
              f"{med['wall']:8.2f}")


if __name__ == "__main__":
    main()
