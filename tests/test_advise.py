"""``parallelnn advise`` here: the collective fit, the model's statistics, a quick advise of Iris end to end
(memory per strategy against the tensor bytes its trials measured), and each bad input."""

from __future__ import annotations

import json
import re
import textwrap
import time

import pytest
import torch

from conftest import cli, main, record
from parallelnn import measure
from parallelnn.advise import calibrate
from parallelnn.advise import probe as probes
from parallelnn.advise.stats import model_stats
from parallelnn.config import RunConfig
from parallelnn.runner import build_workload


def test_the_collective_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 40e-6, 2e9
    points = [(b, latency + b / bandwidth) for b in calibrate.SIZES]
    fitted = calibrate.fit(points)
    assert fitted["latency"] == pytest.approx(latency, rel=1e-6)
    assert fitted["bandwidth"] == pytest.approx(bandwidth, rel=1e-6)
    noisy = [(b, t * (1.05 if i % 2 else 0.95)) for i, (b, t) in enumerate(points)]  # ±5% noise
    assert calibrate.fit(noisy)["bandwidth"] == pytest.approx(bandwidth, rel=0.15)
    # A run of late wake-ups (~4 ms each, seen here in threads and processes alike) at the smallest size: it
    # counts as the next size's time, so the fit keeps a latency (it came out 0) and the bandwidth.
    late = [(b, 4e-3 if b == calibrate.SIZES[0] else t) for b, t in points]
    fitted = calibrate.fit(late)
    assert latency <= fitted["latency"] <= latency + calibrate.SIZES[1] / bandwidth
    assert fitted["bandwidth"] == pytest.approx(bandwidth, rel=0.1)


def test_timed_steps_leave_the_warm_up_out():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.02 if len(calls) <= 3 else 0.001)  # three slow first steps, as a cold model has

    seconds = measure.timed_steps(step)
    assert seconds < 0.01 and len(calls) >= measure.WARMUP[0] + measure.MEASURE[0]
    assert len(calls) <= measure.MOST_STEPS


def test_pipeline_stages_are_timed_on_the_real_layers():
    """The MNIST CNN's convolutions (layers 0-5) cost far more per sample than its fully connected head."""
    cfg, workload = build_workload(RunConfig(workload="mnist", quiet=True), torch.device("cpu"), lambda m: None)
    found = calibrate.stage_seconds(workload, cfg, [(0, 6, 16), (6, 12, 16)], threads=1)
    assert set(found) == {"0-6-16", "6-12-16"}
    assert found["0-6-16"] > 2 * found["6-12-16"] > 0


def test_ballast_is_compute_without_effect(monkeypatch):
    """The probe's ballast: an identity for values and gradients, with a third of its matrix products in the
    forward and two thirds in the backward, in proportion to the batch."""
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(1) or real_mm(a, b))
    layer = probes.Ballast(seconds_per_sample=1e-3, mm_seconds=1e-4)  # 10 products per sample
    x = torch.randn(3, 4, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, x) and len(calls) == 10
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4)) and len(calls) == 30
    # A probe's first block: its input needs no gradient, yet its backward computes, as the real first layer's
    # weight gradients do.
    layer(torch.randn(3, 4)).sum().backward()
    assert len(calls) == 60 and layer.anchor.grad is None


def test_a_pipeline_probe_subtracts_its_stages_compute_and_bubble():
    """What a pipeline's probe step would take without fixed costs: its busiest rank's ballast over the per-rank
    batch (here 2 of 4 equal blocks) and 1F1B's bubble over 4 microbatches ((p-1)/m of that share); a probe
    without ballast, or without a pipeline, subtracts its plain step instead."""
    from dataclasses import replace

    from parallelnn.parallel import Layout

    cfg = replace(RunConfig(workload="iris", quiet=True, batch_size=16), strategy="pipeline", schedule="1f1b",
                  microbatches=4)
    loaded = probes.probe_workload(4, cfg, ballast=1e-5, mm=1e-5)
    assert probes._without_fixed(cfg, loaded, Layout(pp=2)) == pytest.approx(2e-5 * 16 * (1 + 1 / 4))
    assert probes._rank_ballast(cfg, probes.probe_workload(4, cfg), Layout(pp=2)) is None
    assert probes._rank_ballast(cfg, loaded, Layout(dp=2)) is None
    # Three blocks on two stages: the busiest holds two, and the light one's microbatch is the bubble.
    odd = probes.probe_workload(3, cfg, ballast=1e-5, mm=1e-5)
    assert probes._without_fixed(cfg, odd, Layout(pp=2)) == pytest.approx(3.2e-4 + 3.2e-4 / 4 * 0.5)
    # The plain step it is measured against makes the pipeline's passes, a microbatch each (the stages' compute
    # is timed per microbatch: what each pass costs is compute, not the schedule's).
    assert probes._plain_passes(cfg, Layout(pp=2), 16) == 4 and probes._plain_passes(cfg, Layout(dp=2), 8) == 1
    interleaved = replace(cfg, schedule="interleaved-1f1b", microbatches=None)
    assert probes._plain_passes(interleaved, Layout(pp=2), 16) == 8  # 2 x 4 stages by default


