"""Single-process training end to end: accuracy, determinism, the two loaders, and the record."""

import statistics

import pytest

from conftest import cli, events, record, step_losses
from parallelnn.config import RunConfig
from parallelnn.runner import execute

REQUIRED_KEYS = ("workload dataset strategy device world_size loader epochs batch_size lr seed train_seconds "
                 "samples_per_second test_accuracy final_train_loss flops_per_sample mfu peak_memory_bytes "
                 "hardware versions command").split()


def run(tmp_path, name, **kw):
    return execute(RunConfig(out=str(tmp_path / name), quiet=True, **kw))


def test_iris_default_run_reaches_093(tmp_path):
    """Study settings (Adam 1e-3, batch 64, 100 epochs). The test split has 30 samples, so one seed's
    accuracy moves in steps of 0.033; we hold the median of seeds 0-4 to the 0.93 bar."""
    accs = [run(tmp_path, f"s{seed}", workload="iris", seed=seed)["test_accuracy"] for seed in range(5)]
    assert statistics.median(accs) >= 0.93, accs
    rec = record(tmp_path / "s0")
    assert rec["epochs"] == 100 and rec["batch_size"] == 64 and rec["lr"] == 1e-3
    assert rec["train_samples"] == 120 and rec["test_samples"] == 30


def test_mnist_embedded_two_epochs_from_the_command_line(tmp_path):
    proc = cli("run", "mnist", "--epochs", "2", "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert "mnist-5k (embedded subset)" in proc.stdout
    rec = record(tmp_path / "m")
    assert rec["dataset"] == "mnist-5k (embedded subset)"
    assert rec["test_accuracy"] >= 0.90
    for key in REQUIRED_KEYS:
        assert key in rec, key
    assert set(rec["hardware"]) >= {"cpu", "cores", "gpu", "memory_bytes"}
    assert set(rec["versions"]) >= {"python", "torch", "parallelnn"}
    assert rec["flops_per_sample"] == pytest.approx(25.04e6, rel=0.01)
    # MFU against the peak this machine measured (a busy machine can under-measure it, so no upper bound)
    assert rec["mfu"] == pytest.approx(rec["flops_per_sample"] * rec["samples_per_second"] / rec["peak_flops"])
    assert rec["mfu"] > 0
    assert rec["command"].startswith("parallelnn run mnist")
    epochs = events(tmp_path / "m", "epoch")
    assert [e["train/epoch"] for e in epochs] == [1, 2]
    # train_seconds is the sum of the epochs' training loops: evaluation is not in it.
    assert rec["train_seconds"] == pytest.approx(sum(e["train/seconds"] for e in epochs))


def test_same_seed_same_losses(tmp_path):
    kw = dict(workload="mnist", epochs=1, limit=640, log_every=1)
    run(tmp_path, "a", **kw)
    run(tmp_path, "b", **kw)
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert len(a) == 10 and a == b
    c = step_losses(tmp_path / "c") if run(tmp_path, "c", seed=1, **kw) else None
    assert c != a


def test_dataloader_path_trains_on_the_same_batches_as_the_memory_path(tmp_path):
    kw = dict(workload="mnist", epochs=1, limit=640, log_every=1)
    run(tmp_path, "mem", loader="memory", **kw)
    run(tmp_path, "dl", loader="dataloader", workers=2, **kw)
    assert step_losses(tmp_path / "dl") == pytest.approx(step_losses(tmp_path / "mem"), rel=1e-5)


def test_limit_uses_the_first_n_samples(tmp_path):
    rec = run(tmp_path, "l", workload="mnist", epochs=1, limit=100, batch_size=32)
    assert rec["train_samples"] == 100 and rec["steps"] == 4 and rec["samples"] == 100


def test_limit_above_the_data_warns_and_uses_all(tmp_path, capsys):
    rec = run(tmp_path, "l", workload="iris", epochs=1, limit=10_000)
    assert rec["train_samples"] == 120
    assert "--limit 10000 is more than the 120 training samples" in capsys.readouterr().err


def test_iris_from_a_user_csv(tmp_path):
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{'x' if i % 2 else 'y'}" for i in range(60)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    rec = run(tmp_path, "csv", workload="iris", data=str(tmp_path / "d.csv"), epochs=2)
    assert rec["dataset"].startswith("csv:") and rec["train_samples"] == 48


def test_default_out_dir_is_under_runs(tmp_path):
    proc = cli("run", "iris", "--epochs", "1", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-iris-single") and (run_dir / "record.json").is_file()
