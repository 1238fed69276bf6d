"""Users' own models and data: ``parallelnn run FILE.py:build``, ``parallelnn.run(...)``, and the examples
under every strategy that applies, with the per-step loss parity the built-in workloads have."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import parallelnn
from conftest import ROOT, cli, main, record, step_losses
from workload_samples import small_workload
from parallelnn.config import RunConfig
from parallelnn.errors import UserError
from parallelnn.runner import execute

EXAMPLES = ROOT / "examples"
FAST = ["--epochs", "1", "--limit", "128", "--batch-size", "32", "--log-every", "1", "--quiet"]
PARITY = [  # (example, strategies run on it; an MLP under FSDP and a pipeline is iris's, in test_distributed)
    ("digits_cnn", ("ddp", "fsdp", "pipeline", "tensor")),
    ("diabetes_mlp", ("ddp", "tensor")),
    ("tiny_lm", ("ddp", "fsdp", "pipeline")),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each example's single-process run, the reference its parallel runs must match."""
    root = tmp_path_factory.mktemp("ref")
    for name, _ in PARITY:
        assert main("run", f"{EXAMPLES / name}.py:build", *FAST, "--out", str(root / name)) == 0
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("example,strategy", [(e, s) for e, strategies in PARITY for s in strategies])
def test_examples_match_a_single_process_under_every_strategy(example, strategy, references, tmp_path):
    out = tmp_path / strategy
    proc = cli("run", f"examples/{example}.py:build", *FAST, "--strategy", strategy, "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = step_losses(references / example), step_losses(out)
    assert len(got) == len(expected) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    rec = record(out)
    assert rec["workload"] == f"examples/{example}.py:build" and rec["world_size"] == 2
    assert rec["workload_sha256"] == __import__("hashlib").sha256((EXAMPLES / f"{example}.py").read_bytes()).hexdigest()


def test_each_task_reports_its_metrics(references):
    digits, diabetes, lm = (record(references / n) for n, _ in PARITY)
    assert 0 <= digits["test_accuracy"] <= 1 and digits["dataset"].startswith("digits")
    assert {"test_mse", "test_mae", "test_r2"} <= diabetes.keys() and diabetes["test_accuracy"] is None
    assert diabetes["test_loss"] == pytest.approx(diabetes["test_mse"])
    assert lm["perplexity"] == pytest.approx(np.exp(lm["test_loss"])) and lm["tokens_per_second"] > 0


def test_tensor_parallel_that_cannot_apply_says_which_hint_would_work(tmp_path):
    proc = cli("run", "examples/tiny_lm.py:build", *FAST, "--strategy", "tensor", "--nproc", "2",
               "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tensor_plan=" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# -- the Python API ---------------------------------------------------------------------------------------

def test_python_api_runs_a_workload_object_and_returns_the_record(tmp_path):
    rec = parallelnn.run(small_workload(), out=str(tmp_path / "a"), quiet=True, log_every=1)
    assert rec["steps"] == 8 and rec["epochs"] == 2 and rec["batch_size"] == 16
    assert json.loads((tmp_path / "a" / "record.json").read_text())["steps"] == 8
    parallelnn.run(small_workload, out=str(tmp_path / "b"), quiet=True, log_every=1)  # a build function
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")  # model built after seeding: same run


@pytest.mark.distributed
def test_python_api_runs_two_processes_from_an_importable_spec(tmp_path):
    spec = "tests.workload_samples:small_workload"
    rec = parallelnn.run(spec, strategy="ddp", nproc=2, out=str(tmp_path / "ddp"), quiet=True, log_every=1)
    ref = parallelnn.run(small_workload, out=str(tmp_path / "one"), quiet=True, log_every=1)
    assert rec["world_size"] == 2 and rec["workload"] == spec
    torch.testing.assert_close(torch.tensor(step_losses(tmp_path / "ddp")), torch.tensor(step_losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)
    assert ref["world_size"] == 1


def test_python_api_refuses_what_ranks_cannot_import(tmp_path):
    def local_build(cfg):  # like a function defined in a notebook cell
        return small_workload()

    with pytest.raises(UserError, match="put `def build\\(cfg\\)"):
        parallelnn.run(local_build, strategy="ddp", nproc=2, out=str(tmp_path / "x"))
    with pytest.raises(UserError, match="unknown option 'epoch'; did you mean 'epochs'"):
        parallelnn.run(small_workload, epoch=3)


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------

def write(tmp_path, body: str):
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import parallelnn
        X, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    """) + textwrap.dedent(body))
    return path


BAD = [
    ("missing file", None, "no file"),
    ("missing function", "def other(cfg): pass\n", "has no function build"),
    ("raises", "def build(cfg):\n    raise ValueError('no data here\\nsecond line')\n",
     "raised ValueError: no data here"),
    ("not a workload", "def build(cfg):\n    return 42\n", "returned a int, not a parallelnn.Workload"),
    ("forward fails", "def build(cfg):\n    return parallelnn.Workload(model=nn.Linear(5, 2), train=(X, y), test=(X, y))\n",
     "the model's forward failed on a batch of inputs shaped [2x4]"),
    ("loss not scalar", "def build(cfg):\n    return parallelnn.Workload(model=nn.Linear(4, 2), train=(X, y), test=(X, y),\n"
     "        loss=lambda o, t: o.sum(dim=1), metrics=lambda o, t: {'n': o.sum()})\n", "the loss must return one number"),
    ("empty", "def build(cfg):\n    return parallelnn.Workload(model=nn.Linear(4, 2), train=(X[:0], y[:0]), test=(X, y))\n",
     "Workload.train is empty"),
    ("float targets", "def build(cfg):\n    return parallelnn.Workload(model=nn.Linear(4, 2), train=(X, y.float()), test=(X, y))\n",
     "task 'classification' needs integer class labels"),
    ("unknown task", "def build(cfg):\n    return parallelnn.Workload(model=nn.Linear(4, 2), train=(X, y), test=(X, y), task='rank')\n",
     "unknown task 'rank'"),
    ("pipeline on a non-sequential model", "def build(cfg):\n    m = nn.Linear(4, 2)\n"
     "    return parallelnn.Workload(model=m, train=(X, y), test=(X, y))\n",
     "cannot be split into pipeline stages: make it an nn.Sequential, or give Workload(layers=...)"),
]


@pytest.mark.parametrize("name,body,message", BAD, ids=[b[0] for b in BAD])
def test_bad_user_workloads_are_one_line_and_write_nothing(name, body, message, tmp_path, capsys):
    spec = f"{tmp_path / 'absent.py'}:build" if body is None else f"{write(tmp_path, body)}:build"
    extra = ["--strategy", "pipeline", "--nproc", "2"] if "pipeline" in name else []
    out = tmp_path / "out"
    assert main("run", spec, "--epochs", "1", "--quiet", "--out", str(out), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "record.json").exists()


def test_a_dataset_takes_the_dataloader_path_with_exact_sharding(tmp_path):
    class Pairs(torch.utils.data.Dataset):
        def __init__(self, X, y):
            self.X, self.y = X, y

        def __len__(self):
            return len(self.X)

        def __getitem__(self, i):
            return self.X[i], self.y[i]

    w = small_workload()
    X, y = torch.as_tensor(w.train[0]), torch.as_tensor(w.train[1])
    as_dataset = parallelnn.Workload(model=w.model, train=Pairs(X, y), test=w.test, epochs=2, batch_size=16)
    parallelnn.run(as_dataset, loader="dataloader", out=str(tmp_path / "ds"), quiet=True, log_every=1)
    parallelnn.run(small_workload(), out=str(tmp_path / "arrays"), quiet=True, log_every=1)
    assert step_losses(tmp_path / "ds") == pytest.approx(step_losses(tmp_path / "arrays"), rel=1e-6)


def test_spec_from_a_package_module_is_accepted_by_the_config(tmp_path):
    cfg = RunConfig(workload="tests.workload_samples:small_workload", out=str(tmp_path / "m"), quiet=True)
    rec = execute(cfg)
    assert rec["workload_spec"] == "tests.workload_samples:small_workload" and rec["workload_sha256"]


def test_hugging_face_datasets_train_as_the_same_arrays_do(tmp_path):
    """A datasets.Dataset (in memory, and load_dataset on a local CSV) with its two columns named."""
    datasets = pytest.importorskip("datasets")
    w = small_workload()
    X, y = torch.as_tensor(w.train[0]), torch.as_tensor(w.train[1])
    table = datasets.Dataset.from_dict({"features": X.tolist(), "label": y.tolist()})
    as_hf = parallelnn.Workload(model=w.model, train=table, test=w.test, columns=("features", "label"), epochs=2,
                                batch_size=16)
    parallelnn.run(as_hf, out=str(tmp_path / "hf"), quiet=True, log_every=1)
    parallelnn.run(small_workload(), out=str(tmp_path / "arrays"), quiet=True, log_every=1)
    assert step_losses(tmp_path / "hf") == pytest.approx(step_losses(tmp_path / "arrays"), rel=1e-5)

    csv = tmp_path / "d.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i * 0.1},{-i * 0.2},{i % 2}\n" for i in range(40)))
    loaded = datasets.load_dataset("csv", data_files=str(csv), split="train")
    pairs = loaded.map(lambda r: {"x": [r["a"], r["b"]]})
    rec = parallelnn.run(parallelnn.Workload(model=nn.Linear(2, 2), train=pairs, test=pairs, columns=("x", "label"),
                                             epochs=1, batch_size=8), out=str(tmp_path / "csv"), quiet=True)
    assert rec["steps"] == 5 and rec["test_accuracy"] is not None
    with pytest.raises(UserError, match="name its input and target columns"):
        parallelnn.run(parallelnn.Workload(model=nn.Linear(2, 2), train=pairs, test=pairs), out=str(tmp_path / "x"))
