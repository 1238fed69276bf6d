"""Launching: bad layouts refused before any process starts, a failing rank ends the job with its
message, an unreachable rendezvous times out, and two machines (two launches on 127.0.0.1) train."""

import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, cli, main, record
from parallelnn import launch

pytestmark = pytest.mark.distributed

BEFORE_SPAWN = {
    "more stages than layers": (["run", "iris", "--strategy", "pipeline", "--nproc", "3"],
                                "3 pipeline stages but the iris model has only 2 layers"),
    "microbatches": (["run", "mnist", "--strategy", "pipeline", "--nproc", "2", "--microbatches", "5"],
                     "--microbatches 5 does not divide the per-rank batch of 64"),
    "tensor degree": (["run", "iris", "--strategy", "tensor", "--nproc", "3"],
                      "tensor-parallel degree 3 does not divide layer 0's 50 features"),
    "mesh product": (["run", "mnist", "--strategy", "hybrid", "--mesh", "2x2", "--nproc", "2"],
                     "--mesh 2x2 has 4 ranks but the job has 2"),
    "mesh form": (["run", "mnist", "--strategy", "hybrid", "--mesh", "2by2", "--nproc", "4"], "not of the form AxB"),
    "nccl on cpu": (["run", "mnist", "--strategy", "ddp", "--nproc", "2", "--backend", "nccl"],
                    "--backend nccl needs CUDA"),
    "single with 2": (["run", "mnist", "--nproc", "2"], "--strategy single runs at most 1 process; for 2 choose ddp"),
    "tensor alone": (["run", "mnist", "--strategy", "tensor"], "needs at least 2 processes"),
    "nnodes without endpoint": (["run", "mnist", "--strategy", "ddp", "--nnodes", "2"], "needs --rdzv-endpoint"),
}


