"""The strategy contract: the registry is the modules of ``parallelnn/parallel``, and nothing else names them.

The design's test: a copy of ``parallel/ddp.py`` whose name strings say ``ddp_copy`` is a new strategy that
runs with two processes, shows up in ``bench scaling`` and in ``report``, with no other edit.
"""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import ROOT, cli
from parallelnn import parallel
from parallelnn.config import RunConfig
from parallelnn.errors import UserError


@pytest.fixture
def ddp_copy():
    source = ROOT / "parallelnn" / "parallel" / "ddp.py"
    copy = source.with_name("ddp_copy.py")
    copy.write_text(source.read_text().replace('"ddp"', '"ddp_copy"'))
    try:
        yield "ddp_copy"
    finally:
        copy.unlink()
        shutil.rmtree(copy.parent / "__pycache__", ignore_errors=True)


@pytest.mark.distributed
def test_a_copied_strategy_module_is_a_strategy_everywhere(ddp_copy, tmp_path):
    out = tmp_path / "bench"
    proc = cli("bench", "scaling", "mnist", "--max-nproc", "2", "--strategies", ddp_copy, "--epochs", "1",
               "--limit", "256", "--out", str(out), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["strategy"], r["nproc"]) for r in rows] == [("single", "1"), (ddp_copy, "1"), (ddp_copy, "2")]
    assert all(r["note"] == "" for r in rows) and float(rows[2]["speedup"]) > 0
    # The two-process row is `parallelnn run mnist --strategy ddp_copy --nproc 2`: its own record says so.
    record = (out / f"{ddp_copy}-2" / "record.json").read_text()
    assert f'"strategy": "{ddp_copy}"' in record and '"world_size": 2' in record

    report = tmp_path / "report"
    proc = cli("report", str(out), "--out", str(report), "--format", "csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = list(csv.DictReader((report / "table.csv").open()))
    assert [r["strategy"] for r in table] == ["single", ddp_copy, ddp_copy]  # ordered as the registry says

    help_text = cli("run", "--help").stdout
    assert ddp_copy in help_text


def test_registry_is_discovered_in_table_order():
    assert parallel.names() == ["single", "ddp", "fsdp", "pipeline", "tensor", "hybrid"]
    assert [parallel.order(n) for n in parallel.names()] == list(range(6))
    assert parallel.order("not-a-strategy") == 6


@pytest.mark.parametrize("options, nproc, layout", [
    ({"strategy": "single"}, 1, parallel.Layout()),
    ({"strategy": "ddp"}, 3, parallel.Layout(dp=3)),
    ({"strategy": "fsdp"}, 2, parallel.Layout(dp=2)),
    ({"strategy": "pipeline"}, 4, parallel.Layout(pp=4)),
    ({"strategy": "tensor"}, 2, parallel.Layout(tp=2)),
    ({"strategy": "hybrid", "mesh": "2x2"}, 4, parallel.Layout(dp=2, tp=2)),
    ({"strategy": "hybrid", "mesh": "2x3", "hybrid": "pipeline"}, 6, parallel.Layout(dp=2, pp=3)),
])
def test_each_strategy_states_its_degrees(options, nproc, layout):
    cfg = RunConfig(workload="mnist", nproc=nproc, **options)
    strategy, got = parallel.resolve(cfg)
    assert strategy.name == options["strategy"] and got == layout and got.world_size == nproc


@pytest.mark.parametrize("options, message", [
    ({"strategy": "single", "nproc": 2}, "--strategy single runs at most 1 process; for 2 choose ddp, fsdp"),
    ({"strategy": "tensor"}, "--strategy tensor needs at least 2 processes"),
    ({"strategy": "hybrid", "nproc": 4}, "--strategy hybrid needs --mesh"),
    ({"strategy": "hybrid", "nproc": 4, "mesh": "3x2"}, "--mesh 3x2 has 6 ranks but the job has 4"),
    ({"strategy": "ddp", "nproc": 2, "mesh": "1x2"}, "--mesh applies to --strategy hybrid only"),
    ({"strategy": "ddp", "nproc": 2, "schedule": "gpipe"}, "--schedule applies to --strategy pipeline or hybrid"),
    ({"strategy": "nope"}, "unknown strategy 'nope': choose one of single, ddp, fsdp, pipeline, tensor, hybrid"),
])
def test_impossible_layouts_are_refused_in_one_line(options, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        parallel.resolve(RunConfig(workload="mnist", **options))


def test_bench_plan_asks_each_strategy():
    from parallelnn.bench import plan

    rows = plan(["ddp", "tensor", "hybrid"], 4)
    assert rows[0] == ("single", 1, [])
    assert ("tensor", 1, []) not in rows and ("tensor", 2, []) in rows
    assert [r for r in rows if r[0] == "hybrid"] == [("hybrid", 4, ["--mesh", "2x2"])]