def test_a_pipeline_probe_stands_for_the_real_stages():
    """A block a stage, each loaded with its stage's timed seconds and sending its real boundary's bytes: split
    where its blocks begin, each stage holds one block; the ranks' shares of the work are their ballast's."""
    from dataclasses import replace

    from parallelnn.parallel import Layout, pipeline

    cfg = replace(RunConfig(workload="iris", quiet=True, batch_size=16), strategy="pipeline", schedule="1f1b",
                  microbatches=4)
    probe = probes.probe_workload(3, cfg, mm=1e-5, ballasts=[3e-5, 0.0, 1e-5], widths=[100, 16])
    starts = probes.block_starts(probe)
    split = replace(cfg, split=",".join(map(str, starts)))
    bounds = pipeline.stage_bounds(split, probe, 3)
    layers = probe.layers(probe.model)
    assert [sum(isinstance(m, torch.nn.Linear) for m in layers[a:b]) for a, b in bounds] == [1, 1, 1]
    x = probe.train.inputs[:5]
    stage = [torch.nn.Sequential(*layers[a:b]) for a, b in bounds]
    assert stage[0](x).shape == (5, 100)  # the first stage sends 100 floats a sample
    assert stage[1](torch.zeros(5, 100)).shape == (5, 16)
    assert probe.model(x).shape == (5, 16)
    four = probes.probe_workload(4, cfg, mm=1e-5, ballasts=[3e-5, 1e-5, 2e-5, 1e-5])
    interleaved = replace(cfg, schedule="interleaved-1f1b", split=",".join(map(str, probes.block_starts(four))))
    assert probes._rank_ballast(interleaved, four, Layout(pp=2)) == pytest.approx([5e-5, 2e-5])  # 0+2, 1+3
    assert probes._rank_ballast(split, probe, Layout(pp=3)) == pytest.approx([3e-5, 0.0, 1e-5])


def test_trials_measure_a_second_of_steps_at_least_twelve():
    from hypothesis import given
    from hypothesis import strategies as st

    from parallelnn.advise import trials

    assert trials.steps_to_measure(None) == trials.MEASURED_STEPS == 12
    assert trials.steps_to_measure(0.5) == 12 and trials.steps_to_measure(0.01) == 100
    assert trials.steps_to_measure(1e-5) == trials.MOST_MEASURED_STEPS

    @given(st.floats(min_value=1e-6, max_value=100.0))
    def within_bounds(seconds):
        n = trials.steps_to_measure(seconds)
        assert trials.MEASURED_STEPS <= n <= trials.MOST_MEASURED_STEPS
        assert n * seconds >= trials.MEASURED_SECONDS or n == trials.MOST_MEASURED_STEPS

    within_bounds()


@pytest.mark.distributed
def test_fixed_costs_are_measured_on_a_probe_of_the_candidates_layout():
    """Two processes run each candidate's own strategy on a model of three 16-wide blocks: FSDP's hooks and
    per-block gathers cost a step far more than DDP's one bucket, and tensor parallelism's all-reduces cost
    something (its plain step, the one subtracted, is the probe before the strategy made its weights
    DTensors: a copy taken after would run the same all-reduces and leave nothing)."""
    from parallelnn.advise.costs import Candidate
    from parallelnn.parallel import Layout

    cfg, _ = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    group = [Candidate("ddp", Layout(dp=2)), Candidate("fsdp", Layout(dp=2)), Candidate("tensor", Layout(tp=2))]
    assert probes.probe_units(3, group) == 3
    # A pipeline's probe stands for its real stages (iris' two Linear layers, 50 features between them).
    pipe = Candidate("pipeline", Layout(pp=2), microbatches=2, schedule="1f1b")
    shapes = {pipe.label(): {"stages": [[0, 2], [2, 3]], "widths": [50]}}
    measured = calibrate.spawn(2, cfg, [], [], group + [pipe], 3, timeout=120, shapes=shapes)
    assert set(measured["fixed"]) == {"ddp dp2", "fsdp dp2", "tensor tp2", pipe.label()}
    assert measured["fixed"]["fsdp dp2"] > measured["fixed"]["ddp dp2"] >= 0
    assert measured["fixed"]["tensor tp2"] > 1e-3  # 3.6-3.9 ms here; 0-2.6 ms with the copy taken after
    assert set(measured["collectives"]) == set(calibrate.KINDS)


