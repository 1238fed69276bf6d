"""Issue 12, tried adversarially: crafted checkpoints run no code, a real full disk is survived,
checkpoints belong to their run, one run per --out, every freeze is caught, resumes never mix settings.

Fast cases run iris in this process; the multi-process ones (marked distributed) use 2 ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli, events, main, record
from parallelnn.checkpoint import MANIFEST, find_newest_good, verify
from parallelnn.record import LOCK, sha256_file

IRIS = ["iris", "--epochs", "2", "--checkpoint-every", "1", "--quiet"]


class Payload:
    """What an attacker puts in a pickle: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def remanifest(ck: Path) -> None:
    """What an attacker who can write the checkpoint also does: make the manifest match again."""
    manifest = json.loads((ck / MANIFEST).read_text())
    for name in list(manifest["files"]):
        f = ck / name
        manifest["files"][name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (ck / MANIFEST).write_text(json.dumps(manifest))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("parallelnn: warning")]
    assert len(err) == 1, err
    return err[0]


# -- 1. a checkpoint is untrusted input ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A 2-rank ddp run whose checkpoints are DCP checkpoints."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    proc = cli("run", *IRIS, "--strategy", "ddp", "--nproc", "2", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def clone_run(src: Path, dst: Path) -> Path:
    """A copy of a run directory whose checkpoints say they belong to it (as an attacker would write)."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").iterdir():
        manifest = json.loads((ck / MANIFEST).read_text())
        manifest["run"]["out"] = os.path.realpath(dst)
        (ck / MANIFEST).write_text(json.dumps(manifest))
    (dst / "record.json").unlink()
    return dst


def newest(out: Path) -> Path:
    return sorted((out / "checkpoints").iterdir())[-1]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["single", "ddp"])
def test_a_crafted_dcp_metadata_runs_no_code(layout, dcp_run, tmp_path, capsys):
    out = clone_run(dcp_run, tmp_path / "run")
    marker = tmp_path / "pwned-metadata"
    for ck in (out / "checkpoints").iterdir():  # every checkpoint, so none is a way around
        (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        remanifest(ck)
    argv = ["run", *IRIS, "--epochs", "4", "--out", str(out), "--resume", "auto"]
    if layout == "single":
        assert main(*argv) == 2
        line = one_error_line(capsys)
    else:  # every rank loads it
        proc = cli(*argv, "--strategy", "ddp", "--nproc", "2", timeout=300)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        line = proc.stderr.strip()
    assert line == (f"parallelnn: error: checkpoint {newest(out)}: DCP .metadata asks for posix.system, which a "
                    "checkpoint's metadata never holds: refused"), line
    assert not marker.exists(), "the crafted .metadata ran code"


@pytest.mark.distributed
def test_a_crafted_distcp_item_runs_no_code(dcp_run, tmp_path, capsys):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from parallelnn.safeio import load_metadata

    out = clone_run(dcp_run, tmp_path / "run")
    marker = tmp_path / "pwned-distcp"
    for ck in (out / "checkpoints").iterdir():
        meta_file = ck / "dcp" / ".metadata"
        with open(meta_file, "rb") as fh:
            md = load_metadata(fh)
        key = sorted(k for k in md.state_dict_metadata if k.startswith("model."))[0]
        md.state_dict_metadata[key] = BytesStorageMetadata()
        md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != key}
        data_file = sorted((ck / "dcp").glob("*.distcp"))[0]
        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        offset = data_file.stat().st_size
        with open(data_file, "ab") as fh:
            fh.write(buf.getvalue())
        md.storage_data[MetadataIndex(key)] = _StorageInfo(data_file.name, offset, len(buf.getvalue()))
        meta_file.write_bytes(pickle.dumps(md))
        remanifest(ck)
    assert main("run", *IRIS, "--epochs", "4", "--out", str(out), "--resume", "auto") == 2
    line = one_error_line(capsys)
    assert f"DCP item {key} is not plain data: refused" in line, line
    assert not marker.exists(), "the crafted .distcp item ran code"


def test_an_unlisted_folder_in_a_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    older, ck = sorted((out / "checkpoints").iterdir())[-2:]
    marker = tmp_path / "pwned-folder"
    (ck / "dcp").mkdir()
    (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))  # no manifest edit at all
    assert verify(ck) == "dcp is not in the manifest: refused (a checkpoint holds only the files it lists)"
    capsys.readouterr()
    assert main("run", *IRIS, "--out", str(tmp_path / "o2"), "--resume", str(ck)) == 2
    assert "dcp is not in the manifest" in one_error_line(capsys)
    (out / "record.json").unlink()
    assert main("run", *IRIS, "--epochs", "3", "--out", str(out), "--resume", "auto") == 0
    assert f"skipping checkpoint {ck}: dcp is not in the manifest" in capsys.readouterr().err
    assert record(out)["resumed_from"] == str(older)
    assert not marker.exists()


def test_a_pickled_optimizer_file_is_never_read(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    ck = newest(out)
    marker = tmp_path / "pwned-pt"
    torch.save({"x": Payload(marker)}, ck / "optimizer.pt")
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["files"]["optimizer.pt"] = {}
    (ck / MANIFEST).write_text(json.dumps(manifest))
    remanifest(ck)  # listed, with its checksum: still never loaded (nothing reads an optimizer.pt)
    capsys.readouterr()
    assert main("run", *IRIS, "--epochs", "3", "--out", str(tmp_path / "o2"), "--resume", str(ck)) == 0
    assert not marker.exists()


# -- 2. a real full disk -----------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'}); "
                    "test_disk_full_during_save_keeps_the_previous_checkpoint covers the injected fault")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


MNIST = ["mnist", "--epochs", "1", "--limit", "640", "--checkpoint-every", "3", "--quiet"]  # 5.2 MB a checkpoint


def test_a_real_full_disk_single(tmp_path, capsys):
    """Checkpoints on an 8 MB filesystem (one fits), then an --out with no room for the weights."""
    with tmpfs(tmp_path / "ck", "8m") as ck, tmpfs(tmp_path / "out", "1m") as out:
        assert main("run", *MNIST, "--checkpoint-dir", str(ck), "--out", str(out / "run")) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert any("checkpoint at step 6 not saved (" in line and f"the previous one is kept: {ck}/step-000000003"
                   in line for line in lines), lines
        assert lines[-1].startswith(f"parallelnn: error: could not write {out}/run/model.safetensors ("), lines[-1]
        assert lines[-1].endswith(f"the last good checkpoint is {ck}/step-000000003 (continue with --resume auto "
                                  "once there is room)"), lines[-1]
        assert sorted(p.name for p in ck.iterdir()) == ["step-000000003"]  # no .partial left
        assert verify(ck / "step-000000003") is None
        assert not (out / "run" / "record.json").exists()


@pytest.mark.distributed
def test_a_real_full_disk_ddp(tmp_path):
    with tmpfs(tmp_path / "ck", "8m") as ck:
        out = tmp_path / "run"
        proc = cli("run", *MNIST, "--strategy", "ddp", "--nproc", "2", "--checkpoint-dir", str(ck),
                   "--out", str(out), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "checkpoint at step 6 not saved (" in proc.stderr and "training goes on" in proc.stderr
        assert sorted(p.name for p in ck.iterdir()) == ["step-000000003"]
        assert record(out)["steps"] == 10 and record(out)["last_checkpoint"] == str(ck / "step-000000003")


# -- 3. checkpoints belong to their run --------------------------------------------------------------

def test_two_runs_sharing_a_checkpoint_dir(tmp_path, capsys):
    shared = tmp_path / "ck"
    assert main("run", *IRIS, "--checkpoint-dir", str(shared), "--out", str(tmp_path / "a")) == 0
    before = sorted(p.name for p in shared.iterdir())
    capsys.readouterr()
    for extra in ([], ["--resume", "auto"]):
        assert main("run", *IRIS, "--lr", "0.01", "--checkpoint-dir", str(shared), "--out", str(tmp_path / "b"),
                    *extra) == 2
        line = one_error_line(capsys)
        assert f"holds {before[-1]} of another run (--out {os.path.realpath(tmp_path / 'a')})" in line, line
    assert sorted(p.name for p in shared.iterdir()) == before  # nothing pruned, nothing taken
    assert not (tmp_path / "b" / "record.json").exists()


def test_resume_auto_refuses_another_runs_checkpoint(tmp_path, capsys):
    a = tmp_path / "a"
    assert main("run", *IRIS, "--out", str(a)) == 0
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(newest(a), b / "checkpoints" / newest(a).name)  # another run's checkpoint, intact
    capsys.readouterr()
    assert main("run", "iris", "--epochs", "3", "--quiet", "--out", str(b), "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"it belongs to another run (--out {os.path.realpath(a)}" in err
    assert "no complete checkpoint" in err and record(b)["resumed_from"] is None


def test_names_steps_and_empty_manifests_must_agree(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    cks = out / "checkpoints"
    real = newest(out)  # step 4 (iris: 2 steps an epoch)
    fake = cks / "step-000000100"
    shutil.copytree(sorted(cks.iterdir())[0], fake)  # an older step under a newer name
    assert verify(fake) == "the folder name says step 100, the manifest step 3"
    empty = cks / "step-000000200"
    empty.mkdir()
    (empty / MANIFEST).write_text(json.dumps({"format": 2, "step": 200, "run": {}, "files": {}}))
    assert verify(empty) == "manifest lists no files: not a checkpoint"
    keyless = cks / "step-000000300"
    shutil.copytree(real, keyless)
    (keyless / "trainer.json").write_text("{}")
    m = json.loads((keyless / MANIFEST).read_text())
    m["step"] = 300
    (keyless / MANIFEST).write_text(json.dumps(m))
    remanifest(keyless)
    assert verify(keyless) == "trainer.json has no valid 'workload'"
    assert find_newest_good(cks) == real
    capsys.readouterr()
    assert main("run", *IRIS, "--out", str(tmp_path / "o"), "--resume", str(keyless)) == 2
    assert one_error_line(capsys).endswith("not a usable checkpoint: trainer.json has no valid 'workload'")
    # a resumed run saving steps 5 and 6 prunes only its own older checkpoints, never the 'newer' impostors
    (out / "record.json").unlink()
    assert main("run", *IRIS, "--epochs", "3", "--keep", "1", "--out", str(out), "--resume", "auto") == 0
    assert record(out)["resumed_from"] == str(real)
    assert sorted(p.name for p in cks.iterdir()) == ["step-000000006", "step-000000100", "step-000000200",
                                                     "step-000000300"]


def test_resume_with_another_lr_applies_and_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    (out / "record.json").unlink()
    assert main("run", *IRIS, "--epochs", "4", "--lr", "0.05", "--out", str(out), "--resume", "auto") == 0
    rec = record(out)
    assert rec["lr"] == 0.05 and rec["resume_changes"]["lr"] == {"from": 0.001, "to": 0.05, "at_step": 4}
    lrs = {e["train/epoch"]: e["train/learning_rate"] for e in events(out, "epoch")}
    assert lrs[1] == 0.001 and lrs[3] == lrs[4] == 0.05, lrs  # the optimizer really trained with the new rate


def test_resume_with_another_seed_or_limit_is_refused_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    (out / "record.json").unlink()
    capsys.readouterr()
    for flag, old, new in (("--seed", 0, 1), ("--limit", None, 100)):
        assert main("run", *IRIS, "--epochs", "4", flag, str(new), "--out", str(out), "--resume", "auto") == 2
        line = one_error_line(capsys)
        assert f"was trained with {flag} {old} (now {new})" in line and "--allow-changes" in line, line
    assert main("run", *IRIS, "--epochs", "4", "--seed", "1", "--allow-changes", "--out", str(out),
                "--resume", "auto") == 0
    assert record(out)["seed"] == 1 and record(out)["resume_changes"]["seed"] == {"from": 0, "to": 1, "at_step": 4}


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--epochs", "3", "--out", str(out)) == 0
    (out / "record.json").unlink()
    capsys.readouterr()
    assert main("run", *IRIS, "--epochs", "1", "--out", str(out), "--resume", "auto") == 2
    assert "has trained into epoch 3 (step 6): --epochs 1 leaves nothing to train" in one_error_line(capsys)


# -- 4. one run per --out ----------------------------------------------------------------------------

def test_two_runs_on_one_out(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "iris", "--epochs", "1", "--quiet", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "parallelnn", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PARALLELNN_FAULT": "0:0:slow-eval=6"})  # still running when ...
    deadline = time.time() + 60
    while not (out / LOCK).exists() and time.time() < deadline:
        time.sleep(0.02)
    capsys.readouterr()
    assert main(*argv) == 2  # ... this one starts
    second = capsys.readouterr().err
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.strip() == (f"parallelnn: error: --out {out} is in use by another run (PID {first.pid} "
                                     f"on {os.uname().nodename}): wait for it to end, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model.safetensors", "record.json"]
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "h"}))
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(out)) == 0
    assert f"taking over the lock of PID {dead.pid} on h, which is no longer running" in capsys.readouterr().err
    assert not (out / LOCK).exists() and not (out / "progress").exists()


# -- 5. hangs ------------------------------------------------------------------------------------------

def frozen_pid(needle: str, timeout: float) -> tuple[int, float] | None:
    """(PID, when first seen) of a stopped (state T) process whose command line holds ``needle``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "T" and needle in (d / "cmdline").read_text():
                    return int(d.name), time.time()
            except (OSError, IndexError):
                continue
        time.sleep(0.05)
    return None


