"""Bad input: one line naming the problem, exit status 2, no traceback, nothing written."""

import pytest

from conftest import cli, main
from test_idx import write_mnist

CASES = {
    "unknown workload": (["run", "resnet"], "unknown workload 'resnet': choose one of iris, mnist, gpt2"),
    "unknown strategy": (["run", "mnist", "--strategy", "zero"], "invalid choice: 'zero'"),
    "unknown device": (["run", "mnist", "--device", "tpu"], "invalid choice: 'tpu'"),
    "unknown loader": (["run", "mnist", "--loader", "disk"], "invalid choice: 'disk'"),
    "absent cuda": (["run", "mnist", "--device", "cuda"], "no CUDA device"),
    "absent mps": (["run", "mnist", "--device", "mps"], "MPS is not available"),
    "zero epochs": (["run", "mnist", "--epochs", "0"], "--epochs must be positive"),
    "negative batch": (["run", "mnist", "--batch-size", "-4"], "--batch-size must be positive"),
    "zero lr": (["run", "mnist", "--lr", "0"], "--lr must be positive"),
    "negative lr": (["run", "iris", "--lr=-1e-3"], "--lr must be positive"),
    "not a number": (["run", "mnist", "--epochs", "two"], "argument --epochs: 'two' is not an int"),
    "no workload": (["run"], "no workload given"),
    "missing data dir": (["run", "mnist", "--data", "/no/such/dir"], "not a directory"),
    "missing csv": (["run", "iris", "--data", "/no/such.csv"], "No such file"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_flag(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = CASES[name]
    assert main(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parallelnn: error:") and expected in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage", ["missing", "magic", "truncated", "counts"])
def test_bad_idx_directory(damage, tmp_path, capsys):
    import gzip

    import numpy as np

    from parallelnn.data.idx import MNIST_FILES, write_idx

    data = tmp_path / "mnist"
    write_mnist(data)
    target = data / (MNIST_FILES["train_images"] + ".gz")
    if damage == "missing":
        target.unlink()
    elif damage == "magic":
        raw = bytearray(gzip.decompress(target.read_bytes()))
        raw[3] = 7
        target.write_bytes(gzip.compress(bytes(raw)))
    elif damage == "truncated":
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-1]))
    else:
        write_idx(data / (MNIST_FILES["train_labels"] + ".gz"), np.zeros(3, dtype=np.uint8))
    out = tmp_path / "out"
    assert main("run", "mnist", "--data", str(data), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parallelnn: error:"), err
    assert not out.exists()


def test_out_with_a_record_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert main("run", "iris", "--epochs", "1", "--out", str(out), "--quiet") == 0
    before = (out / "record.json").read_text()
    assert main("run", "iris", "--epochs", "2", "--out", str(out), "--quiet") == 2
    assert "already holds a record; pass --overwrite" in capsys.readouterr().err
    assert (out / "record.json").read_text() == before
    assert main("run", "iris", "--epochs", "2", "--out", str(out), "--quiet", "--overwrite") == 0
    assert '"epochs": 2' in (out / "record.json").read_text()


def test_a_real_process_exits_2_without_traceback(tmp_path):
    proc = cli("run", "mnist", "--epochs", "-1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "parallelnn: error: --epochs must be positive, got -1"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_resume_auto_leaves_a_finished_run_alone(tmp_path, capsys):
    """Nothing to resume in a finished run: exit 2, record and metrics untouched (unless --overwrite)."""
    out = tmp_path / "done"
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(out), "--resume", "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run and no checkpoint to resume from" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main("run", "iris", "--epochs", "1", "--quiet", "--out", str(out), "--resume", "auto", "--overwrite") == 0