def test_one_process_measures_the_links_and_the_strategies_own_code_for_two():
    """Calibrating two ranks in one process (extrapolation, and the fallback when two processes fail): gloo's
    collectives between two ranks that are threads, fitted like two processes'; each candidate's fixed cost as
    rank 0 of two under a fake process group, its collective calls per step counted as issued (FSDP: two
    all-gathers and a reduce-scatter per block; tensor parallelism: the one row-wise all-reduce of the
    probe's single Linear pair; DDP: its one bucket's all-reduce, through a Python comm hook (the reducer's
    built-in one reads the all-reduce's result, which a fake group has not); a two-stage 1F1B pipeline at 4
    microbatches: a send or receive per microbatch each way, its stages given their shapes since no peer
    answers the first step's; all: the trainer's stop-flag all-reduce)."""
    from parallelnn.advise.costs import Candidate
    from parallelnn.parallel import Layout

    cfg, _ = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    group = [Candidate("ddp", Layout(dp=2)), Candidate("fsdp", Layout(dp=2)), Candidate("tensor", Layout(tp=2))]
    pipe = Candidate("pipeline", Layout(pp=2), microbatches=4, schedule="1f1b")
    shapes = {pipe.label(): {"stages": [[0, 2], [2, 3]], "widths": [50]}}
    measured = calibrate.alone_seconds(2, cfg, group + [pipe], 3, {}, {}, timeout=180, resized={"fsdp dp2": 5},
                                       shapes=shapes)
    assert set(measured["collectives"]) == set(calibrate.KINDS)
    for kind, fit in calibrate.fitted(measured["collectives"]).items():
        assert 0 < fit["latency"] < 0.05 and fit["bandwidth"] > 1e7, (kind, fit)
    assert measured["calls"]["fsdp dp2"] == {"all_gather": 6, "reduce_scatter": 3, "all_reduce": 1}
    assert measured["calls"]["tensor tp2"] == {"all_reduce": 2}
    assert measured["calls"]["ddp dp2"] == {"all_reduce": 2}
    assert measured["calls"][pipe.label()] == {"send_recv": 8, "all_reduce": 1}
    assert set(measured["fixed"]) == {"ddp dp2", "fsdp dp2", "tensor tp2", pipe.label()}
    assert measured["fixed"]["fsdp dp2"] > measured["fixed"]["tensor tp2"] > 0
    assert measured["fixed"]["ddp dp2"] > 0 and measured["fixed"][pipe.label()] > 0
    size, seconds = measured["fixed_resized"]["fsdp dp2"]  # FSDP timed again on a probe of 5 blocks
    assert size == 5 and seconds > 0 and set(measured["fixed_resized"]) == {"fsdp dp2"}


def test_pipeline_stages_under_a_fake_group_are_given_the_shapes_their_peers_would_send():
    """No peer answers a stage's first step under a fake process group, so each stage is told what it takes
    and returns per sample: the CNN's three stages pass 32 maps of 28x28 and 64 of 14x14 (after the pooling),
    in the dtype the run's autocast computes in (the data into the first stage stays as loaded)."""
    from parallelnn.parallel import pipeline

    f32, bf16 = torch.float32, torch.bfloat16
    for precision, dtype in (("fp32", f32), ("bf16", bf16)):
        cfg, workload = build_workload(RunConfig(workload="mnist", quiet=True, precision=precision),
                                       torch.device("cpu"), lambda m: None)
        layers, bounds = workload.layers(workload.model), pipeline.stage_bounds(cfg, workload, 3)
        maps, pooled = ((32, 28, 28), dtype), ((64, 14, 14), dtype)
        assert pipeline.example_io(cfg, workload, layers, bounds, [0, 1, 2]) == [
            ([((1, 28, 28), f32)], [maps]), ([maps], [pooled]), ([pooled], [((10,), dtype)])]
        assert pipeline.example_io(cfg, workload, layers, bounds, [2]) == [([pooled], [((10,), dtype)])]
    # as PipelineStage's example arguments, per microbatch of 8: gradients wanted except for the loaded data
    first = pipeline._examples(([((1, 28, 28), f32)], [maps]), 8, torch.device("cpu"), first=True)
    assert first["input_args"][0].shape == (8, 1, 28, 28) and not first["input_args"][0].requires_grad
    assert first["output_args"][0].shape == (8, 32, 28, 28) and first["output_args"][0].requires_grad
    assert pipeline._examples(([maps], [pooled]), 8, torch.device("cpu"), first=False)["input_args"][0].requires_grad
    assert pipeline._examples(None, 8, torch.device("cpu"), first=True) == {}


def test_a_fixed_cost_is_carried_to_the_models_size_along_the_line_through_two_probes():
    """A step pays part of a strategy's fixed cost once (the optimizer over sharded parameters, the loss's
    input, the stop flag) and part per block or call: two probe sizes give both parts; one, a proportion."""
    from parallelnn.advise.local import per_unit_line

    assert per_unit_line([(2, 8e-3)], 1) == pytest.approx(4e-3)  # one probe: all of it per unit
    # 3 ms once + 5 ms per unit, probed at 1 and 2 units: 8 ms at 1 unit... read at the real model's 4
    assert per_unit_line([(1, 8e-3), (2, 13e-3)], 4) == pytest.approx(23e-3)
    assert per_unit_line([(2, 13e-3), (1, 8e-3)], 1) == pytest.approx(8e-3)  # a probe of the model's count: as is
    assert per_unit_line([(1, 8e-3), (3, 6e-3)], 6) == pytest.approx(6e-3)  # noise never makes a unit cost < 0
    assert per_unit_line([(4, 1e-3), (6, 9e-3)], 1) == 0.0  # nor the cost itself


