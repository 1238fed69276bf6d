"""What a task means: its loss (summed over samples) and its metrics, for ``Workload(task=...)``.

* ``classification``: cross-entropy on logits ``[batch, classes]`` and integer targets; test_accuracy, test_loss.
* ``regression``: squared error on outputs and float targets of the same shape; test_mse (= test_loss),
  test_mae, test_r2 (over every target element).
* ``lm``: next-token cross-entropy on logits ``[batch, time, vocab]`` for token targets ``[batch, time]``
  (the targets are the inputs: position t predicts token t+1); test_loss per window, perplexity.

Losses return the *sum* over samples (a language model's sample is a window: its mean next-token loss),
so that any split of a global batch over ranks adds up to exactly the single-process mean.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


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




def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")


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


def _same_shape(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return targets.reshape(outputs.shape) if targets.numel() == outputs.numel() else targets


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean squared error over its target elements; summed over samples."""
    err = (outputs.float() - _same_shape(outputs, targets).float()) ** 2
    return err.reshape(len(err), -1).mean(dim=1).sum()


def regression_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    y = _same_shape(outputs, targets).double()
    err = outputs.double() - y
    return {"sse": (err ** 2).sum(), "sae": err.abs().sum(), "sy": y.sum(), "syy": (y ** 2).sum(),
            "elements": torch.tensor(y.numel(), dtype=torch.float64, device=y.device)}


def regression_summary(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums.get("elements", 0), 1)
    total = sums["syy"] - sums["sy"] ** 2 / n  # the targets' sum of squares about their mean
    mse = sums["sse"] / n
    return {"test_loss": mse, "test_mse": mse, "test_mae": sums["sae"] / n,
            "test_r2": 1.0 - sums["sse"] / total if total > 0 else float("nan")}


REGRESSION = Metrics(("sse", "sae", "sy", "syy", "elements"), regression_sums, regression_summary)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over windows of each window's mean next-token cross-entropy (every window is full).

    The last position has no next token: it gets label -100 (ignored) rather than being sliced off,
    because slicing the logits would copy them (batch x context x vocab floats) every step.
    """
    labels = torch.cat([targets[:, 1:], targets.new_full((targets.size(0), 1), -100)], dim=1)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       reduction="sum", ignore_index=-100) / (targets.size(1) - 1)


def lm_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss_sum": lm_loss(outputs, targets).detach(), "count": torch.tensor(len(targets), device=targets.device)}


def lm_summary(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["loss_sum"] / max(sums.get("count", 0), 1)
    return {"test_loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


LM = Metrics(("loss_sum", "count"), lm_sums, lm_summary)

TASKS = {"classification": (classification_loss, ACCURACY), "regression": (regression_loss, REGRESSION),
         "lm": (lm_loss, LM)}
