"""The analytic cost model of ``parallelnn advise``: collectives, memory and time per strategy, hardware
presets, predictions over layouts, and a 1.5B-parameter model measured on the meta device.

Expected numbers are computed by hand in each test from round inputs, so a change of formula shows.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from conftest import ROOT

from parallelnn import parallel
from parallelnn.advise import costs
from parallelnn.advise.costs import Candidate, Group, ModelStats, predict_step
from parallelnn.advise.hardware import PRESETS, Hardware, Link, parse_hardware
from parallelnn.advise.predict import candidates, plot_curves, predict_curves
from parallelnn.errors import UserError
from parallelnn.parallel import Layout

# Two nodes of four devices: 100 GB/s, 1 us within a node; 10 GB/s per device, 10 us across; one NIC per node.
HW = Hardware(name="test 2x4", device_type="cuda", peak_flops={"fp32": 10e12, "tf32": 50e12, "bf16": 100e12,
                                                               "fp16": 100e12},
              memory_bytes=int(1e12), devices_per_node=4, intra=Link(100e9, 1e-6), inter=Link(10e9, 10e-6),
              matmul_efficiency=0.5, max_devices=8, notes="test", nics_per_node=1)

# 1e9 parameters (fp32), 6 TFLOPs and 1 GB of saved activations per sample, 10 layers, 80% TP-shardable.
STATS = ModelStats(parameters=10**9, parameter_bytes=4 * 10**9, flops_per_sample=6e12, activation_bytes_per_sample=1e9,
                   layers=10, largest_layer_parameters=10**8, boundary_bytes_per_sample=1e6,
                   tp_allreduce_bytes_per_sample=2e7, tp_sharded_fraction=0.8)


def predict(strategy, batch=8, dtype="bf16", **layout_and_more):
    extra = {k: layout_and_more.pop(k) for k in ("microbatches", "schedule", "activation_checkpointing")
             if k in layout_and_more}
    return predict_step(STATS, HW, Candidate(strategy, Layout(**layout_and_more), **extra), batch, dtype)


# -- collectives --------------------------------------------------------------------------------------

def test_placement_of_groups_on_nodes_of_four():
    assert costs.placement(4, 1, 4) == Group(4, 4, 1)  # one node
    assert costs.placement(8, 1, 4) == Group(8, 4, 2)  # two nodes, four each
    assert costs.placement(2, 4, 4) == Group(2, 1, 2)  # dp across nodes when tp fills a node
    assert costs.placement(4, 2, 4) == Group(4, 2, 2)
    assert costs.placement(1, 1, 4) == Group(1, 1, 1)


def test_ring_collectives_within_a_node():
    g = Group(4, 4, 1)
    assert costs.all_reduce(HW, g, 1e9) == pytest.approx(2 * 3 / 4 * 1e9 / 100e9 + 2 * 3 * 1e-6)  # 0.015006
    assert costs.all_gather(HW, g, 1e9) == pytest.approx(3 / 4 * 1e9 / 100e9 + 3 * 1e-6)  # 0.007503
    assert costs.reduce_scatter(HW, g, 1e9) == pytest.approx(0.007503)
    assert costs.all_reduce(HW, Group(1, 1, 1), 1e9) == 0.0


def test_collectives_across_nodes_flat_and_hierarchical():
    # One rank per node: a ring over the inter-node link.
    assert costs.all_reduce(HW, Group(2, 1, 2), 1e9) == pytest.approx(2 * 1 / 2 * 1e9 / 10e9 + 2 * 1 * 10e-6)
    # Four per node on two nodes: reduce-scatter inside, all-reduce of a quarter across, all-gather inside.
    inside = 3 / 4 * 1e9 / 100e9 + 3 * 1e-6
    across = 2 * 1 / 2 * (1e9 / 4) / 10e9 + 2 * 10e-6
    assert costs.all_reduce(HW, Group(8, 4, 2), 1e9) == pytest.approx(2 * inside + across)  # 0.040026
    # All-gather: a quarter across nodes among same-local-rank peers, then the whole inside.
    assert costs.all_gather(HW, Group(8, 4, 2), 1e9) == pytest.approx(1 / 2 * (1e9 / 4) / 10e9 + 10e-6 + inside)


def test_point_to_point_inside_and_across_nodes():
    assert costs.send_recv(HW, 1e8, same_node=True) == pytest.approx(1e8 / 100e9 + 1e-6)
    # A lone flow has the node's one NIC to itself: 4 devices x 10 GB/s share = 40 GB/s.
    assert costs.send_recv(HW, 1e8, same_node=False) == pytest.approx(1e8 / 40e9 + 10e-6)


# -- memory per rank ------------------------------------------------------------------------------------

def test_memory_of_one_device_and_of_ddp():
    m = predict("single", dp=1).memory_breakdown
    assert m == {"parameters": 4e9, "gradients": 4e9, "optimizer": 8e9, "activations": 8e9, "buffers": 0.0}
    m = predict("ddp", dp=4).memory_breakdown  # a whole replica, a quarter of the batch; gradients are bucket views
    assert m == {"parameters": 4e9, "gradients": 4e9, "optimizer": 8e9, "activations": 2e9, "buffers": 0.0}


def test_fsdp_divides_parameters_gradients_and_optimizer_by_dp():
    m = predict("fsdp", dp=4).memory_breakdown
    # 3 unsharded copies of the largest block (computing, prefetched, its gradient): 3 x 1e8 x 4 bytes.
    assert m == pytest.approx({"parameters": 1e9, "gradients": 1e9, "optimizer": 2e9, "activations": 2e9,
                               "buffers": 1.2e9})


def test_tensor_parallel_halves_only_the_sharded_fraction():
    m = predict("tensor", tp=2).memory_breakdown
    held = 1 - 0.8 + 0.8 / 2  # 0.6 of the model
    assert m["parameters"] == pytest.approx(4e9 * held) and m["optimizer"] == pytest.approx(8e9 * held)
    assert m["activations"] == pytest.approx(8e9 * held)  # whole batch per tp rank, sharded part over 2


def test_hybrid_divides_by_the_tensor_degree_once():
    """DeepSpeed's autotuner shards ZeRO state over all GPUs and then divides by the TP degree again
    (deepspeedai/DeepSpeed#6796, "double-dipping"): here FSDP shards over dp only, after TP took its 1/tp."""
    m = predict("hybrid", dp=2, tp=4).memory_breakdown
    tp_held = 1e9 * (0.2 + 0.8 / 4)  # 0.4e9 parameters per tp rank, then FSDP over dp=2
    assert m["parameters"] == pytest.approx(tp_held * 4 / 2)  # 0.8e9 bytes
    assert m["parameters"] != pytest.approx(1e9 * (0.2 + 0.8 / 16) * 4 / 2)
    assert m["optimizer"] == pytest.approx(tp_held * 8 / 2)
    assert m["activations"] == pytest.approx(4 * 1e9 * 0.4)  # 4 samples per dp row, 0.4 of each


def test_pipeline_activations_in_flight_per_schedule():
    # pp=2, m=4 microbatches of 2 samples; each rank holds half the layers.
    gpipe = predict("pipeline", pp=2, microbatches=4, schedule="gpipe").memory_breakdown
    one_f = predict("pipeline", pp=2, microbatches=4, schedule="1f1b").memory_breakdown
    inter = predict("pipeline", pp=2, microbatches=4, schedule="interleaved-1f1b").memory_breakdown
    assert gpipe["parameters"] == pytest.approx(2e9)
    assert gpipe["activations"] == pytest.approx(4 * 2 * 1e9 / 2)  # all 4 microbatches
    assert one_f["activations"] == pytest.approx(2 * 2 * 1e9 / 2)  # up to p = 2
    assert inter["activations"] == pytest.approx(2.5 * 2 * 1e9 / 2)  # p + (p-1)/v = 2.5


@pytest.mark.parametrize("p,v", [(2, 2), (3, 2), (4, 2), (2, 3), (4, 3)])
def test_interleaved_passes_run_in_torchs_order(p, v):
    """The order the cost model walks is the one torch's ScheduleInterleaved1F1B runs (its private
    per-rank list of actions, read here only to check ours against)."""
    from torch.distributed.pipelining import schedules

    from parallelnn.parallel.pipeline import actions

    for m in [m for m in range(1, 13) if m % max(1, m // p) == 0]:
        sched = object.__new__(schedules.ScheduleInterleaved1F1B)
        sched.n_local_stages, sched.pp_group_size, sched._n_microbatches = v, p, m
        sched.number_of_rounds = max(1, m // p)
        sched.microbatches_per_round = m // sched.number_of_rounds
        for rank in range(p):
            theirs = [(a.computation_type == schedules._ComputationType.FORWARD, a.stage_index // p)
                      for a in sched._calculate_single_rank_operations(rank) if a is not None]
            assert actions("interleaved-1f1b", p, m, v, rank) == theirs, (p, v, m, rank)


def test_interleaved_ranks_hold_their_own_chunks_in_flight():
    """Two ranks, two chunks each, 4 microbatches. Rank 0 runs forwards 0,0,1,1,0 | B1 F0 B1 F1 B0 ...: when its
    sixth forward starts, all 4 microbatches of its first chunk are held and 1 of its second. Rank 1: 0,0,1 |
    B1 F1 B1 F0 ...: 3 of its first chunk at most. Equal chunks give p + (p-1)/v = 2.5 rank-microbatches; a
    first chunk three times as heavy as the second holds 13/4 = 3.25 of the average chunk pair's."""
    from parallelnn.parallel.pipeline import actions, held

    assert held(actions("interleaved-1f1b", 2, 4, 2, 0), [0.5, 0.5]) == 2.5
    assert held(actions("interleaved-1f1b", 2, 4, 2, 0), [3.0, 1.0]) == 4 * 3.0 + 1 * 1.0
    assert held(actions("interleaved-1f1b", 2, 4, 2, 1), [3.0, 1.0]) == 3 * 3.0
    assert held(actions("1f1b", 4, 8, 1, 1), [1.0]) == 3 and held(actions("1f1b", 4, 2, 1, 1), [1.0]) == 2
    assert held(actions("gpipe", 2, 4, 1, 1), [1.0]) == 4


def test_a_pipeline_rank_keeps_receive_buffers_for_every_microbatch():
    """torch.distributed.pipelining allocates a receive buffer per microbatch, kept between steps: activations
    into every stage but the first, gradients into every stage but the last."""
    from dataclasses import replace

    from parallelnn.parallel.pipeline import receive_buffers

    s = replace(STATS, boundary_bytes_per_sample=10.0)
    assert [receive_buffers(s, 2, 1, r, 8) for r in (0, 1)] == [80.0, 80.0]  # gradients in; activations in
    assert [receive_buffers(s, 2, 2, r, 8) for r in (0, 1)] == [240.0, 240.0]  # stages 0+2, 1+3: 3 each
    assert [receive_buffers(s, 4, 1, r, 8) for r in range(4)] == [80.0, 160.0, 160.0, 80.0]
    m = predict("pipeline", pp=2, microbatches=4, schedule="1f1b").memory_breakdown
    assert m["buffers"] == pytest.approx(8 * STATS.boundary_bytes_per_sample)  # one direction, the batch of 8
    # Where the stages' layers are known, each boundary at its own size: stages (0, 2) and (2, 3) of three
    # layers send the second layer's output and receive its gradient back.
    outputs = replace(s, layer_output_bytes_per_sample=[5.0, 3.0, 7.0])
    assert receive_buffers(outputs, 2, 1, 0, 8, [(0, 2)]) == receive_buffers(outputs, 2, 1, 1, 8, [(2, 3)]) == 24.0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b"]), st.integers(1, 8), st.integers(1, 16),
       st.data())
def test_every_forward_is_freed_by_its_backward(schedule, p, m, data):
    from parallelnn.parallel.pipeline import VIRTUAL, actions, held

    v = VIRTUAL.get(schedule, 1)
    assume(v == 1 or m % max(1, m // p) == 0)
    rank = data.draw(st.integers(0, p - 1))
    order = actions(schedule, p, m, v, rank)
    for chunk in range(v):
        passes = [forward for forward, c in order if c == chunk]
        assert passes.count(True) == passes.count(False) == m
        assert all(passes[:i + 1].count(True) >= passes[:i + 1].count(False) for i in range(len(passes)))
    assert 1 / v <= held(order, [1 / v] * v) <= m


def test_activation_recomputation_keeps_layer_inputs_and_costs_one_forward():
    plain, ckpt = predict("single", dp=1), predict("single", dp=1, activation_checkpointing=True)
    # 10 layer inputs of 1 MB x 8 samples, plus one layer's activations (8 GB / 10) being recomputed.
    assert ckpt.memory_breakdown["activations"] == pytest.approx(8e7 + 8e8)
    assert ckpt.compute_seconds == pytest.approx(plain.compute_seconds * 4 / 3)
    # Under tensor parallelism the layer inputs stay whole; the recomputed layer's are 0.6 of it.
    tp = predict("tensor", tp=2, activation_checkpointing=True)
    assert tp.memory_breakdown["activations"] == pytest.approx(8e7 + 8e9 * 0.6 / 10)
    # In a pipeline stage (half the layers, 1F1B: 2 microbatches of 2 samples): 5 layer inputs + one layer.
    pp = predict("pipeline", pp=2, microbatches=4, schedule="1f1b", activation_checkpointing=True)
    assert pp.memory_breakdown["activations"] == pytest.approx(1e6 * 4 * 5 + 4 * 1e9 / 2 / 5)


# -- time ---------------------------------------------------------------------------------------------

def test_compute_ddp_and_fsdp_step_times():
    single = predict("single", dp=1)
    assert single.compute_seconds == pytest.approx(8 * 6e12 / (100e12 * 0.5))  # 0.96 s
    ddp = predict("ddp", dp=4)  # 2 samples per rank: 0.24 s, backward 0.16 s > all-reduce 0.06 s
    assert ddp.comm_seconds == pytest.approx(2 * 3 / 4 * 4e9 / 100e9 + 6e-6)
    bucket = 2 * 3 / 4 * 25 * 2**20 / 100e9 + 6e-6  # only the last 25 MiB bucket is exposed
    assert ddp.exposed_comm_seconds == pytest.approx(bucket)
    assert ddp.step_seconds == pytest.approx(0.24 + bucket)
    # fp16 (autocast, no mixed-precision policy): gathers at the parameters' fp32, as the gradients.
    fsdp = predict("fsdp", dp=4, dtype="fp16")  # gather twice + reduce-scatter, overlapped; the first block's exposed
    gather = 3 / 4 * 4e9 / 100e9 + 3e-6
    assert fsdp.comm_seconds == pytest.approx(3 * gather)
    assert fsdp.exposed_comm_seconds == pytest.approx(3 / 4 * 4e8 / 100e9 + 3e-6)
    # ZeRO-3 moves 1.5x DDP's volume (3 x params vs all-reduce's 2 x params).
    assert (fsdp.comm_seconds - 9e-6) / (ddp.comm_seconds - 6e-6) == pytest.approx(1.5)


def test_fsdp_under_bf16_gathers_bf16_and_reduces_fp32():
    # fsdp.policies: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) -> 2 bytes/param per gather.
    p = predict("fsdp", dp=4)
    gather, reduce = 3 / 4 * 2e9 / 100e9 + 3e-6, 3 / 4 * 4e9 / 100e9 + 3e-6
    assert p.comm_seconds == pytest.approx(2 * gather + reduce)  # 0.060009
    assert p.exposed_comm_seconds == pytest.approx(3 / 4 * 2e8 / 100e9 + 3e-6)  # the first block, at bf16
    # hybrid pipeline stages are sharded without a policy: their gathers stay at fp32.
    hp = predict("hybrid", dp=2, pp=2, microbatches=2, schedule="1f1b")
    assert any("parameters' dtype (no mixed-precision policy)" in a for a in hp.assumptions)


def test_fsdp_exposes_what_compute_cannot_hide():
    # dp=8 over two nodes, one sample per rank: 0.12 s of compute, 0.24 s of gathers and reduce-scatter.
    p = predict("fsdp", batch=8, dp=8, dtype="fp16")
    assert p.exposed_comm_seconds == pytest.approx(p.comm_seconds - p.compute_seconds
                                                  + costs.all_gather(HW, Group(8, 4, 2), 4e8))


def test_tensor_parallel_all_reduces_are_on_the_critical_path():
    p = predict("tensor", tp=2)
    per_call = 2e7 * 8 / 20  # 20 calls (2 per layer), the whole batch's activations
    assert p.comm_seconds == pytest.approx(2 * 20 * (per_call / 100e9 + 2 * 1e-6))
    assert p.exposed_comm_seconds == p.comm_seconds
    assert p.compute_seconds == pytest.approx(0.96 * 0.6)
    # A CNN's head: the backward all-reduces the gradient of the flattened features (one call, 50x the bytes of
    # the logits the forward sums).
    from dataclasses import replace

    head = replace(STATS, tp_allreduce_bytes_per_sample=256.0, tp_allreduce_calls=1,
                   tp_backward_allreduce_bytes_per_sample=12800.0, tp_backward_allreduce_calls=1)
    p = predict_step(head, HW, Candidate("tensor", Layout(tp=2)), 8)
    assert p.comm_seconds == pytest.approx((256 + 12800) * 8 / 100e9 + 2 * 2 * 1e-6)
    # Its first Linear reads the data (no gradient wanted): no backward all-reduce.
    none = predict_step(replace(head, tp_backward_allreduce_calls=0), HW, Candidate("tensor", Layout(tp=2)), 8)
    assert none.comm_seconds == pytest.approx(256 * 8 / 100e9 + 2 * 1e-6)


def idle(stages: int, microbatches: int, virtual: int = 1) -> float:
    """The idle share of a step of equal stages, from the pipeline's bubble."""
    from parallelnn.parallel.pipeline import bubble

    seconds = bubble(1.0, microbatches, virtual, [1 / stages] * stages)
    return seconds / (1.0 + seconds)


def test_pipeline_bubble_per_schedule():
    assert idle(4, 8) == pytest.approx(3 / 11)  # gpipe and 1f1b: (p-1)/(m+p-1)
    assert idle(4, 8, virtual=2) == pytest.approx(3 / 19)  # interleaved: (p-1)/(v m+p-1)
    for schedule, bubble in (("gpipe", 0.48 * 1 / 4), ("1f1b", 0.48 * 1 / 4), ("interleaved-1f1b", 0.48 * 1 / 8)):
        p = predict("pipeline", pp=2, microbatches=4, schedule=schedule)
        assert p.compute_seconds == pytest.approx(0.48)
        assert p.bubble_seconds == pytest.approx(bubble)  # step x (p-1)/(v m+p-1) = compute x (p-1)/(v m)
        assert p.bubble_seconds / p.step_seconds == pytest.approx(
            idle(2, 4, 2 if schedule.startswith("inter") else 1), rel=0.01)


def test_pipeline_boundary_transfers_within_and_across_nodes():
    inside, across = 1e6 / 100e9 + 1e-6, 1e6 / 40e9 + 10e-6  # one sample's 1 MB boundary; a lone flow's NIC
    p = predict("pipeline", pp=2, microbatches=8, schedule="1f1b")  # one node: 8 microbatches + 1 hop, fwd+bwd
    assert p.exposed_comm_seconds == pytest.approx(2 * 8 * inside + 2 * inside)
    p = predict("pipeline", pp=8, microbatches=8, schedule="1f1b")  # two nodes: 1 of the 7 hops crosses
    assert p.exposed_comm_seconds == pytest.approx(2 * 8 * across + 2 * (6 * inside + across))
    assert costs.microbatch_options(16, 4) == [4, 8, 16] and costs.microbatch_options(6, 4) == [3]


def test_infeasible_layouts_say_why():
    assert predict("ddp", batch=6, dp=4).reason == "the global batch of 6 does not divide over 4 data-parallel ranks"
    assert "6 microbatches do not divide" in predict("pipeline", pp=2, microbatches=6, schedule="1f1b").reason
    assert predict("pipeline", pp=8, microbatches=8, schedule="interleaved-1f1b").reason == \
        "16 pipeline stages but the model has 10 layers to split"  # 8 ranks x 2 virtual stages
    small = Hardware(**{**HW.__dict__, "memory_bytes": int(10e9)})
    p = predict_step(STATS, small, Candidate("ddp", Layout(dp=4)), 8, "bf16")
    assert not p.feasible and p.reason == "needs 18.0 GB per GPU, has 10.0 GB"


# -- hardware ------------------------------------------------------------------------------------------

def test_presets_have_figures_and_sources():
    assert {"8xH100-nvlink", "2x8xH100-ib", "8xA100-pcie", "4x8xV100-ib1"} <= set(PRESETS)
    h100 = parse_hardware("8xH100-nvlink")
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12) and h100.max_devices == 8
    assert parse_hardware("2x8xH100-ib").max_devices == 16
    v100 = parse_hardware("4x8xV100-ib1")
    assert v100.max_devices == 32 and v100.inter.bandwidth * 8 == pytest.approx(12e9)  # ONE 100 Gb/s NIC
    assert parse_hardware("8xA100-pcie").intra.bandwidth < 32e9  # PCIe 4 x16 nameplate
    for hw in PRESETS.values():
        assert len(hw.notes) > 100 and set(hw.peak_flops) == {"fp32", "tf32", "bf16", "fp16"}


def test_custom_hardware_figures():
    hw = parse_hardware("gpus_per_node=8,nodes=2,bf16_tflops=989,fp32_tflops=67,memory_gb=80,intra_gbps=450,"
                        "intra_latency_us=5,inter_gbps=50,inter_latency_us=10,efficiency=0.55")
    assert (hw.devices_per_node, hw.max_devices, hw.memory_bytes) == (8, 16, 80 * 10**9)
    assert hw.peak_flops == {"fp32": 67e12, "tf32": 67e12, "bf16": 989e12, "fp16": 989e12}
    assert (hw.intra, hw.inter) == (Link(450e9, 5e-6), Link(50e9, 10e-6))
    assert hw.matmul_efficiency == 0.55


@pytest.mark.parametrize("text, message", [
    ("9xH200", r"unknown hardware '9xH200': choose a preset \(8xH100-nvlink, 2x8xH100-ib, 8xA100-pcie, 4x8xV100"),
    ("gpus_per_node=8,memory_gb=80", r"lacks intra_gbps, bf16_tflops or fp32_tflops"),
    ("gpus_per_node=8,nodes=2,memory_gb=80,intra_gbps=300,bf16_tflops=300", r"lacks inter_gbps"),
    ("gpus_per_node=8,memory_gb=-80,intra_gbps=300,bf16_tflops=300", r"memory_gb=-80 must be a positive number"),
    ("gpus_per_node=8,memory_gb=0,intra_gbps=300,bf16_tflops=300", r"memory_gb=0 must be a positive number"),
    ("gpus_per_node=8,memory_gb=lots,intra_gbps=300", r"memory_gb='lots' is not a number"),
    ("gpus_per_node=8,memory_gb=nan,intra_gbps=300", r"memory_gb=nan must be a positive number"),
    ("gpus_per_node=2.5,memory_gb=80,intra_gbps=300", r"gpus_per_node=2.5 must be a whole number"),
    ("gpus_per_node=8,memory_gb=80,intra_gbps=300,bf16_tflops=300,efficiency=1.5", r"efficiency=1.5 must be a fraction"),
    ("gpus_per_node=8,vram_gb=80", r"unknown hardware figure 'vram_gb': use gpus_per_node, nodes,"),
    ("gpus_per_node=8,gpus_per_node=4", r"'gpus_per_node' is given twice"),
    ("gpus_per_node=8,memory_gb", r"'memory_gb' is not key=value"),
])
def test_bad_hardware_is_one_line_naming_the_problem(text, message):
    with pytest.raises(UserError, match=message) as err:
        parse_hardware(text)
    assert "\n" not in str(err.value)


# -- candidates and rankings -----------------------------------------------------------------------------

def test_candidates_cover_every_factorisation_and_microbatch_count():
    found = candidates(16, None, 64)
    layouts = {(c.strategy, c.layout) for c in found}
    assert ("ddp", Layout(dp=16)) in layouts and ("fsdp", Layout(dp=16)) in layouts
    assert ("tensor", Layout(tp=16)) in layouts and not any(c.strategy == "single" for c in found)
    for dp, inner in ((2, 8), (4, 4), (8, 2)):
        assert ("hybrid", Layout(dp=dp, tp=inner)) in layouts and ("hybrid", Layout(dp=dp, pp=inner)) in layouts
    pipes = {(c.microbatches, c.schedule) for c in found if c.strategy == "pipeline"}
    assert pipes == {(m, s) for m in (16, 32, 64) for s in ("gpipe", "1f1b", "interleaved-1f1b")}
    assert {c.microbatches for c in found if c.layout == Layout(dp=4, pp=4)} == {4, 8, 16}  # of 16 per row


def test_the_cost_model_names_no_strategy():
    """Strategy knowledge lives in parallelnn/parallel: the advise modules never spell a strategy's name."""
    for path in (ROOT / "parallelnn" / "advise").glob("*.py"):
        text = path.read_text()
        for name in parallel.names():
            assert not re.search(rf"""["']{re.escape(name)}["']""", text), f"{path.name} names {name}"


def gpt_stats(layers: int, hidden: int, seq: int = 1024, vocab: int = 50257) -> ModelStats:
    """A GPT's statistics from its shape (Megatron's counts; flash attention, bf16 activations)."""
    block = 12 * hidden**2 + 13 * hidden
    params = layers * block + (vocab + seq) * hidden + 2 * hidden
    return ModelStats(parameters=params, parameter_bytes=4 * params,
                      flops_per_sample=6 * params * seq + 12 * layers * seq**2 * hidden,
                      activation_bytes_per_sample=34 * seq * hidden * layers + 4 * seq * vocab,
                      layers=layers + 2, largest_layer_parameters=max(block, vocab * hidden),
                      boundary_bytes_per_sample=2 * seq * hidden, tp_allreduce_bytes_per_sample=2 * layers * 2 * seq * hidden,
                      tp_sharded_fraction=layers * 12 * hidden**2 / params, tokens_per_sample=seq)


def test_tensor_parallel_over_pcie_is_slower_than_fsdp_for_gpt2_medium():
    hw, medium = parse_hardware("8xA100-pcie"), gpt_stats(24, 1024)
    tensor = predict_step(medium, hw, Candidate("tensor", Layout(tp=8)), 32, "bf16")
    fsdp = predict_step(medium, hw, Candidate("fsdp", Layout(dp=8)), 32, "bf16")
    assert tensor.feasible and fsdp.feasible
    assert tensor.step_seconds > 1.5 * fsdp.step_seconds


def test_ddp_of_a_model_too_big_for_80gb_is_infeasible_while_fsdp_fits():
    hw, big = parse_hardware("8xH100-nvlink"), gpt_stats(32, 4096)  # ~6.7B parameters: 16 bytes each > 80 GB
    ddp = predict_step(big, hw, Candidate("ddp", Layout(dp=8)), 8, "bf16")
    fsdp = predict_step(big, hw, Candidate("fsdp", Layout(dp=8)), 8, "bf16")
    assert not ddp.feasible and re.fullmatch(r"needs \d+\.\d GB per GPU, has 80\.0 GB", ddp.reason)
    assert fsdp.feasible, fsdp.reason


def test_curves_and_their_figure(tmp_path):
    table = predict_curves(gpt_stats(24, 1024), parse_hardware("2x8xH100-ib"), 64, "bf16", device_counts=[1, 8, 16])
    ones = [r for r in table.rows if r["devices"] == 1]
    assert max(r["speedup"] for r in ones) == pytest.approx(1.0)
    best = table.best()
    assert ("fsdp", 16) in best and best[("fsdp", 16)]["speedup"] > 8
    assert any("predicted, not measured" in a for a in table.assumptions)
    out = plot_curves(table, tmp_path / "predicted.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- a model larger than this machine ------------------------------------------------------------------

def test_a_1_5b_gpt_on_the_meta_device_predicted_for_32_gpus():
    transformers = pytest.importorskip("transformers")
    from parallelnn.advise.predict import stats_from_meta

    config = transformers.GPT2Config(n_layer=48, n_embd=1600, n_head=25)
    start = time.perf_counter()
    stats = stats_from_meta(lambda: transformers.GPT2LMHeadModel(config), (1, 1024), compute_dtype="bf16")
    assert stats.parameters == 1_557_611_200 and stats.parameter_bytes == 4 * 1_557_611_200
    assert 6 * stats.parameters * 1024 < stats.flops_per_sample < 1.2 * 6 * stats.parameters * 1024
    assert stats.layers == 50 and stats.tokens_per_sample == 1024
    assert stats.largest_layer_parameters == 50257 * 1600 + 1024 * 1600 + 2 * 1600  # the root: embeddings, ln_f
    assert stats.boundary_bytes_per_sample == 1024 * 1600 * 2
    # Fused attention: well under the seq x seq weights' 48 x 25 x 1024^2 x 2 bytes (2.5 GB) alone.
    assert 2e9 < stats.activation_bytes_per_sample < 8e9
    table = predict_curves(stats, parse_hardware("4x8xV100-ib1"), 64, "fp16", device_counts=[32])
    assert time.perf_counter() - start < 15
    feasible = [r for r in table.rows if r["feasible"]]
    assert feasible and all(r["memory_bytes_per_rank"] <= 32e9 for r in feasible)
    assert any(r["strategy"] == "ddp" and "needs" in r["reason"] for r in table.rows)  # 25 GB of state + activations


# -- what this machine's calibration adds: fixed costs, the optimizer step, timed pipeline stages -----------

def test_measured_fixed_cost_and_optimizer_step_add_to_the_step():
    from dataclasses import replace

    hw = replace(HW, optimizer_seconds_per_parameter=1e-10)
    plain = predict_step(STATS, HW, Candidate("fsdp", Layout(dp=4)), 8, "bf16")
    p = predict_step(STATS, hw, Candidate("fsdp", Layout(dp=4)), 8, "bf16", fixed_seconds=0.05)
    # FSDP over 4 ranks updates a quarter of the 1e9 parameters: 2.5e8 x 1e-10 s = 0.025 s.
    assert p.optimizer_seconds == pytest.approx(0.025)
    assert p.fixed_seconds == 0.05
    assert p.step_seconds == pytest.approx(plain.step_seconds + 0.05 + 0.025)
    assert p.to_dict()["fixed_seconds"] == 0.05 and p.to_dict()["optimizer_seconds"] == pytest.approx(0.025)


def test_fixed_costs_grow_with_what_each_strategy_repeats():
    """FSDP pays its hooks and collectives per block (and the root), tensor parallelism per all-reduce;
    the others once a step."""
    from dataclasses import replace

    s = replace(STATS, blocks=7, tp_allreduce_calls=3)
    assert parallel.get("fsdp").cost.fixed_units(s) == 8
    assert parallel.get("tensor").cost.fixed_units(s) == 3
    assert parallel.get("tensor").cost.fixed_units(replace(s, tp_allreduce_calls=0)) == 2 * s.layers
    assert parallel.get("ddp").cost.fixed_units is None and parallel.get("pipeline").cost.fixed_units is None


def test_pipeline_ranks_name_their_stages():
    from dataclasses import replace

    from parallelnn.parallel.pipeline import stage_shares

    s = replace(STATS, layers=4, layer_flops=[1.0, 3.0, 1.0, 1.0], layer_parameters=[1, 1, 1, 1],
                layer_activation_bytes_per_sample=[1.0] * 4)
    ranks = stage_shares(s, 2, 1)
    assert [r["stages"] for r in ranks] == [[(0, 2)], [(2, 4)]]
    assert [r["flops"] for r in ranks] == [pytest.approx(4 / 6), pytest.approx(2 / 6)]
    interleaved = stage_shares(s, 2, 2)  # four one-layer stages: rank 0 holds the 1st and 3rd
    assert [r["stages"] for r in interleaved] == [[(0, 1), (2, 3)], [(1, 2), (3, 4)]]


def test_an_unbalanced_pipeline_idles_for_the_light_stages_only():
    from parallelnn.parallel.pipeline import bubble

    # Equal stages: the textbook (p-1)/(v*m) of the compute.
    assert bubble(1.0, 4, 1, [0.25] * 4) == pytest.approx(3 / 4)
    assert bubble(1.0, 4, 2, [0.25] * 4) == pytest.approx(3 / 8)
    # A convolution stage with 90% of the work and a light head: the head's one microbatch, not 1/m.
    assert bubble(0.9, 2, 1, [0.9, 0.1]) == pytest.approx(0.9 / 2 * 0.1 / 0.9)


def test_stages_timed_here_set_the_bubble_where_their_flops_would_not():
    """A head with a tenth of the FLOPs may take a quarter of the time (memory-bound layers): with the stages
    timed (this machine's calibration), the ranks' shares of the work are their stages' seconds."""
    from dataclasses import replace

    s = replace(STATS, layers=2, layer_flops=[9.0, 1.0], layer_parameters=[1, 1],
                layer_activation_bytes_per_sample=[1.0, 1.0])
    c = Candidate("pipeline", Layout(pp=2), microbatches=2, schedule="1f1b")
    by_flops = predict_step(s, HW, c, 8)
    assert by_flops.bubble_seconds == pytest.approx(by_flops.compute_seconds / 2 * 0.1 / 0.9)
    timed = predict_step(s, replace(HW, stage_seconds=[0.03, 0.01]), c, 8)
    assert timed.compute_seconds == by_flops.compute_seconds  # the busiest rank's time is the rate's to set
    assert timed.bubble_seconds == pytest.approx(timed.compute_seconds / 2 * 0.01 / 0.03)


# -- memory-bound work, recomputed share, causal attention, grouped-query attention's saved tensors ----------

def test_memory_bound_bytes_add_at_the_hbm_bandwidth_only_where_the_hardware_states_it():
    from dataclasses import replace

    stats = replace(STATS, nonmatmul_bytes_per_sample=1e10, nonmatmul_block_forward_bytes_per_sample=2e9)
    fast = replace(HW, memory_bandwidth=2e12)
    p = predict_step(stats, fast, Candidate("single", Layout()), 8)
    assert p.compute_seconds == pytest.approx(8 * 6e12 / (100e12 * 0.5) + 8 * 1e10 / 2e12)  # 0.96 + 0.04 s
    # Recomputation reruns the blocks' forward: their 2 GB a sample move again.
    ckpt = predict_step(stats, fast, Candidate("single", Layout(), activation_checkpointing=True), 8)
    assert ckpt.compute_seconds == pytest.approx(0.96 * 4 / 3 + 8 * 1.2e10 / 2e12)
    # Without a bandwidth (this machine's calibrated rate covers it) the bytes add nothing.
    assert predict_step(stats, HW, Candidate("single", Layout()), 8).compute_seconds == pytest.approx(0.96)
    # Tensor parallel: 60% of the bytes sharded over 2 ranks, 40% whole -> 0.7 of them; FLOPs 0.8/2 + 0.2 = 0.6.
    tp = predict_step(replace(stats, tp_sharded_nonmatmul_fraction=0.6), fast, Candidate("tensor", Layout(tp=2)), 8)
    assert tp.compute_seconds == pytest.approx(0.96 * 0.6 + 0.04 * 0.7)


def test_recomputation_reruns_only_the_blocks_forward():
    from dataclasses import replace

    plain = predict("single", dp=1)
    stats = replace(STATS, block_flops_fraction=0.9)  # 10% in the embedding, LM head and loss
    ckpt = predict_step(stats, HW, Candidate("single", Layout(), activation_checkpointing=True), 8)
    assert ckpt.compute_seconds == pytest.approx(plain.compute_seconds * (1 + 0.9 / 3))  # 1.248 s
    # DDP's overlap window: the recomputed forward and the backward, 0.3 + 2/3 of the 1.3.
    inp = costs.CostInputs(stats, HW, Candidate("ddp", Layout(dp=2), activation_checkpointing=True), 8, "bf16", 8, 1)
    assert costs.backward_seconds(inp, 1.3) == pytest.approx(0.3 + 2 / 3)


def test_causal_attention_keeps_the_lower_triangle():
    from parallelnn.advise.predict import causal_kept

    assert causal_kept(4, 4) == pytest.approx(10 / 16)  # 1 + 2 + 3 + 4 of 16
    assert causal_kept(2, 4) == pytest.approx(3 / 8)  # query i sees keys 0..i (PyTorch's top-left mask)
    assert causal_kept(4, 2) == pytest.approx((1 + 2 + 2 + 2) / 8)


class _Attention:
    """A block of one projection and causal SDPA over 4 heads of 8 (kv_heads=2: grouped-query)."""

    @staticmethod
    def build(causal: bool, kv_heads: int = 4):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.kv = nn.Linear(32, 32, bias=False), nn.Linear(32, 16 * kv_heads, bias=False)

            def forward(self, x):
                b, s, _ = x.shape
                q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
                k, v = self.kv(x).view(b, s, 2 * kv_heads, 8).transpose(1, 2).chunk(2, dim=1)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != 4
                                                      ).transpose(1, 2).reshape(b, s, 32)

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([Block()])

            def forward(self, x):
                return self.blocks[0](x)

        return Model, torch.float32


def test_stats_count_causal_attention_at_its_kept_half():
    from parallelnn.advise.predict import causal_kept, stats_from_meta

    s, heads, d = 64, 4, 8
    full, dtype = _Attention.build(False)
    causal, _ = _Attention.build(True)
    a = stats_from_meta(full, (1, s, 32), input_dtype=dtype)
    b = stats_from_meta(causal, (1, s, 32), input_dtype=dtype)
    # The projections' FLOPs are the same in both; attention: 2 s^2 d per head for each of its 2 matmuls
    # forward and 5 backward (FlopCounterMode's sdpa formulas), of which the causal mask skips 1 - kept.
    attention = (2 + 5) * 2 * s * s * d * heads
    assert a.flops_per_sample - b.flops_per_sample == pytest.approx(attention * (1 - causal_kept(s, s)))
    assert b.block_flops_fraction == pytest.approx(1.0)


def test_grouped_query_sdpa_saves_kv_heads_and_no_scores():
    from parallelnn.advise.predict import stats_from_meta

    s = 64
    grouped, dtype = _Attention.build(True, kv_heads=2)
    stats = stats_from_meta(grouped, (1, s, 32), input_dtype=dtype, compute_dtype="bf16")
    # Saved, at 2 bytes: x (s x 32), q (s x 32), k and v at 2 heads (s x 16 each, one s x 32 storage), the
    # output (s x 32), logsumexp (4 heads x s, as fp32 scaled to 2 bytes), the kernel's random seed and offset
    # (two int64); no 4 x s x s scores (32 KB).
    assert stats.activation_bytes_per_sample == pytest.approx(2 * (4 * s * 32 + 4 * s) + 16)


def test_memory_bound_traffic_of_a_linear_relu_block_on_the_meta_device():
    import torch
    from torch import nn

    from parallelnn.advise.predict import stats_from_meta

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU())])

        def forward(self, x):
            return self.blocks[0](x)

    stats = stats_from_meta(Model, (2, 16), input_dtype=torch.float32, compute_dtype="bf16")
    # Bytes at bf16 for a batch of 2 x 16 (64 bytes a tensor); the matmuls (addmm, mm) are FLOPs, not bytes.
    # Forward: relu reads and writes 64 + 64; the loss's sum reads 64, writes a 2-byte scalar.
    # Backward: ones_like of the scalar 2 + 2; threshold_backward reads the (broadcast scalar) gradient 2 and the
    # relu output 64, writes 64; the bias gradient's sum reads 64, writes 16 x 2 bytes.
    forward, backward = 128 + 66, 4 + 130 + 96
    assert stats.nonmatmul_bytes_per_sample == pytest.approx((forward + backward) / 2)
    assert stats.nonmatmul_block_forward_bytes_per_sample == pytest.approx(128 / 2)  # relu: the block's forward
