"""parallelnn report: the table's numbers, the PNGs, the index pages, bad input; and bench seed's report.

Most tests write synthetic records with known numbers (so speedup and efficiency can be checked
exactly); one reports over real quick runs.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import main
from parallelnn.record import FORMAT_VERSION
from parallelnn.report import make_report

MNIST = dict(workload="mnist", dataset="mnist-5k (embedded subset)", device="cpu", batch_size=64, epochs=3,
             loader="memory", workers=0, precision="fp32", lr=1e-3, seed=0, train_samples=4000)
GPT2 = dict(workload="gpt2", dataset="tiny-code", device="cpu", batch_size=8, epochs=2, loader="memory",
            workers=0, precision="fp32", lr=5e-4, seed=0, train_samples=160, tokens_per_sample=128)


def write_run(root: Path, name: str, base: dict, strategy: str, world_size: int, sps: float, **extra) -> Path:
    """A run directory with a record.json (known numbers) and a metrics.jsonl of epoch/eval events."""
    out = root / name
    out.mkdir(parents=True)
    epochs = base["epochs"]
    steps_per_epoch = base["train_samples"] // base["batch_size"]
    losses = [round(2.0 / (e + 1) + 0.01 * world_size, 4) for e in range(epochs)]
    accuracy = [0.8 + 0.05 * e for e in range(epochs)] if base["workload"] != "gpt2" else None
    eval_curve = [{"epoch": e + 1, "global_step": (e + 1) * steps_per_epoch, "test_loss": losses[e] * 0.9,
                   **({"test_accuracy": accuracy[e]} if accuracy else {})} for e in range(epochs)]
    record = {"format_version": FORMAT_VERSION, **base, "strategy": strategy, "world_size": world_size,
              "samples_per_second": sps, "train_seconds": base["train_samples"] * epochs / sps,
              "steps": steps_per_epoch * epochs, "mfu": sps / 10000, "loss_curve": losses,
              "eval_curve": eval_curve, "test_loss": eval_curve[-1]["test_loss"],
              "eval_loss": eval_curve[-1]["test_loss"], "out": str(out)}
    if accuracy:
        record["test_accuracy"] = accuracy[-1]
    if base.get("tokens_per_sample"):
        record["tokens_per_second"] = sps * base["tokens_per_sample"]
    record.update(extra)
    (out / "record.json").write_text(json.dumps(record))
    events = []
    for step in range(1, steps_per_epoch * epochs + 1):
        if base["workload"] == "gpt2":  # Hugging Face-style step events, as the gpt2 workload logs them
            events.append({"event": "step", "train/loss": 3.0 / (1 + 0.1 * step), "train/global_step": step,
                           "train/learning_rate": 5e-4 * min(1.0, step / 5), "train/grad_norm": 1.0 + 1.0 / step})
        if step % 5 == 0 or step % steps_per_epoch == 0:
            events.append({"event": "eval", "eval/loss": 2.8 / (1 + 0.05 * step), "eval/runtime": 0.5,
                           "eval/samples_per_second": 40.0, "eval/steps_per_second": 5.0, "train/global_step": step,
                           "train/epoch": step / steps_per_epoch})
        if step % steps_per_epoch == 0:
            e = step // steps_per_epoch
            events.append({"event": "epoch", "train/epoch": e, "train/loss": losses[e - 1], "train/global_step": step})
    (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return out


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "m-single", MNIST, "single", 1, 1000.0)
    write_run(root, "m-ddp2", MNIST, "ddp", 2, 1800.0)
    write_run(root, "m-ddp4", MNIST, "ddp", 4, 3000.0)
    write_run(root, "m-fsdp2", MNIST, "fsdp", 2, 1500.0)
    write_run(root, "m-fsdp4", MNIST, "fsdp", 4, 2000.0)
    write_run(root, "m-ddp2-own", MNIST, "ddp", 2, 1700.0, speedup=1.6, efficiency=0.8,
              baseline={"out": "/elsewhere/m-base", "samples_per_second": 1062.5})
    write_run(root, "m-ddp2-b128", {**MNIST, "batch_size": 128}, "ddp", 2, 2500.0)  # no single run at batch 128
    write_run(root, "g-single", GPT2, "single", 1, 20.0)
    write_run(root, "g-ddp2", GPT2, "ddp", 2, 36.0)
    return root


def table(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "table.csv") as fh:
        return {row["run"]: row for row in csv.DictReader(fh)}


def assert_real_png(path: Path, min_size=(500, 250)) -> None:
    """A PNG that opens, is at least min_size, and is not blank (has ink in it, in more than one colour)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    ink = (pixels < 200).any(axis=2).mean()  # text, axes, bars, lines
    coloured = int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())  # the data (the palette is coloured)
    assert ink > 0.01 and coloured > 300, (path.name, ink, coloured)


