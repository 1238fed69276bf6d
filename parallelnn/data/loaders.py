"""The two data paths, both yielding ``(inputs, targets, global_batch_size)`` for this rank.

* ``memory`` (default, fast): the whole split is prepared once — normalized, on the target device —
  and each batch is a slice by a shuffled index. No per-sample Python work at all.
* ``dataloader`` (the study's "batch processing + threading"): a ``torch.utils.data.DataLoader``
  that prepares each sample in ``--workers`` processes, with pinned memory on CUDA.

Both draw the same global batches from the same seeded permutation, and give data-parallel rank
``r`` of ``d`` the ``r``-th of ``d`` near-equal chunks of each global batch. So any number of ranks
sees exactly the batches a single process sees, which is what makes the distributed runs comparable
(and testable) against single-process ones. (torch's DistributedSampler pads the data with repeated
samples and interleaves ranks instead; we avoid the padding so losses match exactly.)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class ArraySplit:
    """One split of a dataset: raw inputs and targets (CPU tensors) and how to prepare inputs.

    ``prepare`` turns raw inputs into model inputs; it works on one sample or on a whole stack,
    so the dataloader path can call it per sample and the memory path once for everything.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, n: int) -> "ArraySplit":
        return ArraySplit(self.inputs[:n], self.targets[:n], self.prepare)


class DatasetSplit:
    """One split held by a map-style ``torch.utils.data.Dataset`` of (input, target) pairs.

    The dataloader path reads it sample by sample (in worker processes with ``--workers``); the memory
    path and the few places that need a batch at once (FLOP counting, pipeline balancing) stack samples
    into tensors: ``inputs`` / ``targets`` stack the whole split once, on first use.
    """

    def __init__(self, dataset: Dataset, indices: range | None = None):
        self.dataset = dataset
        self.indices = indices if indices is not None else range(len(dataset))
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def head(self, n: int) -> "DatasetSplit":
        return DatasetSplit(self.dataset, self.indices[:n])

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stacked is None:
            pairs = [self[i] for i in range(len(self))]
            self._stacked = (torch.stack([torch.as_tensor(x) for x, _ in pairs]),
                             torch.stack([torch.as_tensor(y) for _, y in pairs]))
        return self._stacked

    @property
    def inputs(self) -> torch.Tensor:
        return self._stack()[0]

    @property
    def targets(self) -> torch.Tensor:
        return self._stack()[1]

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x


Split = ArraySplit | DatasetSplit


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[torch.Tensor]:
    """The global batches of one epoch as index tensors; the same on every rank.

    The last batch is kept however short: one process trains it, so every layout trains it. When it
    has fewer samples than there are data-parallel ranks, some ranks' shares are empty; they still
    run the step (forward on zero samples, zero gradients) and take part in its collectives, and the
    loss scaling (see :mod:`parallelnn.parallel.engine`) makes the averaged gradient exactly that of
    the batch's mean loss.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    return list(torch.split(order, batch_size)) if n else []  # (split makes one empty batch of nothing)


def rank_share(batch: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return torch.tensor_split(batch, size)[rank] if size > 1 else batch


@dataclass
class BatchPlan:
    """Which samples this rank gets at each step of the current epoch."""

    n: int
    batch_size: int
    shuffle: bool
    seed: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    epoch: int = 0
    start: int = 0  # steps of this epoch already trained (resuming): they are skipped

    def global_batches(self) -> list[torch.Tensor]:
        return epoch_batches(self.n, self.batch_size, self.seed, self.epoch, self.shuffle)

    @property
    def steps(self) -> int:
        """Steps in a whole epoch, counted without drawing the epoch's permutation."""
        return steps_per_epoch(self.n, self.batch_size, self.dp_size)

    def rank_batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(this rank's indices, global batch size) for each remaining step of the epoch."""
        for batch in self.global_batches()[self.start:]:
            yield rank_share(batch, self.dp_rank, self.dp_size), len(batch)


class _Loader:
    """What both loaders share: the plan, epochs, length, and a no-op close."""

    plan: BatchPlan

    def set_epoch(self, epoch: int) -> None:
        self.plan.epoch, self.plan.start = epoch, 0

    def __len__(self) -> int:
        """Steps in a whole epoch."""
        return self.plan.steps

    def close(self) -> None:
        pass


class MemoryLoader(_Loader):
    """Whole split prepared once on the device; batches are index slices."""

    def __init__(self, split: Split, plan: BatchPlan, device: torch.device):
        self.plan, self.device = plan, device
        self.inputs = split.prepare(split.inputs).to(device)
        self.targets = split.targets.to(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        # The epoch's order goes to the device in one copy (a copy from pageable host memory waits for the
        # device): the steps themselves then only gather on the device, with no host transfer or sync.
        batches = list(self.plan.rank_batches())
        if not batches:
            return
        order = torch.cat([idx for idx, _ in batches]).to(self.device, non_blocking=True)
        for idx, (_, n) in zip(order.split([len(idx) for idx, _ in batches]), batches):
            yield self.inputs.index_select(0, idx), self.targets.index_select(0, idx), n


class _PerSample(Dataset):
    """Prepares one sample at a time, in whichever worker process asks for it."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.prepare(self.split.inputs[i]), self.split.targets[i]


class _RankBatches(Sampler):
    """Yields this rank's share of each global batch (see the module docstring)."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan

    def __len__(self) -> int:  # the non-empty shares only: the DataLoader never sees an empty one
        return sum(1 for idx, _ in self.plan.rank_batches() if len(idx))

    def __iter__(self):
        for idx, _ in self.plan.rank_batches():
            if len(idx):  # an empty share (a last batch shorter than the ranks) is made by DataLoaderLoader
                yield idx.tolist()


class DataLoaderLoader(_Loader):
    """``torch.utils.data.DataLoader`` with per-sample preparation and worker processes."""

    def __init__(self, split: Split, plan: BatchPlan, device: torch.device, workers: int = 0):
        self.plan, self.device = plan, device
        self.loader = DataLoader(
            split if isinstance(split, DatasetSplit) else _PerSample(split),
            batch_sampler=_RankBatches(plan),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        shares = [(len(idx), n) for idx, n in self.plan.rank_batches()]
        batches = iter(self.loader) if any(k for k, _ in shares) else iter(())
        for k, n in shares:
            x, y = next(batches) if k else self._empty()
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), n

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero-sample batch shaped like the others (the collate function cannot make one from nothing)."""
        x, y = self.loader.dataset[0]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return x.new_empty((0, *x.shape)), y.new_empty((0, *y.shape))

    def close(self) -> None:
        """Stop the worker processes now (left to garbage collection, their shutdown can stall)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def make_loader(kind: str, split: Split, batch_size: int, device: torch.device, *, shuffle: bool,
                seed: int = 0, dp_rank: int = 0, dp_size: int = 1, workers: int = 0):
    plan = BatchPlan(len(split), batch_size, shuffle, seed, dp_rank, dp_size)
    if kind == "memory":
        return MemoryLoader(split, plan, device)
    if workers > (os.cpu_count() or 1):
        # The user asked for it (the study's setting); torch's own warning about it is noise here.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
    return DataLoaderLoader(split, plan, device, workers)


def steps_per_epoch(n: int, batch_size: int, dp_size: int = 1) -> int:
    """Every sample is trained once per epoch, the last batch included, whatever ``dp_size``."""
    return math.ceil(n / batch_size)
