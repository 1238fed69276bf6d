"""Strategies: how a model is spread over processes. One module each, one function: ``apply``.

``apply(model, built, cfg, ctx, total_steps) -> Engine`` wraps the model with the torch.distributed
building block (DDP, FSDP2 ``fully_shard``, ``pipelining``, DTensor ``parallelize_module``) on a
``DeviceMesh`` and returns the :class:`~parallelnn.parallel.engine.Engine` the trainer drives.
``check(cfg, built, world_size)`` (optional) rejects impossible layouts before any work starts.
"""

from __future__ import annotations

import importlib

REGISTRY = {name: f"parallelnn.parallel.{name}" for name in
            ("single", "ddp", "fsdp", "pipeline", "tensor", "hybrid")}


def load(name: str):
    return importlib.import_module(REGISTRY[name])
