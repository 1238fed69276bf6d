"""bench seed --seeds N: each row run with seeds 0..N-1, the table giving mean and standard deviation beside
the study's single figure."""

import csv
import json
import statistics

import pytest

from conftest import main


def test_each_row_is_the_mean_and_spread_of_its_seeds(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main("bench", "seed", "--epochs", "1", "--limit", "64", "--seeds", "2", "--out", str(out), "--quiet") == 0
    printed = capsys.readouterr().out
    with open(out / "seed.csv") as fh:
        rows = {r["row"]: r for r in csv.DictReader(fh)}
    for label, slug in (("Iris baseline", "iris-baseline"), ("MNIST fast path (ours)", "mnist-fast-path-ours")):
        runs = [out / slug, out / f"{slug}-seed1"]
        records = [json.loads((r / "record.json").read_text()) for r in runs]
        assert [r["seed"] for r in records] == [0, 1]
        assert not (out / f"{slug}-seed2").exists()
        row = rows[label]
        assert int(row["seeds"]) == 2
        acc = [r["test_accuracy"] for r in records]
        secs = [r["train_seconds"] for r in records]
        assert float(row["test_accuracy"]) == pytest.approx(statistics.fmean(acc))
        assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(acc))
        assert float(row["train_seconds"]) == pytest.approx(statistics.fmean(secs))
        assert float(row["train_seconds_std"]) == pytest.approx(statistics.stdev(secs))
        assert f"{label}: accuracy {statistics.fmean(acc):.4f} ± {statistics.stdev(acc):.4f}" in printed
    assert rows["Iris baseline"]["study_accuracy"] == "1.0" and "(study: 1.0000, 0.28 s)" in printed
    assert "one mistake is 0.033 of accuracy" in printed


def test_seeds_must_be_positive(tmp_path, capsys):
    assert main("bench", "seed", "--seeds", "0", "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["parallelnn: error: --seeds must be positive, got 0"]
    assert not (tmp_path / "b").exists()
