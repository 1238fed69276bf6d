"""Processes: spawn ranks through torchrun, or join the ranks torchrun/SLURM started; init and teardown.

* ``parallelnn run ... --nproc N [--nnodes M --rdzv-endpoint HOST:PORT]`` starts torchrun's elastic
  agent in this process (``torch.distributed.launcher.api.elastic_launch``, the code behind the
  ``torchrun`` command) which starts N ranks of ``python -m parallelnn run ...`` and restarts them up
  to ``--max-restarts`` times. A failing rank brings the others down (torchrun's behaviour).
* ``--nnodes M`` uses torchrun's static rendezvous (as ``torchrun --node-rank``): the machine given
  ``--node-rank I`` holds global ranks ``I*nproc ...``, so node 0 holds rank 0, the record and the
  output, whichever machine starts first; each node prints its ranks and where the record goes.
* A process that finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun), or ``SLURM_PROCID`` in an
  srun step (``SLURM_STEP_ID``, ``SLURM_STEP_NUM_TASKS``), is one rank of a job already started: it
  joins. ``SLURM_NTASKS`` above 1 outside an srun step (an sbatch script run without srun) is
  refused at once: no other rank would ever join.
* A one-process job of a distributed strategy (``--strategy ddp --nproc 1``) runs in this process
  with a one-rank process group: no launcher start-up to pay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from parallelnn.errors import EXIT_USER_ERROR, UserError

from parallelnn.config import QUIET_CPP_ENV, SPAWNED_ENV, T0_ENV  # noqa: F401 - used by the ranks' code


@dataclass
class Context:
    """Who this process is in the job, and on which device it computes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    distributed: bool = False
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi_rank(self) -> bool:
        """Several ranks in a process group: collectives are needed (a one-rank group needs none)."""
        return self.distributed and self.world_size > 1

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))


def job_env() -> dict[str, int] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE of a job started by torchrun or srun, else None."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        world = int(env["WORLD_SIZE"])
        return {"rank": int(env["RANK"]), "world_size": world, "local_rank": int(env["LOCAL_RANK"]),
                "local_world_size": int(env.get("LOCAL_WORLD_SIZE", world))}
    world = slurm_step_tasks(env) if "SLURM_PROCID" in env else 1
    if world > 1:
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world // max(nodes, 1)
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host()
        env.setdefault("MASTER_PORT", "29500")
        job = {"rank": int(env["SLURM_PROCID"]), "world_size": world,
               "local_rank": int(env.get("SLURM_LOCALID", "0")), "local_world_size": local_world}
        for key, value in (("RANK", "rank"), ("WORLD_SIZE", "world_size"), ("LOCAL_RANK", "local_rank"),
                           ("LOCAL_WORLD_SIZE", "local_world_size")):
            env[key] = str(job[value])
        return job
    return None


# Step ids Slurm gives the batch script, the extern step, an interactive salloc shell and the like:
# not an srun step whose tasks could be ranks (0xfffffff0 and above).
SLURM_SPECIAL_STEPS = 0xFFFFFFF0


