"""Nothing lost but the steps since the last checkpoint: kill, resume, restart, corrupt, hang, stop.

Runs: MNIST, 640 samples x 2 epochs = 20 steps, a checkpoint every 3 steps; a rank is SIGKILLed
right after step 7, so 1 step is lost and training resumes from step 6.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli, main, record
from parallelnn.checkpoint import find_newest_good, verify
from parallelnn.record import read_metrics

pytestmark = pytest.mark.distributed

RUN = ["mnist", "--epochs", "2", "--limit", "640", "--log-every", "1", "--checkpoint-every", "3", "--quiet"]
LAYOUTS = {"single": [], "ddp": ["--strategy", "ddp", "--nproc", "2"], "fsdp": ["--strategy", "fsdp", "--nproc", "2"]}


def run(out, *extra, env=None, check=True):
    proc = cli("run", *RUN, *extra, "--out", str(out), env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def events(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps_after_restart(out):
    evs = events(out)
    marks = [i for i, e in enumerate(evs) if e["event"] == "restart"]
    assert marks, "metrics.jsonl must mark the restart"
    return {e["train/global_step"]: e["train/loss"] for e in evs[marks[-1]:] if e["event"] == "step"}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    for name, layout in LAYOUTS.items():
        run(base / name, *layout)
    return base


@pytest.mark.parametrize("how", ["resume", "max-restarts"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_killed_rank_resumes_to_the_same_weights(layout, how, references, tmp_path):
    out = tmp_path / "run"
    victim = "1" if layout != "single" else "0"
    kill = {"PARALLELNN_FAULT": f"{victim}:7:kill"}
    if how == "resume":
        proc = run(out, *LAYOUTS[layout], env=kill, check=False)
        assert proc.returncode != 0 and not (out / "record.json").exists()
        run(out, *LAYOUTS[layout], "--resume", "auto")
    else:
        run(out, *LAYOUTS[layout], "--max-restarts", "1", env=kill)
    ref = references / layout
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights must be bitwise equal"
    expected = {e["train/global_step"]: e["train/loss"] for e in events(ref) if e["event"] == "step"}
    after = steps_after_restart(out)
    assert sorted(after) == list(range(7, 21))
    assert all(after[s] == expected[s] for s in after), "metrics after the resume must equal the uninterrupted run's"
    # Readers (reports) see each step once: what the dead attempt wrote after the checkpoint is superseded.
    steps = [(e["train/global_step"], e["train/loss"]) for e in read_metrics(out) if e["event"] == "step"]
    assert steps == sorted(expected.items())
    rec, ref_rec = record(out), record(ref)
    assert rec["loss_curve"] == ref_rec["loss_curve"] and rec["test_accuracy"] == ref_rec["test_accuracy"]
    assert rec["resumes"] == 1 and rec["lost_steps"] == 1
    assert rec["restarts"] == (1 if how == "max-restarts" else 0)
    assert rec["resumed_from"].endswith("step-000000006")


def make_checkpoints(tmp_path, *extra):
    out = tmp_path / "run"
    run(out, "--epochs", "1", *extra)  # 10 steps: checkpoints at 3, 6, 9; --keep 2 leaves 6 and 9
    cks = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in cks] == ["step-000000006", "step-000000009"]
    return out, cks


def corrupt(path: Path, how: str) -> None:
    if how == "no manifest":
        (path / "MANIFEST.json").unlink()
    elif how == "truncated weights":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "flipped byte":
        f = path / "optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "missing rng":
        (path / "rng-rank0.json").unlink()
    elif how == "garbled manifest":
        (path / "MANIFEST.json").write_text("{not json")


@pytest.mark.parametrize("how", ["no manifest", "truncated weights", "flipped byte", "missing rng",
                                 "garbled manifest"])
def test_resume_skips_a_damaged_checkpoint(how, tmp_path, capsys):
    out, (older, newest) = make_checkpoints(tmp_path)
    corrupt(newest, how)
    assert verify(newest) is not None and verify(older) is None
    assert find_newest_good(out / "checkpoints") == older
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    # end to end: the resumed run says which one it skipped and starts after step 6
    proc = run(out, "--epochs", "2", "--resume", "auto")
    assert f"skipping checkpoint {newest}" in proc.stderr
    assert record(out)["resumed_from"] == str(older)


def test_a_partial_checkpoint_directory_is_ignored(tmp_path):
    out, (older, newest) = make_checkpoints(tmp_path)
    partial = out / "checkpoints" / ".step-000000012.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert find_newest_good(out / "checkpoints") == newest


def test_resharding_an_fsdp_checkpoint_into_one_process(tmp_path):
    out = tmp_path / "run"
    proc = run(out, *LAYOUTS["fsdp"], env={"PARALLELNN_FAULT": "1:7:kill"}, check=False)
    assert proc.returncode != 0
    proc = run(out, "--resume", "auto")
    assert "resharded" in proc.stderr
    rec = record(out)
    assert rec["world_size"] == 1 and rec["steps"] == 20 and rec["resumes"] == 1


def test_a_hung_rank_is_named_within_the_timeout(tmp_path):
    t0 = time.perf_counter()
    proc = cli("run", "mnist", "--strategy", "ddp", "--nproc", "2", "--epochs", "1", "--limit", "640", "--quiet",
               "--timeout", "5", "--out", str(tmp_path / "o"), env={"PARALLELNN_FAULT": "1:3:hang"}, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank 1 stopped responding" in last and "since it finished step 3" in last, last
    assert elapsed < 45, elapsed  # start-up + 5 s timeout + a second of watching, not a hang


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run(out, "--epochs", "1", env={"PARALLELNN_FAULT": "0:6:enospc"})
    assert "checkpoint at step 6 not saved (No space left on device (injected)); the previous one is kept" in proc.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000000003", "step-000000009"]  # nothing half-written left behind
    assert all(verify(out / "checkpoints" / n) is None for n in names)
    assert record(out)["steps"] == 10  # training went on


def test_sigterm_saves_and_stops_then_resume_finishes_the_same(references, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "parallelnn", "run", *RUN, *LAYOUTS["ddp"], "--epochs", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = out / "progress"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    assert not (out / "record.json").exists()
    run(out, *LAYOUTS["ddp"], "--resume", "auto")
    a, b = load_file(references / "ddp" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


BAD = {
    "another workload": ("iris", "is from workload iris, not mnist"),
    "another model shape": ("iris5", "parameter 0.weight has shape [50, 4], this model's is [50, 5]"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_checkpoint_of_another_model_is_refused(name, tmp_path, capsys):
    src = tmp_path / "src"
    assert main("run", "iris", "--epochs", "1", "--checkpoint-every", "1", "--out", str(src), "--quiet") == 0
    (ck,) = list((src / "checkpoints").iterdir())[-1:]
    capsys.readouterr()
    if name == "another workload":
        argv = ["run", "mnist", "--epochs", "1", "--resume", str(ck), "--out", str(tmp_path / "o")]
    else:
        rows = ["a,b,c,d,e,label"] + [f"{i},{i % 3},{i % 5},{i % 7},{i % 2},{'xy'[i % 2]}" for i in range(40)]
        (tmp_path / "five.csv").write_text("\n".join(rows) + "\n")
        argv = ["run", "iris", "--data", str(tmp_path / "five.csv"), "--resume", str(ck), "--out", str(tmp_path / "o")]
    assert main(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD[name][1] in err[0], err


def test_an_unwritable_checkpoint_dir_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main("run", "iris", "--checkpoint-every", "5", "--checkpoint-dir", str(blocker / "ck"),
                "--out", str(tmp_path / "o"), "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0], err
    assert not (tmp_path / "o" / "record.json").exists()


def test_checkpoints_are_never_unpickled():
    """Safe loading everywhere: no torch.load without weights_only=True in the package."""
    import re

    for path in (ROOT / "parallelnn").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
