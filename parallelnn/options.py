"""The ``run`` options on the command line, generated from :class:`parallelnn.config.RunConfig`'s fields.

Grouped as a user looks for them (data, training, strategy, launch, checkpoints, gpt2 …), each with its
default; ``parallelnn run WORKLOAD --help`` leaves out the options of other built-in workloads. Verbs that
take a run's options (``run``, ``advise``) add them here and turn the parsed arguments into a RunConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from parallelnn import parallel, workloads
from parallelnn.config import RunConfig, config_fields, field_kind, load_toml, option_name, typed
from parallelnn.errors import UserError

GROUPS = (
    ("what and where", ("workload", "strategy", "device")),
    ("data", ("data", "download", "limit", "loader", "workers", "threads", "test_size")),
    ("training", ("epochs", "batch_size", "lr", "seed", "precision", "grad_accum", "max_grad_norm")),
    ("speed", ("compile", "cuda_graph", "tf32", "reduce_precision", "activation_checkpointing")),
    ("output and evaluation", ("out", "overwrite", "quiet", "log_every", "eval_every", "baseline", "tensorboard")),
    ("launch", ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_timeout", "max_restarts", "backend",
                "timeout")),
    ("strategy", ("mesh", "hybrid", "reshard_after_forward", "schedule", "microbatches", "split")),
    ("gpt2", ("model", "columns", "template", "context", "warmup_steps", "eval_pass_at_k")),
    ("checkpoints", ("checkpoint_every", "checkpoint_dir", "keep", "resume", "allow_changes")),
)


def _group_of(name: str) -> str:
    return next((title for title, names in GROUPS if name in names), "other")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default not in (None, False) and not f.metadata.get("positional"):
        shown = "on" if f.default is True else f.default
        text += f" (default: {shown})"
    if f.name == "strategy":
        text += ": " + "; ".join(f"{s.name}: {s.summary}" for s in parallel.registry().values())
    return text.replace("%", "%%").replace("%%%%", "%%")


def add_run_options(p: argparse.ArgumentParser, workload: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Every run option, in groups; ``workload``: hide the options of the other built-in workloads."""
    p.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                   help="read options from a TOML file, at the top level or under [run] (flags given here win)")
    groups = {title: p.add_argument_group(title) for title, _ in GROUPS}
    hidden = workloads.foreign_options(workload) if workload else set()
    for f in config_fields():
        if f.name in skip:
            continue
        meta = f.metadata
        group = groups.get(_group_of(f.name)) or p
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": argparse.SUPPRESS if f.name in hidden else _help(f)}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if f.name == "strategy":  # the strategies are the modules of parallelnn.parallel
            kwargs["choices"] = parallel.names()
        if meta.get("positional"):
            group.add_argument(f.name, nargs="?", **{**kwargs, "default": None})
        elif meta.get("flag"):
            group.add_argument(option_name(f.name), action="store_true", **kwargs)
        elif meta.get("negatable"):
            group.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(option_name(f.name), type=_parse(f), metavar=meta.get("metavar"), **kwargs)


def _parse(f: dataclasses.Field):
    kind = field_kind(f)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
        if kind is float and value != value:  # NaN is never a setting
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        return value

    parse.__name__ = kind.__name__
    return parse if kind in (int, float) else str


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(load_toml(ns.config))
    known = {f.name for f in config_fields()}
    values.update({k: v for k, v in vars(ns).items() if k in known and v is not None})
    for name, value in values.items():
        typed(name, value, "options")
    try:
        return RunConfig(**values)
    except TypeError as err:
        raise UserError(f"bad configuration: {err}") from None