def test_table_values_speedup_and_efficiency(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main("report", str(runs), "--out", str(out), "--format", "md,csv,html") == 0
    rows = table(out)
    assert set(rows) == {"m-single", "m-ddp2", "m-ddp4", "m-fsdp2", "m-fsdp4", "m-ddp2-own", "m-ddp2-b128",
                         "g-single", "g-ddp2"}
    expected = {"m-single": (1.0, 1.0), "m-ddp2": (1.8, 0.9), "m-ddp4": (3.0, 0.75), "m-fsdp2": (1.5, 0.75),
                "m-fsdp4": (2.0, 0.5), "m-ddp2-own": (1.6, 0.8), "g-single": (1.0, 1.0), "g-ddp2": (1.8, 0.9)}
    for run, (speedup, efficiency) in expected.items():
        assert float(rows[run]["speedup"]) == pytest.approx(speedup), run
        assert float(rows[run]["efficiency"]) == pytest.approx(efficiency), run
    assert rows["m-ddp2"]["baseline"] == "m-single" and rows["m-single"]["baseline"] == "itself"
    assert rows["m-ddp2-own"]["baseline"] == "m-base (own)"
    assert rows["m-ddp2-b128"]["speedup"] == "" and rows["m-ddp2-b128"]["baseline"] == ""
    assert rows["m-ddp4"]["world_size"] == "4" and rows["m-ddp4"]["strategy"] == "ddp"
    assert float(rows["m-ddp4"]["train_seconds"]) == pytest.approx(4000 * 3 / 3000)
    assert float(rows["m-ddp4"]["mfu"]) == pytest.approx(0.3)
    assert float(rows["m-single"]["test_accuracy"]) == pytest.approx(0.9)
    assert float(rows["g-ddp2"]["tokens_per_second"]) == pytest.approx(36 * 128)
    assert rows["g-ddp2"]["test_accuracy"] == "" and float(rows["g-ddp2"]["eval_loss"]) > 0
    # The same table in Markdown, printed and written.
    printed = capsys.readouterr().out
    assert "| m-ddp4 | mnist | mnist-5k (embedded subset) | ddp | cpu | 4 | memory | 4.00 | 3,000 |  | 3.00 | 0.75 " \
           "| m-single | 0.30 | 0.9000 |" in printed
    assert (out / "table.md").read_text() in printed


def test_plots_are_real_pngs_and_the_index_links_each(runs, tmp_path):
    out = tmp_path / "report"
    paths = make_report([runs], out, "md,csv,html", title="synthetic")
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["curves.png", "hf_metrics.png", "scaling.png", "time_throughput.png"]
    assert paths[0] == out / "index.md" and all(p.exists() for p in paths)
    for name in pngs:
        assert_real_png(out / "plots" / name)
    index = (out / "index.md").read_text()
    assert index.startswith("# synthetic\n")
    linked = re.findall(r"!\[[^\]]+\]\((plots/[^)]+\.png)\)", index)
    assert sorted(Path(p).name for p in linked) == pngs
    # The order of the page: the table, then time/throughput, scaling, curves, gpt2 metrics; one sentence each.
    assert index.index("| run |") < index.index("plots/time_throughput.png") < index.index("plots/scaling.png") \
        < index.index("plots/curves.png") < index.index("plots/hf_metrics.png")
    for block in index.split("\n## ")[2:]:
        sentence = block.split("\n\n")[1]
        assert sentence.endswith(".") and sentence.count(". ") == 0, sentence
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and 'src="plots/' not in page
    assert "<td>m-ddp4</td>" in page


def test_scaling_plot_only_with_several_process_counts(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", MNIST, "single", 1, 1000.0)
    write_run(root, "b", MNIST, "single", 1, 900.0, loader="dataloader")
    out = tmp_path / "report"
    make_report([str(root / "*")], out)  # a glob, as the CLI passes it when quoted
    assert not (out / "plots" / "scaling.png").exists()
    assert not (out / "plots" / "hf_metrics.png").exists()  # no gpt2 run
    assert "scaling.png" not in (out / "index.md").read_text()
    rows = table(out)
    assert rows["a"]["baseline"] == "itself" and rows["b"]["baseline"] == "itself"  # same loader preferred


def test_report_over_real_runs(tmp_path):
    from parallelnn.config import RunConfig
    from parallelnn.runner import execute

    records = [execute(RunConfig(workload="mnist", epochs=2, limit=512, quiet=True, out=str(tmp_path / "m"))),
               execute(RunConfig(workload="iris", epochs=3, quiet=True, out=str(tmp_path / "i")))]
    out = tmp_path / "report"
    assert main("report", str(tmp_path / "m"), str(tmp_path / "i" / "record.json"), "--out", str(out)) == 0
    rows = table(out)
    for name, rec in zip(("m", "i"), records):
        assert float(rows[name]["samples_per_second"]) == pytest.approx(rec["samples_per_second"])
        assert float(rows[name]["train_seconds"]) == pytest.approx(rec["train_seconds"])
        assert float(rows[name]["test_accuracy"]) == pytest.approx(rec["test_accuracy"])
        assert rows[name]["speedup"] == "1.0" and rows[name]["baseline"] == "itself"
    for name in ("time_throughput.png", "curves.png"):
        assert_real_png(out / "plots" / name)
    # Record dicts, as bench passes them, give the same table.
    again = tmp_path / "again"
    make_report(records, again)
    assert table(again) == rows


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parallelnn: error:"), err
    return err[0]


def test_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main("report") == 2
    assert "RUN_DIR_OR_GLOB" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main("report", str(tmp_path / "empty")) == 2
    assert "no record.json" in one_error_line(capsys)
    assert main("report", str(tmp_path / "nothing-*")) == 2
    assert "matches no file" in one_error_line(capsys)
    assert main("report", str(tmp_path / "absent")) == 2
    assert "no such file" in one_error_line(capsys)
    newer = write_run(tmp_path / "runs", "newer", MNIST, "single", 1, 1000.0, format_version=FORMAT_VERSION + 1)
    assert main("report", str(newer)) == 2
    assert "newer than this parallelnn understands" in one_error_line(capsys)
    assert main("report", str(newer), "--format", "pdf") == 2
    assert "--format pdf" in one_error_line(capsys)
    assert not (tmp_path / "runs" / "report").exists() and not list(tmp_path.glob("runs/report-*"))


def test_unreadable_records_are_skipped_and_listed(runs, tmp_path, capsys):
    (runs / "torn").mkdir()
    (runs / "torn" / "record.json").write_text('{"workload": "mnist", ')
    write_run(runs, "newer", MNIST, "single", 1, 1.0, format_version=FORMAT_VERSION + 1)
    out = tmp_path / "report"
    assert main("report", str(runs), "--out", str(out)) == 0
    captured = capsys.readouterr()
    assert "report of 9 runs (2 skipped)" in captured.out
    warnings = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(warnings) == 2 and any("torn" in w and "unreadable" in w for w in warnings)
    assert "newer" not in table(out) and "torn" not in table(out)
    index = (out / "index.md").read_text()
    assert "Skipped (unusable records)" in index and "newer" in index and "torn" in index


def test_bench_seed_writes_the_report_next_to_its_records(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main("bench", "seed", "--epochs", "1", "--limit", "256", "--out", str(out), "--quiet") == 0
    assert (out / "seed.md").exists() and (out / "seed.csv").exists()  # the study's table, as before
    index = (out / "index.md").read_text()
    assert "The study's rows beside ours" in index and "316.18" in index  # the study's MNIST baseline seconds
    rows = table(out)
    assert set(rows) >= {"iris-baseline", "iris-fast-path-ours", "mnist-baseline", "mnist-fast-path-ours"}
    for name in ("time_throughput.png", "curves.png"):
        assert_real_png(out / "plots" / name)
    assert (out / "index.html").read_text().count("data:image/png;base64,") == 2


def test_bench_scaling_runs_each_strategy_as_a_command_and_notes_what_cannot_run(tmp_path):
    """bench scaling: the single-process baseline, each strategy at 1..N, speedups against the baseline
    measured in the same bench, and a layout that cannot work listed with the reason."""
    import csv

    from conftest import cli

    out = tmp_path / "bench"
    proc = cli("bench", "scaling", "iris", "--max-nproc", "3", "--strategies", "pipeline", "--epochs", "2",
               "--out", str(out), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["strategy"], r["nproc"]) for r in rows] == [("single", "1"), ("pipeline", "2"), ("pipeline", "3")]
    assert float(rows[0]["speedup"]) == 1.0
    ran = rows[1]
    assert float(ran["speedup"]) > 0 and ran["mesh"] == "pp2" and ran["note"] == ""
    assert rows[2]["note"].startswith("skipped: 3 pipeline stages but the iris model has only 2 layers")
    assert (out / "report" / "index.md").is_file() and (out / "pipeline-2" / "record.json").is_file()
