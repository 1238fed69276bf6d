"""--tensorboard: event files with the metrics.jsonl names when the package is there; one line when not."""

from __future__ import annotations

import sys

import pytest

from conftest import events, main


def test_missing_package_is_a_one_line_error_before_training(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes an import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main("run", "iris", "--epochs", "1", "--tensorboard", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parallelnn: error: --tensorboard needs the tensorboard package")
    assert "pip install" in err[0] and not out.exists()


def test_event_files_carry_the_metrics_jsonl_names_and_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main("run", "iris", "--epochs", "3", "--log-every", "1", "--tensorboard", "--quiet", "--out", str(out)) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/loss", "eval/runtime",
            "eval/samples_per_second", "eval/steps_per_second", "train/epoch_loss"} <= tags
    steps = events(out, "step")
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == \
        [(s["train/global_step"], s["train/loss"]) for s in steps]
    evals = events(out, "eval")
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("eval/accuracy")] == \
        [(s["train/global_step"], s["eval/accuracy"]) for s in evals]
    epochs = events(out, "epoch")  # the epoch means, kept apart from the step losses
    assert [pytest.approx(e.value) for e in acc.Scalars("train/epoch_loss")] == [s["train/loss"] for s in epochs]
