"""``parallelnn.Workload``: what a run trains. The built-in workloads and users' own return one.

A user's file holds a function that takes the run's config and returns a ``Workload``::

    import torch
    from torch import nn
    import parallelnn

    def build(cfg):
        X, y = torch.randn(512, 8), torch.randint(0, 3, (512,))
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
        return parallelnn.Workload(model=model, train=(X[:400], y[:400]), test=(X[400:], y[400:]),
                                   task="classification", epochs=5)

    parallelnn run my_task.py:build --strategy ddp --nproc 2           # or parallelnn.run("my_task.py:build", ...)

Every rank calls ``build`` itself (seeded with ``--seed`` first), so every rank builds the same model and data.
:func:`complete` turns what the user gave (arrays, datasets, a task name) into what the trainer and the
strategies use (splits, a summed loss, metrics, an optimizer factory), and refuses what cannot work in one
line, before any training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from parallelnn.data.loaders import ArraySplit, DatasetSplit, Split
from parallelnn.errors import UserError
from parallelnn.tasks import TASKS, Metrics

#: params, lr, total optimizer steps -> (optimizer, LR scheduler or None); the steps let schedules plan decay.
OptimizerFactory = Callable[[Iterable[nn.Parameter], float, int], tuple[torch.optim.Optimizer, Any]]


class TensorPlan(Protocol):
    """A model's own tensor-parallel plan (the generic one pairs consecutive Linear layers)."""

    def check(self, model: nn.Module, tp: int) -> None:
        """Raise UserError when ``tp`` ranks cannot share this model's layers (before any process starts)."""

    def apply(self, model: nn.Module, tp_mesh: Any) -> dict[str, Any]:
        """Shard ``model`` in place over the 1-D ``tp_mesh``; return what was sharded and what was not."""

    def layers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(the modules this plan shards, the row-wise ones whose outputs are all-reduced): what ``advise``
        counts for the plan's memory and communication."""


@dataclass
class Workload:
    """Everything a run trains. Only ``model``, ``train`` and ``test`` are needed; the rest has defaults."""

    #: An ``nn.Module``, or a function of no arguments returning one (called after seeding with ``--seed``).
    model: nn.Module | Callable[[], nn.Module]
    #: Training data: a pair ``(inputs, targets)`` of tensors or numpy arrays (the fast in-memory path), a
    #: map-style ``torch.utils.data.Dataset`` of ``(input, target)`` pairs, or a Hugging Face
    #: ``datasets.Dataset`` (name its two columns in ``columns``).
    train: Any
    #: Test data, in the same forms; evaluated after every epoch.
    test: Any
    #: "classification" (cross-entropy; accuracy), "regression" (MSE; MSE, MAE, R²) or "lm" (next-token
    #: cross-entropy; perplexity): the loss and metrics when ``loss`` / ``metrics`` are not given.
    task: str = "classification"
    #: outputs, targets -> the *sum* over the batch's samples (``reduction="sum"``), so that any split of a
    #: global batch over ranks and microbatches adds up to exactly the single-process mean.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: Metrics of your own: a :class:`Metrics`, or outputs, targets -> {name: sum over the batch's
    #: samples}, reported as ``test_<name>`` = the sum over the test split / its size.
    metrics: Metrics | Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None
    #: (params, lr) -> an optimizer, or (params, lr, total_steps) -> (optimizer, scheduler or None);
    #: default Adam at ``--lr``.
    optimizer: Callable[..., Any] | None = None
    #: What the data is called in records and tables (runs on different data are never compared).
    dataset: str | None = None
    #: Defaults for ``--epochs``, ``--batch-size``, ``--lr``, ``--log-every``, ``--max-grad-norm`` (the
    #: command line wins; unset: 10 epochs, batch 64, lr 1e-3, per-epoch logging, no clipping).
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    log_every: int | None = None
    max_grad_norm: float | None = None
    #: Pipeline hint: the model as an ordered list of layers whose composition is its forward (default:
    #: the layers of an ``nn.Sequential``). ``--split`` says where stages begin.
    layers: Callable[[nn.Module], list[nn.Module]] | None = None
    #: FSDP hint: the modules to shard one by one before the root (default: see ``parallel/fsdp.py``).
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    #: Tensor-parallel hint: {submodule name: "colwise" | "rowwise"} for Linear layers, or a
    #: :class:`TensorPlan` (default: pairs of consecutive Linear layers among the model's children).
    tensor_plan: TensorPlan | dict[str, str] | None = None
    #: For a Hugging Face ``datasets.Dataset``: its (input column, target column).
    columns: tuple[str, str] | None = None
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

    #: The option defaults a workload may set.
    DEFAULTED = ("epochs", "batch_size", "lr", "log_every", "max_grad_norm")

    def defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.DEFAULTED if getattr(self, k) is not None}


GENERAL_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "log_every": 0, "max_grad_norm": 0.0}


def adam(params: Iterable[nn.Parameter], lr: float, total_steps: int):
    return torch.optim.Adam(params, lr=lr), None


def optimizer_factory(given: Callable[..., Any] | None) -> OptimizerFactory:
    """The user's factory, called the way it was written: (params, lr) or (params, lr, total_steps)."""
    if given is None:
        return adam
    try:
        takes_steps = len(inspect.signature(given).parameters) >= 3
    except (TypeError, ValueError):
        takes_steps = False

    def make(params, lr: float, total_steps: int):
        made = given(params, lr, total_steps) if takes_steps else given(params, lr)
        optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"Workload.optimizer returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer, scheduler

    return make