def slurm_step_tasks(env) -> int:
    """The tasks of the srun step this process is one of (1 outside any step).

    ``SLURM_NTASKS`` alone proves nothing: ``sbatch --ntasks 2`` sets it in the batch script too, where
    one process runs. Rank 0 would then wait ~10 minutes for a rank that never starts. Only srun starts
    the tasks, and it marks each with ``SLURM_STEP_ID`` and ``SLURM_STEP_NUM_TASKS``; without them, a
    promise of several tasks is refused at once with what to run instead.
    """
    ntasks = env.get("SLURM_STEP_NUM_TASKS")
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    try:
        in_step = step is not None and ntasks is not None and int(step) < SLURM_SPECIAL_STEPS
        promised = int(env.get("SLURM_NTASKS", "1"))
        if in_step:
            return int(ntasks)
    except ValueError:
        raise UserError(f"unreadable Slurm variables: SLURM_STEP_ID={step!r}, SLURM_STEP_NUM_TASKS={ntasks!r}, "
                        f"SLURM_NTASKS={env.get('SLURM_NTASKS')!r}") from None
    if promised > 1:
        why = f"SLURM_STEP_ID={step}, the batch script's" if step is not None else "SLURM_STEP_ID unset"
        raise UserError(f"SLURM_NTASKS={promised} promises {promised} tasks, but this process was not started by "
                        f"srun ({why}), so no other rank would join: run `srun parallelnn run ...` to start all "
                        f"{promised} (or `parallelnn run ... --nproc N` to start N processes here)")
    return 1


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if nodelist and "[" not in nodelist:
        return nodelist.split(",")[0]
    raise UserError("under SLURM without MASTER_ADDR and no scontrol to read the node list: set MASTER_ADDR")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def job_store(prefix: str, restart: int, timeout: timedelta) -> dist.Store:
    """A client of the job's key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT), with keys kept
    apart per ``prefix`` and per attempt (``restart``)."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"{prefix}/attempt-{restart}", client)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an absent device is a UserError."""
    has_cuda = torch.cuda.is_available()
    has_mps = mps_available()
    if name == "auto":
        name = "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if name == "cuda":
        if not has_cuda:
            raise UserError("--device cuda: no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        return torch.device("cuda", local_rank % count)
    if name == "mps":
        if not has_mps:
            raise UserError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend(backend: str | None, device: torch.device) -> str:
    backend = backend or default_backend(device)
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"--backend nccl needs CUDA devices, but this run uses {device.type}; use gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise UserError("--backend nccl: this torch build has no NCCL")
    return backend


def set_threads(threads: int | None, local_world_size: int) -> int:
    """Intra-op threads: as asked, else this machine's cores shared evenly among its local ranks."""
    n = threads or max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(n)
    keep_freed_memory()
    return n


# The cores this process could use before bind_cores narrowed them (None: not bound).
_UNBOUND: set[int] | None = None


def bind_cores(local_rank: int, local_world_size: int) -> list[int] | None:
    """Rank ``local_rank`` of a machine's ``local_world_size`` computes on its own contiguous share of the cores
    (Linux ``sched_setaffinity``, every thread of the process; as DeepSpeed's ``--bind_cores_to_rank`` and
    Intel's CPU launcher do). Two ranks on two cores left to the scheduler stepped 13-25 % slower here (DDP,
    FSDP, tensor parallelism; pipelines the same) and varied more. Not so for every schedule: on 2026-12-08
    (MNIST, 50 steps, two runs each) bound DDP stepped in 13-15 ms against 16, FSDP and tensor parallelism the
    same either way, but interleaved 1F1B at 8 microbatches 80-82 ms against 53-55 unbound (a bound rank's
    gloo thread waits for the core its rank computes on: ``benchmarks/busy_pingpong.py``). More ranks than
    cores: one core each, in turn.
    Nothing is changed for a single rank, where the system has no affinity call, or where the process was
    already held to fewer cores than the machine has (a launcher's or Slurm's own binding). Returns the cores
    bound to, or None."""
    global _UNBOUND
    if local_world_size < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    if _UNBOUND is None:  # the first binding: only of a process that may use the whole machine
        allowed = set(os.sched_getaffinity(0))
        if len(allowed) < (os.cpu_count() or 0):
            return None
        _UNBOUND = allowed
    every = sorted(_UNBOUND)
    per = len(every) // local_world_size
    mine = every[local_rank * per:(local_rank + 1) * per] if per else [every[local_rank % len(every)]]
    set_affinity(mine)
    return mine


def cores() -> list[int] | None:
    """The cores this process may run on (None where the system does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def set_affinity(cores) -> None:
    """Every thread of this process (the compute pool and gloo's, already started) on ``cores``."""
    tasks = Path("/proc/self/task")
    for tid in (os.listdir(tasks) if tasks.is_dir() else ["0"]):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # the thread ended meanwhile
            pass


@contextlib.contextmanager
def unbound():
    """Meanwhile, every core this process could use before :func:`bind_cores` (a whole machine's peak is probed
    so); then its own share again."""
    if _UNBOUND is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    set_affinity(_UNBOUND)
    try:
        yield
    finally:
        set_affinity(mine)


_MALLOC_SET: bool | None = None


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc's malloc reuse freed activation buffers instead of returning them to the kernel.

    By default glibc serves every allocation above 128 KiB-32 MiB (adapting) with a fresh mmap and
    gives it back on free, so each training step pays page faults to re-zero its activations: on the
    MNIST CNN that is ~40% of CPU step time (measured, benchmarks/mnist_cpu.py). Raising the mmap and
    trim thresholds keeps those pages in the process, as jemalloc or tcmalloc would. No-op elsewhere.

    Once per process: ``mallopt`` is not thread-safe (glibc manual: MT-Unsafe), so the command line calls
    this first thing, before torch's thread pools, gloo's or the watchdog's threads exist; later calls
    change nothing.
    """
    global _MALLOC_SET
    if _MALLOC_SET is not None:
        return _MALLOC_SET
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _MALLOC_SET = False
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _MALLOC_SET = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _MALLOC_SET


def init(cfg, device_name: str, needs_group: bool) -> Context:
    """Join (or create) the process group for this rank and pick its device (``needs_group``: the
    strategy runs collectives even with one process)."""
    job = job_env()
    if job is None:
        device = resolve_device(device_name)
        ctx = Context(device=device)
        if needs_group:  # one-rank job of a distributed strategy, in this process
            backend = check_backend(cfg.backend, device)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=cfg.timeout))
            ctx.distributed = True
        return ctx
    device = resolve_device(device_name, job["local_rank"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if job["world_size"] == 1 and not needs_group:  # one process under torchrun (e.g. for --max-restarts)
        return Context(device=device, restart_count=restart, **job)
    backend = check_backend(cfg.backend, device)
    # The watchdog (watchdog.py) names a hung rank after --timeout; the group's own timeout is the
    # backstop behind it, so it is longer.
    timeout = timedelta(seconds=2 * cfg.timeout + 10)
    store = None
    if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After a restart, torchrun's agent store still holds the dead attempt's keys (gloo peers'
        # addresses among them), and new ranks would connect to processes that are gone. A prefix per
        # attempt keeps each attempt's keys apart.
        store = job_store("parallelnn", restart, timeout)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                            store=store, rank=job["rank"] if store else -1,
                            world_size=job["world_size"] if store else -1)
    return Context(device=device, distributed=True, restart_count=restart, **job)


def agree(obj, ctx: Context):
    """Rank 0's value of ``obj`` on every rank (``obj`` as is without other ranks)."""
    if not ctx.multi_rank:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, ctx: Context) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.multi_rank:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


_ENDS_WITH_COMMAND = False
_KEPT: list = []  # what a rank that ends with its command never tears down


def is_rank_of_a_job() -> bool:
    try:
        job = job_env()
    except UserError:  # e.g. sbatch without srun: the command itself says so, in one line
        return False
    return job is not None and job["world_size"] > 1


def end_with_command() -> None:
    """This process is a rank of a multi-process job and ends when its command returns (``end_process``):
    its process groups are then never destroyed (``finish``).

    Destroying them buys nothing at exit, and has aborted ranks here: ~2 % of two-rank runs (2 of 120, and
    in CI) ended in SIGABRT after their work was written. Core dumps show where: ``~ProcessGroupGloo`` of
    the stop flag's gloo group, the last one freed, joins gloo's tcp transport thread, and that thread's
    exit finds a chunk in its malloc cache that glibc had already handed back to another arena (its heap
    top, zeroed): "tcache_thread_shutdown(): unaligned tcache chunk detected", a chunk freed twice inside
    gloo. Never tearing the groups down removes every such thread exit; the job's output and exit status
    are the same. A process that lives on (the Python API, a single process) still tears down."""
    global _ENDS_WITH_COMMAND
    _ENDS_WITH_COMMAND = True


def finish(*alive) -> None:
    """The end of a rank's work: tear its process groups down, or, in a rank that ends with its command,
    keep them and ``alive`` (which hold more groups: meshes, the stop flag's) until the process ends."""
    if _ENDS_WITH_COMMAND:
        _KEPT.extend(alive)
        return
    teardown()


def end_process(code: int) -> None:
    """End this process now with ``code``, after flushing, without the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Free pipeline stages and meshes still holding process groups before the groups go:
        # a group destroyed at interpreter exit may abort ("terminate called without an active exception").
        import gc

        gc.collect()
        dist.destroy_process_group()


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def no_peers(group) -> bool:
    """Whether ``group`` is a fake process group (advise's one-process calibration, rank 0 of N standing for
    all): its collectives return at once and its receives leave their buffers as they were."""
    import torch.distributed as dist

    return dist.get_backend(group) == "fake"


# -- spawning ------------------------------------------------------------------------------------

class LaunchFailed(Exception):
    def __init__(self, message: str, exit_code: int, stopped: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.stopped = stopped  # stopped on request (a signal), not an error


# What ranks report when a *peer* died first: consequences, not causes.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe",
             "NCCL communicator was aborted")


def failure_message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "")
    return "" if message.startswith("To enable traceback") else " ".join(message.split())


def root_failure(failures: dict):
    """The failed rank that caused the others to fail: the earliest whose error is not a peer's."""
    import re
    import signal

    # Ranks that left a message of their own first (others may have been ended by the one that did:
    # torchrun's "Signal 9 (SIGKILL) received by PID ..." is not one), then by time (whole seconds).
    def own_message(failure) -> bool:
        message = failure_message(failure)
        return bool(message) and not re.match(r"Signal \d+ \(\w+\) received by PID", message)

    ordered = sorted(failures.items(), key=lambda kv: (not own_message(kv[1]), kv[1].timestamp, kv[0]))
    for rank, failure in ordered:
        stopped_by_agent = failure.exitcode == -signal.SIGTERM  # torchrun stops the survivors so
        if not stopped_by_agent and not any(marker in failure_message(failure) for marker in PEER_GONE):
            return rank, failure
    return ordered[0]


def _reason(err: BaseException) -> str:
    """One line saying why: the innermost cause, which names the real problem."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_in_exit_barrier(endpoint: str, run_id: str, nnodes: int) -> None:
    """Count this failed node in torchrun's exit barrier, so node 0's agent does not wait for it.

    torch elastic's agent (``SimpleElasticAgent._invoke_run``) enters its exit barrier (a count on the
    rendezvous store, ``torchelastic/agent/terminal_state``, up to ``exit_barrier_timeout``: 300 s) only
    when its own ranks succeeded; an agent whose ranks failed returns at once without checking in. So when
    a rank on node I > 0 fails after node 0's ranks finished (e.g. a rank aborting at exit), node 0's agent,
    which hosts the store, waits the full 300 s for a node that has already gone, then says nothing.
    Best effort, in a few seconds: node 0 may have failed and gone too.
    """
    from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
    from torch.distributed.elastic.utils.store import _barrier_nonblocking

    host, _, port = endpoint.rpartition(":")
    try:
        client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=3))
        _barrier_nonblocking(dist.PrefixStore(run_id, client), nnodes, _TERMINAL_STATE_SYNC_ID)
    except Exception:  # noqa: BLE001 - node 0 is gone: nobody waits
        pass


def spawn(cfg, argv: list[str]) -> None:
    """Run ``python -m parallelnn <argv>`` as ``cfg.nproc`` ranks on this node through torchrun's agent."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun's agent logs every state change (each of its loggers has its own level); our users want
    # our one-line messages instead.
    import torch.distributed.elastic.agent.server.api  # noqa: F401 - create the agent's loggers now

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    timeout = int(max(cfg.rdzv_timeout, 1))
    if cfg.nnodes > 1:
        # torchrun's static rendezvous, as `torchrun --node-rank`: the machine given --node-rank I holds
        # global ranks I*nproc ... I*nproc+nproc-1, so --node-rank 0 holds rank 0 and with it the record
        # and the output. (The c10d rendezvous ranks machines in the order they join, by host name and
        # process id: on one host, or with --node-rank 1 started first, rank 0 could land anywhere.)
        # Node 0 hosts the store at the endpoint and waits up to --rdzv-timeout for the others, which
        # only connect to it.
        endpoint, run_id = cfg.rdzv_endpoint, "parallelnn-" + cfg.rdzv_endpoint.replace(":", "-")
        backend, rdzv_configs = "static", {"rank": cfg.node_rank, "timeout": timeout}
    else:  # like torchrun --standalone: a private rendezvous on a free local port
        endpoint, run_id = "localhost:0", f"parallelnn-{uuid.uuid4().hex[:8]}"
        backend = "c10d"
        rdzv_configs = {"join_timeout": timeout, "read_timeout": timeout, "last_call_timeout": 1}
    config = LaunchConfig(
        min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=cfg.nproc, run_id=run_id,
        rdzv_endpoint=endpoint, rdzv_backend=backend, rdzv_configs=rdzv_configs,
        max_restarts=cfg.max_restarts, monitor_interval=0.1, start_method="spawn",
    )
    os.environ[SPAWNED_ENV] = "1"
    if os.environ.get(QUIET_CPP_ENV):  # the CLI quieted this process's C++ log; the ranks keep theirs
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    try:
        elastic_launch(config, sys.executable)("-m", "parallelnn", *argv)
    except SignalException as err:  # this launcher was told to stop: the ranks saved a checkpoint
        raise LaunchFailed(f"stopped by {signal.Signals(err.sigval).name}", 128 + err.sigval, stopped=True) from None
    except ChildFailedError as err:
        if cfg.nnodes > 1 and cfg.node_rank != 0:
            _check_in_exit_barrier(endpoint, run_id, cfg.nnodes)
        codes = {f.exitcode for f in err.failures.values()}
        stop_codes = {128 + signal.SIGTERM, 128 + signal.SIGINT}
        if codes <= stop_codes:  # every failed rank stopped on a signal, after saving a checkpoint
            raise LaunchFailed("stopped by a signal", codes.pop(), stopped=True) from None
        rank, failure = root_failure(err.failures)
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        what = failure_message(failure)
        for kind in ("UserError: ", "OutputError: "):  # the rank's own one-line error, as a single process says it
            if what.startswith(kind) and failure.exitcode in (1, EXIT_USER_ERROR):
                raise LaunchFailed(what[len(kind):], failure.exitcode) from None
        raise LaunchFailed(f"rank {rank} failed (exit code {failure.exitcode})" + (f": {what}" if what else ""),
                           code) from None
    except RendezvousError as err:
        hint = (f" (fewer than --nnodes {cfg.nnodes} machines joined)" if "Timeout" in type(err).__name__ else "")
        raise LaunchFailed(f"rendezvous at {endpoint} failed (--rdzv-timeout {timeout}s): {_reason(err)}{hint}",
                           EXIT_USER_ERROR) from None
    except dist.DistError as err:  # the static rendezvous' store: node 0 absent, or not all machines came
        who = ("the other machines did not all join" if cfg.node_rank == 0
               else "no node 0 answered; start the command with --node-rank 0 on the endpoint's machine")
        raise LaunchFailed(f"rendezvous at {endpoint} failed (--rdzv-timeout {timeout}s): {who} "
                           f"({_reason(err)})", EXIT_USER_ERROR) from None
    except (RuntimeError, TimeoutError, ValueError) as err:
        raise LaunchFailed(f"could not start the job through {endpoint}: {_reason(err)}", EXIT_USER_ERROR) from None
    finally:
        os.environ.pop(SPAWNED_ENV, None)
    if cfg.nnodes > 1 and not cfg.quiet:
        first = cfg.node_rank * cfg.nproc
        where = ("here" if cfg.node_rank == 0 else f"on node 0 (--node-rank 0, {endpoint.rpartition(':')[0]})")
        print(f"node {cfg.node_rank} of {cfg.nnodes}: global ranks {first}..{first + cfg.nproc - 1} finished; "
              f"global rank 0 writes the record {where}: {os.path.join(cfg.out, 'record.json')}", flush=True)