def test_a_second_probe_size_is_chosen_where_the_models_count_differs_from_the_probes():
    """A probe of 16-wide blocks (what a strategy gets when its probe cannot take the real model's shape) for
    Iris' MLP, two blocks and one Linear pair: one of 4 blocks counts 5 FSDP units (blocks and the root) and 2
    row-wise all-reduces, so both strategies are timed again at 2 blocks, whose counts are the model's; DDP's
    fixed cost does not grow with the model and is timed once. Shaped as the real model (FSDP's blocks as large,
    tensor parallelism's pair as wide), a probe is timed once and its fixed cost taken as measured."""
    from parallelnn.advise.costs import Candidate, ModelStats
    from parallelnn.advise.local import Machine
    from parallelnn.parallel import Layout

    cfg, workload = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    machine = Machine(workload, cfg, ModelStats(**model_stats(workload)))
    group = [Candidate("ddp", Layout(dp=2)), Candidate("fsdp", Layout(dp=2)), Candidate("tensor", Layout(tp=2))]
    measured = {"fixed": {"ddp dp2": 1e-3, "fsdp dp2": 10e-3, "tensor tp2": 6e-3},
                "fixed_resized": {"fsdp dp2": [2, 7e-3], "tensor tp2": [2, 4e-3]}}
    shapes = machine._shapes(group)
    assert shapes == {"fsdp dp2": {"parameters": [250, 153]}, "tensor tp2": {"pairs": [[4, 3]]}}
    assert machine._resized(group, 4, shapes) == {}
    machine._fixed(group, measured, 4, shapes)
    assert machine.fixed == pytest.approx({"ddp dp2": 1e-3, "fsdp dp2": 10e-3, "tensor tp2": 6e-3})
    # 16-wide probes:
    assert machine._resized(group, 4, {}) == {"fsdp dp2": 2, "tensor tp2": 2}
    assert machine._probe_counts("fsdp", 2) == 3 and machine._probe_counts("tensor", 2) == 1
    assert machine._resized(group, 2, {}) == {}  # the probe's counts are the model's already
    machine._fixed(group, measured, 4, {})
    assert machine.fixed == pytest.approx({"ddp dp2": 1e-3, "fsdp dp2": 7e-3, "tensor tp2": 4e-3})


def test_a_tensor_parallel_probe_all_reduces_the_real_pairs_bytes():
    """MNIST's plan shards fc1 (3,136 inputs) column-wise and fc2 (64 outputs) row-wise: its probe's pair reads
    3,136 features and writes 64, with 16 between, and the generic plan shards it the same way."""
    from parallelnn.parallel.tensor import NamedPlan, linear_pairs, plan_of, sequential_pairs

    cfg, workload = build_workload(RunConfig(workload="mnist", quiet=True), torch.device("cpu"), lambda m: None)
    assert linear_pairs(workload, workload.model) == [[3136, 64]]
    probe = probes.probe_workload(2, cfg, mm=1e-5, ballast=1e-6, pairs=[[3136, 64], [8, 10]])
    plan, replicated = sequential_pairs(probe.model)
    linears = [m for m in probe.model if isinstance(m, torch.nn.Linear)]
    assert list(plan.values()) == ["colwise", "rowwise"] * 2 and not replicated
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 16), (16, 64), (16, 16), (16, 10)]
    assert probe.model(probe.train.inputs[:3]).shape == (3, 16)
    # A plan of two column-wise layers into one row-wise (as q, k, v into o) is no chain of pairs: no such probe.
    workload.tensor_plan = {"7": "colwise", "9": "colwise", "11": "rowwise"}
    assert isinstance(plan_of(workload), NamedPlan) and linear_pairs(workload, workload.model) is None


def test_model_statistics_of_the_mnist_cnn():
    cfg, workload = build_workload(RunConfig(workload="mnist", quiet=True), torch.device("cpu"), lambda m: None)
    s = model_stats(workload)
    assert s["parameters"] == 429_258 and s["parameter_bytes"] == 4 * 429_258
    assert s["flops_per_sample"] == pytest.approx(25.04e6, rel=0.01)
    # Saved for backward per sample: conv1 in/out, ReLU, pool (32x28x28 floats and indices), conv2 ... about 0.26 MB.
    assert 0.2e6 < s["activation_bytes_per_sample"] < 0.35e6
    assert s["layers"] == 12 and s["largest_layer_parameters"] == 3136 * 128 + 128
    assert s["blocks"] == 5  # the layers with parameters: what FSDP shards one by one
    assert s["boundary_bytes_per_sample"] == 32 * 28 * 28 * 4  # the widest layer output
    assert s["tp_sharded_fraction"] > 0.9 and s["tp_sharded_flops_fraction"] < 0.15  # FC: most weights, few FLOPs
    # Tensor parallelism all-reduces fc2's 64 outputs in the forward, and the gradient of fc1's input (the 3,136
    # flattened features, a partial sum on each rank) in the backward: 49 times the bytes.
    assert s["tp_allreduce_bytes_per_sample"] == 64 * 4 and s["tp_allreduce_calls"] == 1
    assert s["tp_backward_allreduce_bytes_per_sample"] == 3136 * 4 and s["tp_backward_allreduce_calls"] == 1


