"""Workloads the tests import by spec (``tests.workload_samples:small_workload``), as ranks started by
torchrun do: a plain module, importing nothing from the test machinery."""

import torch
from torch import nn

import parallelnn


def small_workload(cfg=None) -> parallelnn.Workload:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    return parallelnn.Workload(model=lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
                               train=(X[:64].numpy(), y[:64].numpy()), test=(X[64:], y[64:]), epochs=2,
                               batch_size=16)
