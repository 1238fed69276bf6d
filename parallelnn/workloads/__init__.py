"""Workloads: what is trained. Each module has ``DEFAULTS`` and ``build(cfg, device, log) -> Built``.

A workload knows its data, model, loss, optimizer and evaluation metric, and nothing about how the
work is spread over processes; strategies (``parallel/``) know nothing about any one workload.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from parallelnn.data.loaders import ArraySplit

REGISTRY = {
    "iris": "parallelnn.workloads.iris",
    "mnist": "parallelnn.workloads.mnist",
    "gpt2": "parallelnn.workloads.gpt2",
}


@dataclass
class Built:
    """Everything a workload hands to the trainer and the strategies."""

    model: nn.Module
    train: ArraySplit
    test: ArraySplit
    dataset: str
    # Sum (not mean) of the per-sample losses: strategies scale it so any split of a global batch
    # over ranks and microbatches adds up to exactly the single-process mean.
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # params -> (optimizer, lr scheduler or None); total_steps lets schedules plan their decay.
    make_optimizer: Callable[[Any, int], tuple[torch.optim.Optimizer, Any]]
    # outputs, targets -> sums to add across batches and ranks (e.g. loss_sum, correct, count).
    eval_sums: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    # totals -> the metrics that go into the record (e.g. test_accuracy, test_loss).
    summarize: Callable[[dict[str, float]], dict[str, float]]
    # The model as an ordered list of layers, for pipeline stages (None: cannot be pipelined).
    layers: Callable[[nn.Module], list[nn.Module]] | None = None
    # The modules FSDP shards one by one (then the root); None: each parameterised entry of ``layers``.
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    # model, tp_mesh -> names of modules left replicated; None: the tensor strategy's generic plan.
    tensor_plan: Callable[[nn.Module, Any], list[str]] | None = None
    # Called on rank 0 with a full (unsharded) state dict when training ends, e.g. to save the model.
    save: Callable[[dict[str, torch.Tensor], str], None] | None = None
    # Tokens per sample (sequence) for language models: throughput is then also reported in tokens/s.
    tokens_per_sample: int | None = None
    # Optional: "eval_keys" (names eval_sums returns), "track_grad_norm" (log train/grad_norm),
    # "record" (extra keys for record.json).
    extra: dict[str, Any] = field(default_factory=dict)


def load(name: str):
    return importlib.import_module(REGISTRY[name])


def accuracy_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval sums of a classifier: summed cross-entropy, correct predictions, count."""
    logits = outputs.float()
    return {
        "loss_sum": nn.functional.cross_entropy(logits, targets, reduction="sum"),
        "correct": (logits.argmax(dim=1) == targets).sum(),
        "count": torch.tensor(len(targets), device=targets.device),
    }


def accuracy_summary(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums.get("count", 0), 1)
    return {"test_accuracy": sums["correct"] / n, "test_loss": sums["loss_sum"] / n}


def classifier_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")


def adam(lr: float):
    def make(params, total_steps: int):
        return torch.optim.Adam(params, lr=lr), None
    return make


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    return list(model)


def classifier(model: nn.Sequential, train: ArraySplit, test: ArraySplit, dataset: str, lr: float) -> Built:
    """A study-style classifier: cross-entropy, Adam, accuracy, its Sequential layers for pipelining."""
    return Built(model=model, train=train, test=test, dataset=dataset, loss_fn=classifier_loss,
                 make_optimizer=adam(lr), eval_sums=accuracy_metrics, summarize=accuracy_summary,
                 layers=sequential_layers)
