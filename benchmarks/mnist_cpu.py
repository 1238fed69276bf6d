"""MNIST CNN on CPU: a plain PyTorch loop written the study's way vs ``parallelnn run mnist --loader memory``.

    python benchmarks/mnist_cpu.py                 # embedded 4k images, 3 epochs each, 3 rounds
    python benchmarks/mnist_cpu.py --data ../shared/data/mnist --epochs 1
    python benchmarks/mnist_cpu.py --compile       # also parallelnn --compile and a hand-written eager loop

(a) the study's way: a Dataset that converts and normalizes one image at a time (what torchvision's
    ToTensor + Normalize do), a DataLoader with batch 64, shuffle and 4 worker processes, the
    SimpleCNN as an nn.Module, Adam 1e-3 — timed over the training loop only;
(b) parallelnn's fast path, started as a user would start it; its record's ``train_seconds`` covers
    the same thing (the training loops, no evaluation).
Both train on the same samples for the same epochs, in alternating rounds; medians are printed, with
the ratio b/a and each side's MFU against this machine's measured peak. Not a test: it prints, it
does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from parallelnn.data.idx import read_mnist_dir
from parallelnn.data.sources import embedded_mnist_dir
from parallelnn.measure import peak_flops


class SimpleCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 64 * 7 * 7)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MnistDataset(Dataset):
    """Per-sample transform, as torchvision's ToTensor() + Normalize((0.1307,), (0.3081,)) do it."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).float().div(255.0).unsqueeze(0)
        return (x - 0.1307) / 0.3081, int(self.labels[i])


def study_loop(images, labels, epochs: int, workers: int) -> float:
    """Samples per second of the study-style loop (training loop only)."""
    torch.manual_seed(0)
    loader = DataLoader(MnistDataset(images, labels), batch_size=64, shuffle=True, num_workers=workers)
    model = SimpleCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
    return len(images) * epochs / (time.perf_counter() - t0)


def handwritten_loop(images, labels, epochs: int) -> float:
    """Samples per second of the eager fast path written by hand: normalized tensors in memory, channels_last,
    index_select batches of a seeded permutation, Adam (the reference --compile has to beat by 1.2x)."""
    torch.manual_seed(0)
    x_all = ((torch.from_numpy(images).float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)
    y_all = torch.from_numpy(labels).long()
    from parallelnn.workloads.mnist import simple_cnn  # the same layers, with Flatten (view needs contiguous)

    model = simple_cnn().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_all), generator=torch.Generator().manual_seed(epoch)).split(64):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_all.index_select(0, idx)), y_all.index_select(0, idx), reduction="sum")
            (loss / len(idx)).backward()
            optimizer.step()
    return len(images) * epochs / (time.perf_counter() - t0)


def parallelnn_run(data: str | None, epochs: int, limit: int | None, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "parallelnn", "run", "mnist", "--loader", "memory", "--epochs", str(epochs),
               "--out", tmp + "/run", "--quiet", *extra]
        cmd += ["--data", data] if data else []
        cmd += ["--limit", str(limit)] if limit else []
        subprocess.run(cmd, check=True)
        with open(tmp + "/run/record.json") as fh:
            rec = json.load(fh)
        with open(tmp + "/run/metrics.jsonl") as fh:
            epochs_ = [e for e in map(json.loads, fh) if e.get("event") == "epoch"]
        # After the first epoch (which holds --compile's compilations): the steady rate.
        later = epochs_[1:]
        rec["steady_samples_per_second"] = (sum(e["train/samples_per_second"] * e["train/seconds"] for e in later)
                                            / sum(e["train/seconds"] for e in later)) if later else None
        return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="MNIST IDX directory (default: the embedded 4k training images)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, help="first N training samples")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="also parallelnn --compile (steady rate after the first epoch) and a hand-written eager loop")
    args = p.parse_args()
    arrays = read_mnist_dir(args.data or embedded_mnist_dir())
    images, labels = arrays["train_images"], arrays["train_labels"]
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    peak = peak_flops(torch.device("cpu"))
    flops = 25.04e6  # forward + backward per sample, torch.utils.flop_counter (see a record's flops_per_sample)
    print(f"{len(images)} samples x {args.epochs} epochs, {args.rounds} rounds; CPU peak {peak / 1e9:.0f} GFLOP/s "
          f"({os.cpu_count()} cores)")
    study, ours, ratios, hand, compiled = [], [], [], [], []
    for r in range(args.rounds):
        a = study_loop(images, labels, args.epochs, args.workers)
        rec = parallelnn_run(args.data, args.epochs, args.limit)
        b = rec["samples_per_second"]
        flops = rec["flops_per_sample"]
        study.append(a)
        ours.append(b)
        ratios.append(b / a)
        line = f"round {r + 1}: study loop {a:8.0f} samples/s | parallelnn {b:8.0f} samples/s | ratio {b / a:.2f}"
        if args.compile:
            h = handwritten_loop(images, labels, args.epochs)
            c = parallelnn_run(args.data, args.epochs, args.limit, "--compile")
            hand.append(h)
            compiled.append(c["steady_samples_per_second"] or 0.0)
            line += (f" | hand-written eager {h:8.0f} | parallelnn --compile {c['samples_per_second']:8.0f} overall, "
                     f"{compiled[-1]:8.0f} after epoch 1 (first step {c['first_step_seconds']:.1f}s)")
        print(line, flush=True)
    a, b = statistics.median(study), statistics.median(ours)
    print(f"median: study loop {a:.0f} samples/s (MFU {a * flops / peak:.2f}) | parallelnn --loader memory "
          f"{b:.0f} samples/s (MFU {b * flops / peak:.2f}) | ratio {statistics.median(ratios):.2f}")
    if args.compile:
        h, c = statistics.median(hand), statistics.median(compiled)
        print(f"median: hand-written eager channels_last {h:.0f} samples/s | parallelnn --compile after epoch 1 "
              f"{c:.0f} samples/s | ratio {c / h:.2f} (goal >= 1.2)")


if __name__ == "__main__":
    main()
