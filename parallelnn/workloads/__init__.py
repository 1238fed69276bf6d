"""Workloads: what is trained. Each module has ``build(cfg, device, log) -> Workload``.

A workload knows its data, model, loss, optimizer and evaluation metrics, and nothing about how the
work is spread over processes; strategies (``parallel/``) know nothing about any one workload. What a
strategy may need from a model (its layers for pipeline stages, its blocks for FSDP, a tensor-parallel
plan) are typed optional fields of :class:`Workload`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from parallelnn.data.loaders import ArraySplit

REGISTRY = {
    "iris": "parallelnn.workloads.iris",
    "mnist": "parallelnn.workloads.mnist",
    "gpt2": "parallelnn.workloads.gpt2",
}

#: params, lr, total optimizer steps -> (optimizer, LR scheduler or None); the steps let schedules plan decay.
OptimizerFactory = Callable[[Iterable[nn.Parameter], float, int], tuple[torch.optim.Optimizer, Any]]


@dataclass(frozen=True)
class Metrics:
    """How a workload is evaluated: sums added over batches and ranks, then turned into metrics."""

    #: The names ``sums`` returns, in a fixed order (ranks without outputs, e.g. early pipeline stages,
    #: contribute zeros under these names).
    keys: tuple[str, ...]
    #: outputs, targets -> {key: summed tensor} for one batch (e.g. loss_sum, correct, count).
    sums: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    #: totals over the whole test split -> the record's metrics (e.g. test_accuracy, test_loss).
    summarize: Callable[[dict[str, float]], dict[str, float]]


class TensorPlan(Protocol):
    """A model's own tensor-parallel plan (the generic one pairs consecutive Linear layers)."""

    def check(self, model: nn.Module, tp: int) -> None:
        """Raise UserError when ``tp`` ranks cannot share this model's layers (before any process starts)."""

    def apply(self, model: nn.Module, tp_mesh: Any) -> dict[str, Any]:
        """Shard ``model`` in place over the 1-D ``tp_mesh``; return what was sharded and what was not."""


@dataclass
class Workload:
    """Everything a run trains: model, data, loss, optimizer, metrics, and what strategies may use."""

    #: The model, built on the CPU with the run's seed (every rank builds the same one).
    model: nn.Module
    train: ArraySplit
    test: ArraySplit
    #: Names the data in records and tables (runs on different data are never compared).
    dataset: str
    #: outputs, targets -> the *sum* (not the mean) of the per-sample losses: strategies scale it so that
    #: any split of a global batch over ranks and microbatches adds up to exactly the single-process mean.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: Metrics
    optimizer: OptimizerFactory
    #: Defaults for the run's options this workload has an opinion on (epochs, batch_size, lr, log_every,
    #: max_grad_norm); the command line wins.
    defaults: dict[str, Any] = field(default_factory=dict)
    #: The model as an ordered list of layers whose composition is its forward, for pipeline stages
    #: (None: it cannot be pipelined).
    layers: Callable[[nn.Module], list[nn.Module]] | None = None
    #: The modules FSDP shards one by one before the root (None: each parameterised entry of ``layers``).
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    #: A tensor-parallel plan of the model's own (None: the generic Linear-pair plan).
    tensor_plan: TensorPlan | None = None
    #: Called on rank 0 with the full (unsharded) state dict when training ends, to write the weights
    #: under the run directory; None writes ``OUT/model.safetensors``. Returns where they went.
    save: Callable[[dict[str, torch.Tensor], Path], Path] | None = None
    #: Called on rank 0 after saving, with that path: evaluations that need the saved model (e.g. gpt2's
    #: pass@k); returns keys for the record.
    evaluate_saved: Callable[[Path], dict[str, Any]] | None = None
    #: Tokens per sample (sequence) for language models: throughput is then also reported in tokens/s.
    tokens_per_sample: int | None = None
    #: Log the gradient norm at every logged step (``train/grad_norm``), even without clipping.
    track_grad_norm: bool = False
    #: Facts about the data and model for record.json (e.g. gpt2's model_source and context).
    facts: dict[str, Any] = field(default_factory=dict)


def load(name: str):
    return importlib.import_module(REGISTRY[name])


def accuracy_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
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


ACCURACY = Metrics(("loss_sum", "correct", "count"), accuracy_sums, accuracy_summary)


def classifier_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")


def adam(params: Iterable[nn.Parameter], lr: float, total_steps: int):
    return torch.optim.Adam(params, lr=lr), None


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    return list(model)


#: The study's settings for its classifiers.
STUDY_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "log_every": 0, "max_grad_norm": 0.0}


def classifier(model: nn.Sequential, train: ArraySplit, test: ArraySplit, dataset: str, epochs: int) -> Workload:
    """A study-style classifier: cross-entropy, Adam, accuracy, its Sequential layers for pipelining."""
    return Workload(model=model, train=train, test=test, dataset=dataset, loss=classifier_loss, metrics=ACCURACY,
                    optimizer=adam, defaults={"epochs": epochs, **STUDY_DEFAULTS}, layers=sequential_layers)