@pytest.mark.parametrize("name", BEFORE_SPAWN)
def test_bad_layout_is_refused_before_spawning(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = BEFORE_SPAWN[name]
    t0 = time.perf_counter()
    assert main(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert time.perf_counter() - t0 < 20  # no ranks were started and waited for
    assert not (tmp_path / "runs").exists()


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    proc = cli("run", "mnist", "--strategy", "ddp", "--nproc", "2", "--epochs", "1", "--limit", "640",
               "--out", str(tmp_path / "o"), "--quiet", env={"PARALLELNN_FAULT": "1:3:raise"}, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "parallelnn: error: rank 1 failed (exit code 1): RuntimeError: injected fault: rank 1 raised after step 3"
    assert not (tmp_path / "o" / "record.json").exists()


def test_unreachable_rendezvous_times_out_with_a_message(tmp_path):
    port = free_port()
    t0 = time.perf_counter()
    proc = cli("run", "iris", "--strategy", "ddp", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-timeout", "3", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parallelnn: error: rendezvous at 127.0.0.1:{port} failed"), lines
    assert time.perf_counter() - t0 < 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(commands, tmp_path):
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for cmd in commands]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def test_two_nodes_through_parallelnn_run(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    launch_two([[sys.executable, "-m", "parallelnn", "run", "mnist", "--strategy", "ddp", "--nproc", "1",
                 "--nnodes", "2", "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--epochs", "1", "--limit", "256", "--out", str(out), "--quiet"] for n in (0, 1)], tmp_path)
    rec = record(out)
    assert rec["world_size"] == 2 and rec["nnodes"] == 2 and [r["rank"] for r in rec["per_rank"]] == [0, 1]


def test_two_torchrun_invocations_join(tmp_path):
    """Plain torchrun, twice, as on two machines: each rank finds RANK/WORLD_SIZE and joins."""
    port = free_port()
    outs = [tmp_path / "n0", tmp_path / "n1"]
    launch_two([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
                 "-m", "parallelnn", "run", "mnist", "--strategy", "fsdp", "--epochs", "1", "--limit", "256",
                 "--out", str(o), "--quiet"] for o in outs], tmp_path)
    written = [o for o in outs if (o / "record.json").exists()]
    assert len(written) == 1, "only global rank 0 writes, into its own --out"
    assert record(written[0])["world_size"] == 2 and record(written[0])["strategy"] == "fsdp"


def test_node_rank_0_holds_global_rank_0_whichever_machine_starts_first(tmp_path):
    """Node 1 started first (the lower process id: c10d's rendezvous would have made it rank 0): the
    record still lands in node 0's --out, and each node says its part and where the record is."""
    port = free_port()
    outs = {n: tmp_path / f"node{n}" for n in (0, 1)}
    cmds = {n: [sys.executable, "-m", "parallelnn", "run", "iris", "--strategy", "ddp", "--nproc", "1", "--nnodes",
                "2", "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}", "--epochs", "2",
                "--out", str(outs[n])] for n in (0, 1)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmds[1], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2)
    second = subprocess.Popen(cmds[0], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        (out1, err1), (out0, err0) = first.communicate(timeout=240), second.communicate(timeout=240)
    finally:  # a hang fails the test without leaving the nodes running
        for p in (first, second):
            p.kill()
    assert first.returncode == 0 and second.returncode == 0, (err0[-2000:], err1[-2000:])
    assert (outs[0] / "record.json").is_file() and not (outs[1] / "record.json").exists()
    rec = record(outs[0])
    assert rec["world_size"] == 2 and rec["nnodes"] == 2 and [r["rank"] for r in rec["per_rank"]] == [0, 1]
    assert (f"node 0 of 2: global ranks 0..0 finished; global rank 0 writes the record here: "
            f"{outs[0]}/record.json") in out0
    assert (f"node 1 of 2: global ranks 1..1 finished; global rank 0 writes the record on node 0 (--node-rank 0, "
            f"127.0.0.1): {outs[1]}/record.json") in out1


def test_sbatch_without_srun_is_refused_at_once(tmp_path):
    """The batch script of `sbatch --ntasks 2` has SLURM_PROCID=0 and SLURM_NTASKS=2 but one process: rank 0
    would wait ~10 minutes for a rank 1 that never starts."""
    for extra in ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": str(0xFFFFFFFE), "SLURM_STEP_NUM_TASKS": "1"}):
        t0 = time.perf_counter()
        proc = cli("run", "iris", "--epochs", "1", "--out", str(tmp_path / "o"),
                   env={"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", **extra},
                   timeout=60)
        assert proc.returncode == 2 and time.perf_counter() - t0 < 30
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("parallelnn: error: SLURM_NTASKS=2 promises 2 tasks, but this "
                                                      "process was not started by srun"), lines
        assert "run `srun parallelnn run ...`" in lines[0]
        assert not (tmp_path / "o").exists()


def test_two_srun_tasks_join(tmp_path):
    """What srun gives each task of a 2-task step (its step id and task count among them): they train together."""
    port = free_port()
    out = tmp_path / "run"
    base = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "parallelnn", "run", "iris", "--strategy", "ddp", "--epochs",
                               "1", "--out", str(out), "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    assert record(out)["world_size"] == 2


def test_a_failed_node_checks_in_to_node_0s_exit_barrier():
    """torch's agent joins its exit barrier only when its ranks succeeded: node 1's failed launcher checks in
    itself, or node 0's agent (the store's host) waits 300 s for it after its own ranks finished."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
    from torch.distributed.elastic.utils import store as store_util

    from parallelnn.launch import _check_in_exit_barrier

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    _check_in_exit_barrier(f"127.0.0.1:{server.port}", "run-x", 2)
    t0 = time.perf_counter()
    store_util.barrier(dist.PrefixStore("run-x", server), 2, _TERMINAL_STATE_SYNC_ID, barrier_timeout=10)  # node 0's
    assert time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    _check_in_exit_barrier(f"127.0.0.1:{free_port()}", "run-x", 2)  # node 0 gone: gives up in seconds, silently
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("rank_env", [True, False])
def test_a_rank_ends_its_process_without_the_interpreters_teardown(rank_env, tmp_path):
    """A rank of a multi-process job, once its command returns, ends at once with that exit status: the
    teardown of gloo groups still alive at exit has aborted ranks (launch.end_with_command). Outside a job the
    interpreter ends as usual."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"} if rank_env else {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    code = ("import atexit, sys\natexit.register(print, 'interpreter teardown ran')\n"
            "sys.argv = ['parallelnn', 'run', 'no-such-workload']\n"
            "from parallelnn.cli import main\nraise SystemExit(main())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "unknown workload 'no-such-workload'" in p.stderr
    assert ("interpreter teardown ran" in p.stdout) is not rank_env


class _Affinity:
    """A machine of ``n`` cores whose threads' affinity is kept here, not set."""

    def __init__(self, monkeypatch, n: int, allowed=None):
        self.masks: dict[int, set[int]] = {}
        self.allowed = set(range(n)) if allowed is None else set(allowed)
        monkeypatch.setattr(launch, "_UNBOUND", None)
        monkeypatch.setattr(launch.os, "cpu_count", lambda: n)
        monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: self.masks.get(pid, self.allowed))
        monkeypatch.setattr(launch.os, "sched_setaffinity", lambda pid, cores: self.masks.__setitem__(pid, set(cores)))
        monkeypatch.setattr(launch.os, "listdir", lambda path: ["0"])


@pytest.mark.parametrize("cores,rank,ranks,expected", [
    (8, 1, 2, [4, 5, 6, 7]),  # its contiguous share
    (2, 0, 2, [0]),
    (2, 3, 4, [1]),  # more ranks than cores: one core each, in turn
    (2, 0, 1, None),  # a single rank is left alone
])
def test_each_rank_of_a_machine_computes_on_its_own_share_of_the_cores(monkeypatch, cores, rank, ranks, expected):
    machine = _Affinity(monkeypatch, cores)
    assert launch.bind_cores(rank, ranks) == expected
    if expected is not None:
        assert machine.masks[0] == set(expected) and launch.cores() == expected
        with launch.unbound():  # a whole machine's peak is probed with every core, then the share comes back
            assert launch.cores() == list(range(cores))
        assert launch.cores() == expected


def test_a_process_already_held_to_some_cores_is_not_bound_again(monkeypatch):
    """Slurm's or a launcher's own binding (a process allowed fewer cores than the machine has) is theirs."""
    machine = _Affinity(monkeypatch, 8, allowed={2, 3})
    assert launch.bind_cores(1, 2) is None and machine.masks == {}


def test_no_bind_cores_leaves_the_ranks_to_the_scheduler(tmp_path):
    out = tmp_path / "free"
    proc = cli("run", "iris", "--strategy", "ddp", "--nproc", "2", "--epochs", "1", "--no-bind-cores", "--quiet",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    everything = sorted(os.sched_getaffinity(0))
    assert [r["cores"] for r in record(out)["per_rank"]] == [everything, everything]
    assert record(out)["config"]["bind_cores"] is False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cores=st.integers(1, 64), ranks=st.integers(2, 16))
def test_the_ranks_shares_of_the_cores_are_disjoint_whenever_there_are_enough(monkeypatch, cores, ranks):
    shares = []
    for rank in range(ranks):
        _Affinity(monkeypatch, cores)
        shares.append(launch.bind_cores(rank, ranks))
    assert all(share and set(share) <= set(range(cores)) for share in shares)
    if ranks <= cores:  # equal, disjoint shares; the cores left over (cores % ranks) stay unused
        assert len({c for s in shares for c in s}) == sum(map(len, shares)) == cores // ranks * ranks
    else:  # one core each, in turn
        assert [s[0] for s in shares] == [r % cores for r in range(ranks)]
