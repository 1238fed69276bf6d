"""Workloads: what is trained. A name (``iris``, ``mnist``, ``gpt2``) or a user's ``FILE.py:FUNCTION`` /
``package.module:FUNCTION`` leads to a function of the run's config returning a :class:`parallelnn.Workload`.

A workload knows its data, model, loss, optimizer and evaluation metrics, and nothing about how the
work is spread over processes; strategies (``parallel/``) know nothing about any one workload. The
built-in ones are written against the same public contract as users' own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallelnn.data.loaders import ArraySplit
from parallelnn.errors import UserError
from parallelnn.workload import Metrics, TensorPlan, Workload, adam, complete, first_line, sequential_layers  # noqa: F401
from parallelnn.tasks import ACCURACY, classification_loss

BUILTIN = {
    "iris": "parallelnn.workloads.iris",
    "mnist": "parallelnn.workloads.mnist",
    "gpt2": "parallelnn.workloads.gpt2",
}
#: Options only some built-in workloads read (the others refuse them); a user's workload may read any.
OPTIONS = {"iris": (), "mnist": ("download",),
           "gpt2": ("model", "columns", "template", "test_size", "context", "warmup_steps", "eval_pass_at_k")}
#: The settings the study used for its classifiers.
STUDY_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "log_every": 0, "max_grad_norm": 0.0}


def is_spec(name: str) -> bool:
    """``FILE.py:FUNCTION`` or ``package.module:FUNCTION`` (a built-in name has no colon)."""
    return ":" in name


def check_name(name: str | None) -> None:
    """Refuse, in one line, a workload that cannot be found (before anything starts)."""
    if name is None:
        raise UserError("no workload given: choose one of " + ", ".join(BUILTIN) + ", or give FILE.py:FUNCTION")
    if name in BUILTIN:
        return
    if not is_spec(name):
        raise UserError(f"unknown workload '{name}': choose one of {', '.join(BUILTIN)}, or give your own as "
                        "FILE.py:FUNCTION or package.module:FUNCTION")
    where, _, function = name.rpartition(":")
    if not where or not function.isidentifier():
        raise UserError(f"workload '{name}' is not of the form FILE.py:FUNCTION or package.module:FUNCTION")
    if where.endswith(".py") and not Path(where).is_file():
        raise UserError(f"workload '{name}': no file {where}")


def foreign_options(name: str | None) -> set[str]:
    """Options of other built-in workloads that ``name`` does not read (none for a user's workload)."""
    if name not in BUILTIN:
        return set()
    return {o for opts in OPTIONS.values() for o in opts} - set(OPTIONS[name])


def check_options(cfg) -> None:
    """Refuse an option the workload does not read, naming the workloads that do."""
    from parallelnn.config import FIELDS, option_name

    for name in sorted(foreign_options(cfg.workload)):
        if getattr(cfg, name) != FIELDS[name].default:
            users = [w for w, opts in OPTIONS.items() if name in opts]
            raise UserError(f"{option_name(name)} applies to the {' and '.join(users)} workload"
                            f"{'s' if len(users) > 1 else ''} only, not {cfg.workload}")


def builder(name: str) -> Callable[..., Workload]:
    """The function that builds workload ``name``: ``build(cfg, device, log)`` for built-ins, the user's
    ``FUNCTION(cfg)`` otherwise."""
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name]).build
    check_name(name)
    where, _, function = name.rpartition(":")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"workload '{name}': {where} has no function {function}")
    return lambda cfg, device, log: fn(cfg)


def _import_file(path: str):
    """Import a user's file as a module (its folder first on sys.path, so it may import its neighbours)."""
    full = Path(path).resolve()
    module_name = "parallelnn_user_" + hashlib.sha256(str(full).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, full)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(full.parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module failing to import is their error, in one line
        del sys.modules[module_name]
        raise UserError(f"importing {path} failed: {first_line(err)}") from None
    return module


def _import_module(name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: packages in the current directory
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise UserError(f"no module {name} ({err})") from None
    except Exception as err:  # noqa: BLE001
        raise UserError(f"importing {name} failed: {first_line(err)}") from None


def build(name: str, cfg, device: torch.device, log, fn: Callable[[Any], Workload] | None = None) -> Workload:
    """Build workload ``name`` (or call ``fn(cfg)``, from the Python API) for ``cfg``, seeded first so every
    rank builds the same, and complete it."""
    make = builder(name) if fn is None else (lambda cfg, device, log: fn(cfg))
    torch.manual_seed(cfg.seed)
    try:
        made = make(cfg, device, log)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's build function that raises: its name and first line
        if name in BUILTIN:
            raise
        raise UserError(f"workload '{name}' raised {first_line(err)}") from None
    if not isinstance(made, Workload):
        raise UserError(f"workload '{name}' returned a {type(made).__name__}, not a parallelnn.Workload")
    workload = complete(made, cfg.seed, name)
    if is_spec(name):
        workload.facts = {**workload.facts, **provenance(name)}
    return workload


def provenance(name: str) -> dict[str, Any]:
    """The record's note of a user's workload: the spec and the SHA-256 of the file that defined it."""
    where = name.rpartition(":")[0]
    path = Path(where) if where.endswith(".py") else None
    if path is None:
        spec = importlib.util.find_spec(where)
        path = Path(spec.origin) if spec and spec.origin else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return {"workload_spec": name, "workload_file": str(path.resolve()) if path else None, "workload_sha256": digest}


def classifier(model: nn.Sequential, train: ArraySplit, test: ArraySplit, dataset: str, epochs: int) -> Workload:
    """A study-style classifier: cross-entropy, Adam, accuracy, its Sequential layers for pipelining."""
    return Workload(model=model, train=train, test=test, dataset=dataset, loss=classification_loss,
                    metrics=ACCURACY, optimizer=adam, epochs=epochs, **STUDY_DEFAULTS)
