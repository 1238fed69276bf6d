"""Does ``--compile`` pay on this CPU? The MNIST CNN's training step (batch 64, Adam), eager channels_last (the
fast path) against the same model with its forward compiled as ``parallelnn --compile`` compiles it, in one
process, alternating blocks of 20 steps so that a busy machine slows both alike; median ms per step.

    python benchmarks/compile_cpu.py [--blocks 8]

Not a test: it prints. (On the 2-core development VM, torch 2.13: eager 13.8 ms, compiled 28.2 ms: 0.49x.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallelnn.launch import keep_freed_memory  # noqa: E402
from parallelnn.workloads.mnist import simple_cnn  # noqa: E402


def make(compiled: bool, channels_last: bool = True):
    torch.manual_seed(0)
    model = simple_cnn()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.forward = torch.compile(model.forward)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def block(model, optimizer, x_all, y_all, steps: int) -> float:
    """Milliseconds per training step over ``steps`` steps."""
    t0 = time.perf_counter()
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_all.index_select(0, idx)), y_all.index_select(0, idx), reduction="sum")
        (loss / 64).backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    args = p.parse_args()
    keep_freed_memory()  # as parallelnn's ranks do
    x_all, y_all = torch.randn(64 * args.steps, 1, 28, 28), torch.randint(0, 10, (64 * args.steps,))
    models = {"eager channels_last": make(False), "compiled channels_last": make(True),
              "compiled contiguous": make(True, channels_last=False)}
    for name, (model, optimizer) in models.items():
        t0 = time.perf_counter()
        block(model, optimizer, x_all, y_all, 3)  # compiles
        print(f"{name}: first 3 steps {time.perf_counter() - t0:.1f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.blocks):
        for name, (model, optimizer) in models.items():
            times[name].append(block(model, optimizer, x_all, y_all, args.steps))
    eager = statistics.median(times["eager channels_last"])
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"{name:24} median {med:6.1f} ms/step (min {min(ms):.1f}, max {max(ms):.1f}); x eager {eager / med:.2f}")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
