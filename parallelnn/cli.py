"""The ``parallelnn`` command: parse, then hand over. Verbs: run, bench, report, info, generate.

``run``'s options are generated from :class:`parallelnn.config.RunConfig`'s fields; each verb's
work lives in its own module. Every user error ends as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

from parallelnn import __version__, parallel
from parallelnn.config import QUIET_CPP_ENV, T0_ENV, RunConfig, config_fields, load_toml, option_name
from parallelnn.errors import EXIT_USER_ERROR, UserError, report_user_error


# Modules that add a verb besides ``run`` (each has ``add_parser(verbs)``).
VERBS = ("bench", "report", "info", "generate")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit 2), not a usage dump."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    return int if "int" in text else float if "float" in text else str


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                   help="read options from a TOML file (flags given here win)")
    for f in config_fields():
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if f.name == "strategy":  # the strategies are the modules of parallelnn.parallel
            kwargs["choices"] = parallel.names()
        if meta.get("positional"):
            p.add_argument(f.name, nargs="?", **{**kwargs, "default": None})
        elif meta.get("flag"):
            p.add_argument(option_name(f.name), action="store_true", **kwargs)
        elif meta.get("negatable"):
            p.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            p.add_argument(option_name(f.name), type=_field_type(f), metavar=meta.get("metavar"), **kwargs)


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(load_toml(ns.config))
    known = {f.name for f in config_fields()}
    values.update({k: v for k, v in vars(ns).items() if k in known and v is not None})
    try:
        return RunConfig(**values)
    except TypeError as err:
        raise UserError(f"bad configuration: {err}")


def build_parser() -> Parser:
    parser = Parser(prog="parallelnn", description="Train under interchangeable parallel strategies and "
                                                   "measure which one pays off.")
    parser.add_argument("--version", action="version", version=f"parallelnn {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)

    run = verbs.add_parser("run", help="train a workload and write its record",
                           description="Train a workload under a strategy; writes OUT/record.json and "
                                       "OUT/metrics.jsonl.")
    add_run_options(run)
    run.set_defaults(handler=cmd_run)

    import importlib

    for name in VERBS:  # each verb's module adds its own sub-parser
        importlib.import_module(f"parallelnn.{name}").add_parser(verbs)
    return parser


def cmd_run(ns: argparse.Namespace) -> int:
    from parallelnn.runner import check, run_command

    cfg = config_from_args(ns)
    cfg.command = "parallelnn " + " ".join(_quote(a) for a in sys.argv[1:])
    return run_command(check(cfg))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def main(argv: list[str] | None = None) -> int:
    if "RANK" in os.environ:  # a rank: start-up counts from the command that launched the job
        os.environ.setdefault(T0_ENV, str(_process_start()))
    else:  # a command of its own (even when run by another parallelnn command, as bench does)
        os.environ[T0_ENV] = str(_process_start())
    if "TORCH_CPP_LOG_LEVEL" not in os.environ and "torch" not in sys.modules:
        # torch's C++ side warns with stack dumps (e.g. every retry to reach a rendezvous); the
        # command speaks for itself in one line. Ranks it spawns keep torch's default.
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
        os.environ[QUIET_CPP_ENV] = "1"
    try:
        ns = build_parser().parse_args(argv)
        if not getattr(ns, "handler", None):
            build_parser().print_help()
            return EXIT_USER_ERROR
        return ns.handler(ns) or 0
    except UserError as err:
        return report_user_error(err)
    except KeyboardInterrupt:
        print("parallelnn: interrupted", file=sys.stderr)
        return 130


def _process_start() -> float:
    """When this process started (Linux: from /proc), so start-up time includes Python's imports."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