def to_split(data: Any, what: str, columns: tuple[str, str] | None) -> Split:
    """A pair of arrays, a torch Dataset or a Hugging Face dataset as a split the loaders take."""
    if isinstance(data, (ArraySplit, DatasetSplit)):
        split = data
    elif _is_hf_dataset(data):
        if not columns:
            raise UserError(f"Workload.{what} is a Hugging Face dataset: name its input and target columns, "
                            "e.g. Workload(..., columns=('image', 'label'))")
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise UserError(f"Workload.{what} has no column {missing[0]!r} (it has {', '.join(data.column_names)})")
        split = DatasetSplit(_HFPairs(data.with_format("torch"), columns))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, torch.utils.data.Dataset):
        inputs, targets = (_tensor(v, f"Workload.{what}[{i}]") for i, v in enumerate(data))
        if len(inputs) != len(targets):
            raise UserError(f"Workload.{what} has {len(inputs)} inputs but {len(targets)} targets")
        split = ArraySplit(inputs, targets)
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        split = DatasetSplit(data)
    else:
        raise UserError(f"Workload.{what} is a {type(data).__name__}: give a pair (inputs, targets) of tensors "
                        "or arrays, a map-style torch Dataset, or a Hugging Face dataset")
    if len(split) == 0:
        raise UserError(f"Workload.{what} is empty")
    return split


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


class _HFPairs(torch.utils.data.Dataset):
    """A Hugging Face dataset's rows as (input, target) pairs."""

    def __init__(self, data, columns: tuple[str, str]):
        self.data, self.columns = data, columns

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[int(i)]
        return torch.as_tensor(row[self.columns[0]]), torch.as_tensor(row[self.columns[1]])


def _tensor(value: Any, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{what} cannot become a tensor: {err}") from None
    return t.float() if t.dtype == torch.float64 else t


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    return list(model)


def _user_metrics(given: Callable[..., dict[str, torch.Tensor]], loss: Callable, keys: tuple[str, ...]) -> Metrics:
    """A Metrics from a function returning sums over a batch: each reported as its mean over the test split."""
    def sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**given(outputs, targets), "loss_sum": loss(outputs, targets).detach(),
                "count": torch.tensor(len(targets), device=targets.device)}

    def summarize(totals: dict[str, float]) -> dict[str, float]:
        n = max(totals.get("count", 0), 1)
        return {"test_loss": totals["loss_sum"] / n, **{f"test_{k}": totals[k] / n for k in keys}}

    return Metrics(("loss_sum", "count", *keys), sums, summarize)


def _check_targets(split: Split, task: str, what: str) -> Split:
    """Targets that fit the task: integer classes for classification; regression's become float."""
    sample = split.head(1).targets
    if task == "classification" and sample.is_floating_point():
        raise UserError(f"task 'classification' needs integer class labels as Workload.{what} targets, got "
                        f"{str(sample.dtype).removeprefix('torch.')} (for real-valued targets use task='regression')")
    if task == "regression" and not sample.is_floating_point() and isinstance(split, ArraySplit):
        return ArraySplit(split.inputs, split.targets.float(), split.prepare)
    return split


def _first_batch(model: nn.Module, loss: Callable, metrics: Metrics | Callable, split: Split):
    """Run the model, loss and metrics on two samples; a failure is the user's, named in one line."""
    sample = split.head(min(2, len(split)))
    x, y = sample.prepare(sample.inputs), sample.targets
    shape = "x".join(map(str, x.shape))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - whatever the user's forward raises is reported, not a traceback
        raise UserError(f"the model's forward failed on a batch of inputs shaped [{shape}]: {first_line(err)}") from None
    try:
        value = loss(out, y)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"the loss failed on the model's outputs shaped [{'x'.join(map(str, out.shape))}] and "
                        f"targets shaped [{'x'.join(map(str, y.shape))}]: {first_line(err)}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(f"the loss must return one number (the sum over the batch), got {shape}")
    if callable(metrics) and not isinstance(metrics, Metrics):
        try:
            found = metrics(out, y)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"Workload.metrics failed on the first batch: {first_line(err)}") from None
        if not isinstance(found, dict) or not found:
            raise UserError("Workload.metrics must return a dict {name: sum over the batch}")
        return tuple(found)
    return ()


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a user's error, reported)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def complete(w: Workload, seed: int, name: str) -> Workload:
    """``w`` with every field the run uses made concrete and checked (``name``: the dataset's default name)."""
    from dataclasses import replace

    model = w.model
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise UserError(f"Workload.model is a {type(model).__name__}: give an nn.Module or a function returning one")
        torch.manual_seed(seed)
        model = model()
        if not isinstance(model, nn.Module):
            raise UserError(f"Workload.model() returned a {type(model).__name__}, not an nn.Module")
    if w.task not in TASKS and (w.loss is None or w.metrics is None):
        raise UserError(f"unknown task {w.task!r}: choose one of {', '.join(TASKS)}, or give both loss and metrics")
    task_loss, task_metrics = TASKS.get(w.task, (None, None))
    loss = w.loss or task_loss
    train = _check_targets(to_split(w.train, "train", w.columns), w.task, "train")
    test = _check_targets(to_split(w.test, "test", w.columns), w.task, "test")
    metrics = w.metrics or task_metrics
    keys = _first_batch(model, loss, metrics, train)
    if not isinstance(metrics, Metrics):
        metrics = _user_metrics(metrics, loss, keys)
    layers = w.layers if w.layers is not None else sequential_layers if isinstance(model, nn.Sequential) else None
    return replace(w, model=model, train=train, test=test, loss=loss, metrics=metrics,
                   optimizer=optimizer_factory(w.optimizer) if w.optimizer is not adam else adam,
                   dataset=w.dataset or name, layers=layers)
