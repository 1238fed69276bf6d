"""``parallelnn.run``: the ``run`` verb from Python, for scripts and notebooks.

    import parallelnn
    record = parallelnn.run("examples/digits_cnn.py:build", strategy="ddp", nproc=2, epochs=3)
    record = parallelnn.run(build, epochs=3)          # a function of the config returning a Workload
    record = parallelnn.run(parallelnn.Workload(...)) # or a Workload itself (one process)

Options are named as the command line's (``batch_size=`` for ``--batch-size``). The run writes its
directory as the command does and returns the record as a dict. Bad options or data raise
:class:`parallelnn.errors.UserError` with the same one-line message the command prints.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from parallelnn.config import RunConfig, config_fields
from parallelnn import launch
from parallelnn.errors import EXIT_USER_ERROR, UserError
from parallelnn.workload import Workload


def spec_of(fn: Callable[..., Any]) -> str | None:
    """``package.module:function`` when ranks started by torchrun could import ``fn`` the same way, else None."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in name or "." in name:
        return None
    try:
        if getattr(importlib.import_module(module), name, None) is fn:
            return f"{module}:{name}"
    except Exception:  # noqa: BLE001 - not importable by name: the caller says how to fix it
        return None
    return None


def _config(workload_name: str, options: dict[str, Any]) -> RunConfig:
    known = {f.name for f in config_fields()} - {"workload"}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise UserError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return RunConfig(workload=workload_name, **options)


def run(workload: str | Callable[..., Workload] | Workload, **options: Any) -> dict[str, Any]:
    """Train ``workload`` (a spec such as ``"my_task.py:build"``, a build function, or a Workload) with the
    ``run`` verb's options; write the run directory; return the record."""
    from parallelnn import runner

    given: Callable[..., Workload] | None = None
    if isinstance(workload, str):
        name = workload
    else:
        if isinstance(workload, Workload):
            made = workload
            given, name = (lambda cfg: made), "python:Workload"
        elif callable(workload):
            given, name = workload, spec_of(workload) or f"python:{getattr(workload, '__qualname__', 'build')}"
        else:
            raise UserError(f"parallelnn.run takes a spec 'FILE.py:FUNCTION', a build function or a Workload, "
                            f"not a {type(workload).__name__}")
        if not name.startswith("python:"):
            given = None  # importable by name: every rank imports it the same way
    cfg = _config(name, options)
    if given is not None and cfg.world_size > 1:
        raise UserError(f"nproc={cfg.nproc}: the ranks are new processes and cannot see a {type(workload).__name__} "
                        "made in this one (e.g. in a notebook cell): put `def build(cfg): return Workload(...)` in a "
                        "file and call parallelnn.run('that_file.py:build', ...)")
    cfg.command = f"parallelnn.run({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
    runner.check(cfg, skip_workload=given is not None)
    try:
        record = runner.execute(cfg, build=given) if given is not None else runner.run_job(cfg)
    except (launch.LaunchFailed, runner.Stopped) as err:  # the one line the command would print
        raise (UserError if err.exit_code == EXIT_USER_ERROR else RuntimeError)(str(err)) from None
    if record is None:
        raise UserError("the run wrote no record")
    return record