def test_a_probe_for_fsdp_holds_the_real_blocks_parameters():
    """FSDP moves parameters: its probe has the real model's blocks, each as large (the root's own parameters
    go to the first block); the gathers and reduce-scatters then move the real bytes under the real load."""
    from parallelnn.advise.costs import Candidate, ModelStats
    from parallelnn.advise.local import Machine
    from parallelnn.parallel import Layout
    from parallelnn.parallel.engine import blocks_of

    cfg, workload = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    machine = Machine(workload, cfg, ModelStats(**model_stats(workload)))
    shapes = machine._shapes([Candidate("fsdp", Layout(dp=2)), Candidate("ddp", Layout(dp=2))])
    assert shapes == {"fsdp dp2": {"parameters": [4 * 50 + 50, 50 * 3 + 3]}}
    probe = probes.probe_workload(3, cfg, parameters=[1000, 300, 5000])
    assert [sum(p.numel() for p in b.parameters()) for b in blocks_of(probe.model, probe)] == [1000, 300, 5000]
    x = probe.train.inputs[:4]
    probe.model(x).sum().backward()  # the padding's gradient exists (zeros), so FSDP reduce-scatters it
    assert all(b.pad.grad is not None and not b.pad.grad.any() for b in blocks_of(probe.model, probe))


def test_the_training_loop_costs_a_step_more_than_its_engine():
    """A real run of a one-block probe steps slower than its engine alone (the trainer's bookkeeping, the
    loader, the timing marks): a fraction of a millisecond here, never negative, never a whole step of MNIST."""
    cfg, _ = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    loop = calibrate.loop_seconds(cfg, torch.device("cpu"), steps=100)
    assert 0 <= loop < 5e-3


def test_a_failed_calibration_of_several_processes_is_said_and_the_advice_goes_on(monkeypatch):
    """If the N processes measuring together fail (a crashed rank, a timeout), the candidates are predicted
    from one process's measurements, and the advice says so instead of ending in a traceback."""
    from parallelnn.advise.costs import Candidate, ModelStats
    from parallelnn.advise.local import Machine
    from parallelnn.parallel import Layout

    def crash(*args, **kwargs):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:20365")

    monkeypatch.setattr(calibrate, "spawn", crash)
    cfg, workload = build_workload(RunConfig(workload="iris", quiet=True), torch.device("cpu"), lambda m: None)
    machine = Machine(workload, cfg, ModelStats(**model_stats(workload)))
    machine.loop = 0.0
    ddp = Candidate("ddp", Layout(dp=2))
    machine.calibrate([ddp], cfg.batch_size)
    assert machine.problems == ["calibrating 2 processes at once failed (Connection closed by peer "
                                "[127.0.0.1]:20365); their predictions use one process's measurements"]
    prediction = machine.predict(ddp, cfg.batch_size)
    assert prediction.feasible and prediction.step_seconds > 0 and 2 in machine.links


def test_gpu_memory_parts_are_the_measured_peak_less_what_is_counted_and_the_resident_splits():
    """On a GPU a rank's estimate adds the allocator's measured step peak less the parts the model counts
    (model state, saved activations) and the splits the memory loader keeps on the device (here: the numbers
    alone, on a CPU, with a peak given instead of measured)."""
    from parallelnn.advise.costs import Candidate, ModelStats
    from parallelnn.advise.local import Machine, resident_bytes
    from parallelnn.parallel import Layout

    cfg, workload = build_workload(RunConfig(workload="mnist", quiet=True), torch.device("cpu"), lambda m: None)
    assert resident_bytes(workload) == (4000 + 1000) * (28 * 28 * 4 + 8)  # float pixels, int64 labels
    assert resident_bytes(workload, train_samples=2048) == (2048 + 1000) * (28 * 28 * 4 + 8)
    stats = ModelStats(**model_stats(workload))
    machine = Machine(workload, cfg, stats)
    machine.rates[(1, 64)], machine.updates[1] = 1e9, [0.0]  # no calibration: these parts need none
    single = Candidate("single", Layout())
    counted = 4 * stats.parameter_bytes + stats.activation_bytes_per_sample * 64 + stats.activation_fixed_bytes
    machine.step_bytes[64] = int(counted) + 50_000_000
    parts = machine._gpu_memory(single, 64, machine.hardware(single, 64), "fp32")
    assert parts["runtime"] == pytest.approx(50e6, abs=2) and parts["data"] == resident_bytes(workload)
    machine.step_bytes[64] = 1  # a peak below the counted parts leaves nothing for the runtime, not less
    assert machine._gpu_memory(single, 64, machine.hardware(single, 64), "fp32")["runtime"] == 0