@pytest.mark.distributed
@pytest.mark.parametrize("victim,step", [(1, 1), (0, 41)])  # rank 0 judges; rank 1 judges when rank 0 is frozen
def test_a_frozen_rank_is_named_and_the_job_ends(victim, step, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "parallelnn", "run", "iris", "--strategy", "ddp", "--nproc", "2", "--epochs", "100",
           "--quiet", "--timeout", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PARALLELNN_FAULT": f"{victim}:{step}:stop"})
    seen = frozen_pid(str(out), 120)
    assert seen is not None, "the rank did not freeze"
    pid, t_frozen = seen
    _, err = proc.communicate(timeout=120)
    ended = time.time() - t_frozen
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    other = 1 - victim
    assert f"rank {other} failed (exit code 1): TimeoutError: rank {victim} stopped responding: its process is " \
           "frozen" in last, last
    assert f"since it finished step {step}, while rank {other} waits in step {step + 1} (--timeout 3s)" in last, last
    assert ended < 3 + 10, ended
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    print(f"rank {victim} frozen after step {step}: job ended {ended:.1f}s after the freeze (--timeout 3)")


@pytest.mark.distributed
def test_a_slow_evaluation_is_not_a_hang(tmp_path):
    """Rank 1's end-of-epoch evaluation takes 6 s more than it should, --timeout 3: no hang."""
    out = tmp_path / "o"
    proc = cli("run", "mnist", "--strategy", "ddp", "--nproc", "2", "--epochs", "1", "--limit", "640", "--quiet",
               "--timeout", "3", "--out", str(out), env={"PARALLELNN_FAULT": "1:10:slow-eval=6"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert record(out)["eval_curve"][-1]["runtime"] > 6


# -- 6. the smaller points ------------------------------------------------------------------------------

def test_a_stop_without_any_checkpoint_does_not_promise_a_resume(tmp_path):
    from parallelnn.checkpoint import resume_hint
    from parallelnn.config import RunConfig
    from parallelnn.runner import Stopped

    cfg = RunConfig(workload="iris", out=str(tmp_path / "o"))
    assert resume_hint(cfg) == "; no checkpoint was saved: a new run starts from the beginning"
    assert "--resume" not in str(Stopped(signal.SIGINT, 3, None))
    assert str(Stopped(signal.SIGINT, 3, "ck/step-3")).endswith("checkpoint ck/step-3; to continue, run the same "
                                                                "command with --resume auto")


def test_a_stop_at_a_checkpoint_step_saves_it_once(tmp_path, capsys):
    from parallelnn.config import RunConfig
    from parallelnn.runner import Stopped, execute
    from parallelnn.trainer import Hooks

    saves = []

    def stop_at_3(trainer):
        if trainer.state.global_step == 3:
            trainer.stop.set(signal.SIGTERM)
            real = trainer.checkpointer.save
            trainer.checkpointer.save = lambda *a, **k: saves.append(a[0]) or real(*a, **k)

    cfg = RunConfig(workload="iris", epochs=3, checkpoint_every=3, keep=1, quiet=True, out=str(tmp_path / "o"))
    with pytest.raises(Stopped):
        execute(cfg, Hooks(after_step=[stop_at_3]))
    assert saves == [3, 3]  # asked twice (the periodic save, then the stop's) ...
    assert [p.name for p in (tmp_path / "o" / "checkpoints").iterdir()] == ["step-000000003"]
    assert verify(tmp_path / "o" / "checkpoints" / "step-000000003") is None  # ... written once, never removed


def test_an_out_starting_with_a_dash_reaches_the_ranks_as_one_argument():
    from parallelnn.cli import build_parser
    from parallelnn.options import config_from_args
    from parallelnn.config import RunConfig, config_to_argv

    argv = config_to_argv(RunConfig(workload="iris", out="-x", strategy="ddp", nproc=2))
    assert "--out=-x" in argv
    assert config_from_args(build_parser().parse_args(["run", *argv])).out == "-x"


def test_report_names_a_half_written_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(runs / "done")) == 0
    (runs / "half").mkdir()
    (runs / "half" / "metrics.jsonl").write_text('{"event": "epoch"}\n')
    capsys.readouterr()
    assert main("report", str(runs), "--out", str(tmp_path / "rep")) == 0
    assert f"skipped {runs / 'half'}: no record.json: a run that did not finish" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,why", [
    ("samples_per_second", float("nan"), "field 'samples_per_second' is nan, not a finite number"),
    ("world_size", "2", "field 'world_size' is '2', not an integer"),
    ("format_version", "x", "record format 'x' is not one parallelnn wrote"),
])
def test_bad_records_are_one_line_errors(field, value, why, tmp_path, capsys):
    run = tmp_path / "run"
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(run)) == 0
    rec = record(run)
    rec[field] = value
    (run / "record.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert main("report", str(run), "--out", str(tmp_path / "rep")) == 2
    assert one_error_line(capsys).endswith(why)


def test_malformed_manifests_are_named(tmp_path):
    ck = tmp_path / "step-000000001"
    ck.mkdir()
    for manifest, why in (({"files": {}}, "written by another version of parallelnn (checkpoint format 1"),
                          ({"format": 2, "step": 1, "run": {}, "files": {"a": {}}}, "manifest entry 'a' is malformed"),
                          ({"format": 2, "files": {"a": {"size": 1, "sha256": "x"}}}, "manifest has no step or run"),
                          ([1], "manifest lists no files")):
        (ck / MANIFEST).write_text(json.dumps(manifest))
        assert verify(ck).startswith(why), verify(ck)


@pytest.mark.parametrize("damage,why", [
    (lambda s: s["optim"]["param_groups"][0].update(lr="fast"), "optimizer state param_groups.0.lr is a string, "
                                                               "not a number"),
    (lambda s: s["loop"].update(epoch_losses="x"), "its loop state: epoch_losses is a string, not a list"),
])
def test_crafted_json_state_is_a_one_line_error(damage, why, tmp_path, capsys):
    out = tmp_path / "run"
    assert main("run", *IRIS, "--out", str(out)) == 0
    ck = newest(out)
    state = json.loads((ck / "trainer.json").read_text())
    damage(state)
    (ck / "trainer.json").write_text(json.dumps(state))
    remanifest(ck)
    capsys.readouterr()
    assert main("run", *IRIS, "--epochs", "3", "--out", str(tmp_path / "o2"), "--resume", str(ck)) == 2
    assert why in one_error_line(capsys)


NEVER_REPORTS = """
import os, socket, time
from datetime import timedelta
import torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
from parallelnn.watchdog import Phase, Watchdog
wd = Watchdog(0, 2, timeout=2.0)  # rank 1 of this 2-rank job never starts its watchdog
wd.at(1, Phase.STEP)  # rank 0 enters step 1 and waits there, as in a collective with rank 1
time.sleep(30)
"""


def test_a_rank_that_never_reports_is_named(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", NEVER_REPORTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "parallelnn: error: rank 1 never reported (frozen or stuck before its first step), while rank 0 waits "
        "in step 1 (--timeout 2s)")
    assert elapsed < 2 + 10, elapsed
