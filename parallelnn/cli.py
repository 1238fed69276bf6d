"""The ``parallelnn`` command: parse, then hand over. Verbs: run, bench, report, info, generate.

``run``'s options are generated from :class:`parallelnn.config.RunConfig`'s fields; each verb's
work lives in its own module. Every user error ends as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from parallelnn import __version__
from parallelnn.config import QUIET_CPP_ENV, T0_ENV, suggest
from parallelnn.errors import EXIT_USER_ERROR, UserError, report_user_error


# Modules that add a verb besides ``run`` (each has ``add_parser(verbs)``).
VERBS = ("bench", "report", "info", "generate", "advise.advisor")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit 2), not a usage dump; options are
    never abbreviated (``--epoch`` is not taken for ``--epochs``), and a mistyped one gets a suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        verb = self.prog.removeprefix("parallelnn").strip()
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            option = next((a.split("=")[0] for a in unknown if a.startswith("--")), None)
            if option:
                known = _long_options(self)
                message = f"unknown option {option}" + suggest(option, known)
        raise UserError(f"{verb + ': ' if verb else ''}{message}")


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every --option of ``parser`` and of its verbs' parsers."""
    found = []
    for action in parser._actions:
        found += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _long_options(sub)
    return sorted(set(found))


def build_parser(workload: str | None = None) -> Parser:
    """The command's parser; ``workload``: ``run WORKLOAD --help`` shows that workload's options only."""
    # Imported here, not at the top: it imports torch, and main() quiets torch's C++ log before torch loads.
    from parallelnn.options import add_run_options
    parser = Parser(prog="parallelnn", description="Train under interchangeable parallel strategies and "
                                                   "measure which one pays off.")
    parser.add_argument("--version", action="version", version=f"parallelnn {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)

    run = verbs.add_parser("run", help="train a workload and write its record",
                           description="Train a workload under a strategy; writes OUT/record.json and "
                                       "OUT/metrics.jsonl.")
    add_run_options(run, workload)
    run.set_defaults(handler=cmd_run)

    import importlib

    for name in VERBS:  # each verb's module adds its own sub-parser
        importlib.import_module(f"parallelnn.{name}").add_parser(verbs)
    return parser


def cmd_run(ns: argparse.Namespace) -> int:
    from parallelnn.options import config_from_args
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
    from parallelnn import launch

    launch.keep_freed_memory()  # before any thread exists (mallopt is not thread-safe; see there)
    # A rank of a multi-process job run as a program (by torchrun, srun, or `run --nproc`) ends its
    # process itself when its command returns, its process groups never torn down (launch.end_with_command).
    rank_process = argv is None and launch.is_rank_of_a_job()
    if rank_process:
        launch.end_with_command()
    code = _command(argv)
    if rank_process:
        launch.end_process(code)
    return code


def _command(argv: list[str] | None) -> int:
    try:
        ns = build_parser(_help_workload(argv)).parse_args(argv)
        if not getattr(ns, "handler", None):
            build_parser().print_help()
            return EXIT_USER_ERROR
        return ns.handler(ns) or 0
    except UserError as err:
        return report_user_error(err)
    except KeyboardInterrupt:
        print("parallelnn: interrupted", file=sys.stderr)
        return 130


def _help_workload(argv: list[str] | None) -> str | None:
    """The workload of ``run WORKLOAD --help``, so that help shows that workload's options."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 3 and args[0] == "run" and ("-h" in args or "--help" in args) and not args[1].startswith("-"):
        return args[1]
    return None


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