@pytest.fixture(scope="module")
def iris_advice(tmp_path_factory):
    out = tmp_path_factory.mktemp("advise") / "iris"
    proc = cli("advise", "iris", "--nproc-max", "2", "--trials", "3", "--budget-seconds", "150", "--json",
               "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out


@pytest.mark.distributed
def test_quick_advise_of_iris(iris_advice):
    advice, out = iris_advice
    rec = advice["recommendation"]
    assert set(rec) >= {"strategy", "nproc", "mesh", "microbatches", "predicted_samples_per_second",
                        "measured_samples_per_second"} and rec["measured_samples_per_second"] > 0
    assert rec["sentence"].startswith(rec["label"])
    keys = {"strategy", "nproc", "mesh", "microbatches", "feasible", "reason", "memory_bytes_per_rank",
            "predicted_step_seconds", "measured_step_seconds"}
    assert all(keys <= set(c) for c in advice["candidates"])
    measured = [c for c in advice["candidates"] if c["measured_step_seconds"]]
    assert len(measured) >= 3 and any(c["nproc"] == 1 for c in measured)
    best = min(c["measured_step_seconds"] for c in measured)
    assert rec["measured_samples_per_second"] == pytest.approx(advice["batch_size"] / best, rel=1e-6)
    refused = [c for c in advice["candidates"] if not c["feasible"]]
    assert any("pipeline stages" in c["reason"] for c in refused)  # interleaved: 4 stages, 2 layers
    assert json.loads((out / "advice.json").read_text()) == json.loads(json.dumps(advice, default=str))
    assert (out / "advice.png").stat().st_size > 5000


@pytest.mark.distributed
def test_memory_per_rank_matches_the_tensors_each_trial_held(iris_advice):
    """Predicted bytes per rank against the tensor bytes the trials counted (parameters, gradients, optimizer
    state, saved activations). FSDP's gathered-block buffers are predicted but not seen by that count."""
    advice, _ = iris_advice
    for c in advice["candidates"]:
        if not c["measured_tensor_bytes"] or c["strategy"] == "fsdp":
            continue
        # the largest rank by what the count sees (not always the largest with the buffers: pipeline stages)
        predicted = max(sum(r.values()) - r["buffers"] for r in c["memory_per_rank"] or [c["memory_breakdown"]])
        assert predicted == pytest.approx(c["measured_tensor_bytes"], rel=0.1), c["label"]
        assert predicted >= 0.95 * c["measured_tensor_bytes"], c["label"]


@pytest.mark.distributed
def test_each_pipeline_rank_is_predicted_the_tensors_it_held(tmp_path):
    """Four stages of the CNN, 1F1B at 16 microbatches: the stages hold different parts (the 3136x128 layer on
    rank 2, the activations in flight on rank 1; rank 1's receive buffers make it the largest in all), and each
    rank's prediction matches what it held, part by part."""
    from test_advise_model import HW  # a GPU node's figures: memory does not depend on them

    from parallelnn.advise.costs import Candidate, ModelStats, predict_step
    from parallelnn.parallel import Layout

    out = tmp_path / "pp4"
    proc = cli("run", "mnist", "--strategy", "pipeline", "--schedule", "1f1b", "--microbatches", "16", "--nproc", "4",
               "--epochs", "1", "--limit", "256", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = [r["tensor_bytes"] for r in record(out)["per_rank"]]
    _, workload = build_workload(RunConfig(workload="mnist", quiet=True), torch.device("cpu"), lambda m: None)
    p = predict_step(ModelStats(**model_stats(workload)), HW, Candidate("pipeline", Layout(pp=4), 16, "1f1b"), 64,
                     "fp32")
    assert len(p.memory_per_rank) == 4 and p.memory_breakdown == max(p.memory_per_rank, key=lambda r: sum(r.values()))
    for rank, (predicted, seen) in enumerate(zip(p.memory_per_rank, held)):
        for part in ("parameters", "gradients", "optimizer", "activations"):
            assert predicted[part] == pytest.approx(seen[part], rel=0.05, abs=1e4), (rank, part)
    largest = max(range(4), key=lambda r: held[r]["total"])
    assert largest == 2 and max(range(4), key=lambda r: sum(p.memory_per_rank[r].values())) == 1


def test_saved_bytes_are_freed_by_backward_even_where_the_tensor_lives_on():
    """A pipeline stage keeps each microbatch's received input between steps; the activation count lets it go
    when backward frees what was saved, and reads the peak at the first backward after any forward (a sample
    every 32 reads missed peaks between them)."""
    from parallelnn.measure import TensorBytes

    w = torch.nn.Parameter(torch.randn(64, 64))
    kept = [torch.randn(32, 64) for _ in range(42)]  # 8 KB each, alive throughout, like receive buffers
    probe = TensorBytes()
    probe.start([w])
    for x in kept[:40]:  # one microbatch at a time: forward, backward
        (x @ w).sum().backward()
    first, second = ((x @ w).sum() for x in kept[40:])  # then two in flight: 16 KB saved
    first.backward()
    second.backward()
    assert probe.stop() == 2 * 32 * 64 * 4


@pytest.mark.distributed
@pytest.mark.parametrize("schedule,m,workload", [("interleaved-1f1b", 2, "mnist"),
                                                 ("interleaved-1f1b", 4, "examples/tiny_lm.py:build")])
def test_receive_buffers_are_what_torch_allocates(schedule, m, workload):
    """The receive buffers predicted for each rank, to the byte, against those torch.distributed.pipelining
    allocated after a step (a CNN's boundaries of different sizes; an LM's four stages on two ranks)."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "pipeline_buffers.py"), schedule, str(m), workload],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", proc.stdout)]  # two ranks' lines may meet
    assert len(ranks) == 2 and all(r["allocated"] > 0 and r["allocated"] == r["predicted"] for r in ranks), ranks


TP_COUNT = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from parallelnn.measure import TensorBytes
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
counted = []
for tp in (False, True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    if tp:
        parallelize_module(model, init_device_mesh("cpu", (1,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = torch.randn(32, 256).relu()  # an activation, as a layer before the pair would give it
    probe = TensorBytes()
    probe.start([*model.parameters()])
    model(x).square().mean().backward()
    counted.append(probe.stop())
print(*counted)
dist.destroy_process_group()
"""


def test_saved_dtensors_count_as_their_local_shards():
    """Tensor parallelism's layers save DTensors, wrappers without storage of their own: counted as their local
    shards. On one rank the plan shards nothing, so it saves what the plain model saves."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", TP_COUNT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, tp = map(int, proc.stdout.split())
    # The first Linear's input, the ReLU's output (the second Linear's input too), the square's input.
    assert plain == 32 * (256 + 64 + 10) * 4 and tp == plain, (plain, tp)


BAD = [
    (["iris", "--nproc-max", "0"], "--nproc-max 0: at least one process is needed"),
    (["iris", "--nproc-max", "64"], "--nproc-max 64: 64 processes on"),
    (["iris", "--predict", "9xTPU"], "unknown hardware '9xTPU'"),
    (["iris", "--predict", "gpus_per_node=8,bf16_tflops=abc"], "bf16_tflops"),
    (["iris", "--budget-seconds", "0.5"], "--budget-seconds 0.5 is too small for one trial"),
    (["iris", "--trials", "9"], "--trials 9: between 1 and 8"),
    (["iris", "--strategy", "ddp"], "unknown option --strategy"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(b[0][1:]) for b in BAD])
def test_bad_advise_input_is_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "a"
    assert main("advise", *argv, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "advice.json").exists()


def test_a_budget_too_small_for_the_single_process_is_refused_with_what_it_needs():
    """The budget is checked against the single process's trial as predicted (start-up, warm-up and the steps
    it measures, each at twice the predicted time), before any trial runs."""
    from parallelnn.advise import advisor
    from parallelnn.advise.costs import Candidate
    from parallelnn.errors import UserError
    from parallelnn.parallel import Layout

    class Predicted:
        step_seconds = 0.05

    row = advisor.Row(Candidate("single", Layout()), Predicted())
    need = advisor.trial_seconds(row, 1)  # 4 s + (5 warm-up + 20 measured steps) x 2 x 0.05 s
    assert need == pytest.approx(advisor.START_SECONDS + 25 * 2 * 0.05)
    assert advisor.choose_trials([row], 8, budget=need) == [row]
    with pytest.raises(UserError, match=rf"--budget-seconds 5 is too small for one trial: the single process needs "
                                        rf"about {need:.0f} s here"):
        advisor.choose_trials([row], 8, budget=5)


def test_a_workload_that_fails_its_first_step_is_named(tmp_path, capsys):
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import parallelnn

        def build(cfg):
            X, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
            return parallelnn.Workload(model=nn.Linear(3, 2), train=(X, y), test=(X, y))
    """))
    assert main("advise", f"{task}:build", "--out", str(tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the model's forward failed on a batch of inputs shaped [2x4]" in err[0]


@pytest.mark.distributed
def test_report_shows_the_advice(iris_advice, tmp_path):
    _, out = iris_advice
    assert main("report", str(out), "--out", str(tmp_path / "r")) == 0
    index = (tmp_path / "r" / "index.md").read_text()
    assert "## Advice for iris:" in index and "| candidate | predicted ms | measured ms |" in index
    assert (tmp_path / "r" / "plots" / "advice-1.png").stat().st_size > 5000


def test_a_1_5b_gpt_is_predicted_for_32_gpus_without_being_built(tmp_path, capsys):
    """--trials 0 --predict: the model's factory runs on the meta device; nothing of 6 GB is allocated."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tmp_path / "gpt"
    assert main("advise", "examples/gpt_1_5b.py:build", "--trials", "0", "--predict", "4x8xV100-ib1",
                "--precision", "fp16", "--json", "--out", str(out)) == 0
    advice = json.loads(capsys.readouterr().out)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 2e9  # the fp32 weights alone would be 6.2 GB
    assert advice["model"]["parameters"] > 1.5e9 and advice["predict"]["hardware"] == "4x8xV100-ib1"
    rows = advice["predict"]["rows"]
    assert {r["devices"] for r in rows} == {1, 2, 4, 8, 16, 32}
    assert any(r["strategy"] == "ddp" and not r["feasible"] and "needs" in r["reason"] for r in rows)
    assert advice["recommendation"]["measured_samples_per_second"] is None
    assert (out / "predicted-4x8xV100-ib1.png").stat().st_size > 10000


def test_a_trials_spread_and_the_recommendations_noise_clause():
    """The interquartile range of a trial's steps, over their median, goes into the advice; when the winner's
    lead is smaller than what the two medians are known to, the sentence says so."""
    from parallelnn.advise import trials
    from parallelnn.advise.advisor import Row
    from parallelnn.advise.answer import reason_sentence
    from parallelnn.advise.costs import Candidate
    from parallelnn.parallel import Layout

    assert trials.relative_iqr([1.0, 1.0, 1.0]) == 0.0  # too few to say
    assert trials.relative_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.5 - 1.5) / 3.0)

    def row(strategy, layout, seconds, iqr, steps=16):
        t = trials.Trial(Candidate(strategy, layout), "", step_seconds=seconds, samples_per_second=64 / seconds,
                         steps=steps, step_iqr=iqr)
        return Row(t.candidate, None, trial=t)

    steady = [row("single", Layout(), 0.010, 0.02), row("ddp", Layout(dp=2), 0.0105, 0.02)]
    noisy = [row("single", Layout(), 0.010, 0.40), row("ddp", Layout(dp=2), 0.0105, 0.40)]
    assert "noise" not in reason_sentence(steady[0], steady, 64)
    assert trials.median_uncertainty(0.40, 16) == pytest.approx(0.93 * 0.40 / 4)
    # 2 * hypot(0.093, 0.093): two standard errors of the ratio of the two medians.
    assert "within the trials' noise: ±26% on the ratio" in reason_sentence(noisy[0], noisy, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_advise_on_cuda_times_the_gpu_and_estimates_what_its_allocator_holds(tmp_path):
    """On a GPU, advise calibrates there (not on the CPU) and its memory estimate covers what the CUDA allocator
    hands out over the whole trial (``torch.cuda.max_memory_allocated``): within +10 % / -5 %. With --limit 2048
    the trial keeps every training sample the advised run would, so the resident data is the same."""
    out = tmp_path / "advice"
    assert main("advise", "mnist", "--device", "cuda", "--limit", "2048", "--nproc-max", "1", "--out", str(out),
                "--budget-seconds", "60") == 0
    advice = json.loads((out / "advice.json").read_text())
    assert advice["device"] == "cuda"
    single = next(c for c in advice["candidates"] if c["measured_step_seconds"])
    parts = single["memory_breakdown"]
    assert parts["runtime"] >= 0 and parts["data"] >= 2048 * 28 * 28 * 4
    measured = single["measured_peak_memory_bytes"]
    assert -0.05 <= single["memory_bytes_per_rank"] / measured - 1 <= 0.10, (parts, measured)
    # Timed on the GPU: a CPU's rate would predict a step many times slower than the trial measured.
    assert 0.3 < single["predicted_step_seconds"] / single["measured_step_seconds"] < 3


def test_the_faster_of_two_rounds_is_kept_measurement_by_measurement():
    """Other work on a shared machine slows a measurement down, never speeds it up: of two rounds taken seconds
    apart, each figure keeps the faster (a step's (passes, update) pair as one)."""
    first = {"steps": {8: (0.010, 0.002), 16: (0.030, 0.004)}, "stages": {"0-2-8": 0.004, "2-4-8": 0.009}}
    second = {"steps": {8: (0.011, 0.0005), 16: (0.020, 0.004)}, "stages": {"0-2-8": 0.006, "2-4-8": 0.005}}
    assert calibrate.fastest(first, second) == {"steps": {8: (0.011, 0.0005), 16: (0.020, 0.004)},
                                                "stages": {"0-2-8": 0.004, "2-4-8": 0.005}}
    assert calibrate.fastest({"stages": {"a": 1.0}}, {"stages": {}}) == {"stages": {"a": 1.0}}


def test_a_winner_over_the_single_process_is_explained_by_its_own_figures():
    """The single process pays nothing besides compute, so when it is the runner-up the sentence says what the
    winner computes per rank and pays (it said "add 0.0 ms, 0% of its predicted step" of the single process)."""
    from parallelnn.advise import trials
    from parallelnn.advise.advisor import Row
    from parallelnn.advise.answer import reason_sentence
    from parallelnn.advise.costs import Candidate, Prediction
    from parallelnn.parallel import Layout

    def row(strategy, layout, seconds, compute, comm):
        c = Candidate(strategy, layout)
        p = Prediction(c, compute + comm, 64 / (compute + comm), 1e6, {}, compute, comm, comm, 0.0, True, "", [])
        t = trials.Trial(c, "", step_seconds=seconds, samples_per_second=64 / seconds, steps=100, step_iqr=0.01)
        return Row(c, p, trial=t)

    rows = [row("ddp", Layout(dp=2), 0.0120, 0.0125, 0.0029), row("single", Layout(), 0.0150, 0.0157, 0.0)]
    sentence = reason_sentence(rows[0], rows, 64)
    assert sentence.endswith("each of its ranks computes 12.5 ms a step against 15.7 ms for single 1, and "
                             "communication and per-step framework work (collective calls, hooks) add 2.9 ms"), sentence
    rows = [row("single", Layout(), 0.0100, 0.0098, 0.0), row("ddp", Layout(dp=2), 0.0150, 0.0080, 0.0061)]
    assert reason_sentence(rows[0], rows, 64).endswith("its compute alone takes 8.0 ms a step, and communication "
                                                       "and per-step framework work (collective calls, hooks) add "
                                                       "6.1 ms, 43% of its predicted step")
