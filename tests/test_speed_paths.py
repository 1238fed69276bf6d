"""The speed options on CPU: --compile equals eager, the CUDA-graph engine's logic (static buffers, warm-up,
the uneven last batch outside the graph) equals eager, FSDP2's bf16 MixedPrecisionPolicy equals autocast on a
single process within bf16 tolerance, MFU divides by the peak of the dtype used, and activation checkpointing
changes memory, not results. (The CUDA graph itself needs a GPU: benchmarks/gpu.sh checks it.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import events, main, record

# On CPU even where a GPU is present (the CUDA tests below use a workload without scikit-learn).
IRIS = ("run", "iris", "--epochs", "2", "--limit", "64", "--batch-size", "32", "--log-every", "1", "--quiet",
        "--device", "cpu")


def step_losses(out) -> list[float]:
    return [e["train/loss"] for e in events(out, "step")]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (x, y, rel)


def test_compile_matches_eager_within_1e_5(tmp_path):
    assert main(*IRIS, "--out", str(tmp_path / "eager")) == 0
    assert main(*IRIS, "--out", str(tmp_path / "compiled"), "--compile") == 0
    compiled = record(tmp_path / "compiled")
    assert compiled["strategy_detail"]["compiled_modules"] == 1
    assert_close(step_losses(tmp_path / "compiled"), step_losses(tmp_path / "eager"), 1e-5)
    assert compiled["test_accuracy"] == record(tmp_path / "eager")["test_accuracy"]


@pytest.mark.slow
def test_fsdp_compile_matches_eager_within_1e_5(tmp_path):
    """FSDP2 with each block's forward compiled (its gathers outside the graphs), one rank."""
    assert main(*IRIS, "--out", str(tmp_path / "eager")) == 0
    assert main(*IRIS, "--out", str(tmp_path / "fsdp"), "--strategy", "fsdp", "--compile") == 0
    assert record(tmp_path / "fsdp")["strategy_detail"]["compiled_modules"] == 2  # iris: two Linear blocks
    assert_close(step_losses(tmp_path / "fsdp"), step_losses(tmp_path / "eager"), 1e-5)


# -- the CUDA-graph engine's logic, with an eager stand-in for the graph ------------------------------------

class EagerReplay:
    """``CudaGraphs`` on CPU: a capture records the step and does not count as one; each replay runs it again
    and writes its results into the captured outputs, as a graph replay writes its static tensors."""

    capturable = False

    def __init__(self):
        self.replays = self.captures = 0

    def side_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def capture(self, fn):
        self.captures += 1
        out = fn()  # the captured work, as the graph will run it; undone below (a capture runs nothing)
        first = [True]

        def replay():
            self.replays += 1
            if first[0]:  # the first replay is the step whose work the capture already did
                first[0] = False
                return
            new = fn()
            for o, n in zip(out, new):
                if o is not None:
                    o.copy_(n)

        return replay, out


def tiny_raw(seed: int = 0):
    """70 samples of 6 features, 3 classes, an MLP (no scikit-learn: the GPU machine may lack it)."""
    from parallelnn.workload import Workload

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 6, generator=g), torch.randint(0, 3, (70,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return Workload(model=model, train=(x, y), test=(x[:10], y[:10]), max_grad_norm=1.0)


def tiny_workload(seed: int = 0):
    from parallelnn.workload import complete

    return complete(tiny_raw(seed), seed, "tiny")


def drive(engine_cls, epochs: int = 3, device: str = "cpu", precision: str = "fp32", **kwargs) -> list[float]:
    """Per-step mean losses of ``engine_cls`` trained on the tiny workload (batch 16: an uneven last batch)."""
    from parallelnn.config import RunConfig
    from parallelnn.data.loaders import make_loader

    workload = tiny_workload()
    cfg = RunConfig(workload="tiny", lr=1e-2, max_grad_norm=1.0, precision=precision)
    loader = make_loader("memory", workload.train, 16, torch.device(device), shuffle=True)
    engine = engine_cls(workload.model.to(device), workload, cfg, torch.device(device), len(loader) * epochs,
                        **kwargs)
    losses = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y, n in loader:
            loss, norm = engine.train_step(x, y, 1.0 / n)
            losses.append(float(loss) / n)
            assert norm is not None and norm > 0
    return losses


def test_graphed_engine_logic_matches_eager():
    from parallelnn.parallel.engine import Engine, GraphedEngine

    graphs = EagerReplay()
    graphed = drive(GraphedEngine, graphs=graphs)
    eager = drive(Engine)
    assert_close(graphed, eager, 1e-6)
    # 15 steps of which 3 are warm-up, 3 uneven last batches run eagerly, one capture: 9 replays.
    assert (graphs.captures, graphs.replays) == (1, len(eager) - GraphedEngine.WARMUP_STEPS - 3)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager_on_cuda(precision):
    """The real capture: a captured step with clipping and a capturable Adam, replayed, with the uneven last
    batch eager between replays, gives the eager losses."""
    from parallelnn.parallel.engine import Engine, GraphedEngine

    graphed = drive(GraphedEngine, device="cuda", precision=precision)
    eager = drive(Engine, device="cuda", precision=precision)
    assert_close(graphed, eager, 1e-5 if precision == "fp32" else 1e-2)


def run_tiny(out, **options):
    import parallelnn

    return parallelnn.run(tiny_raw(), out=str(out), epochs=3, batch_size=16, log_every=1, quiet=True, lr=1e-2,
                          **options)


@CUDA
def test_cuda_graph_and_compile_runs_match_eager_on_cuda(tmp_path):
    run_tiny(tmp_path / "eager", device="cuda")
    run_tiny(tmp_path / "graph", device="cuda", cuda_graph=True)
    run_tiny(tmp_path / "compiled", device="cuda", compile=True)
    eager = step_losses(tmp_path / "eager")
    assert record(tmp_path / "graph")["strategy_detail"]["cuda_graph"] is True
    assert_close(step_losses(tmp_path / "graph"), eager, 1e-5)
    assert_close(step_losses(tmp_path / "compiled"), eager, 1e-5)


@CUDA
def test_fsdp_bf16_policy_matches_single_autocast_on_cuda(tmp_path):
    run_tiny(tmp_path / "single", device="cuda", precision="bf16")
    run_tiny(tmp_path / "fsdp", device="cuda", precision="bf16", strategy="fsdp")
    assert record(tmp_path / "fsdp")["peak_dtype"] == "bf16"
    assert_close(step_losses(tmp_path / "fsdp"), step_losses(tmp_path / "single"), 2e-2)


def test_cuda_graph_is_refused_where_it_cannot_work(tmp_path, capsys):
    assert main(*IRIS, "--out", str(tmp_path / "a"), "--cuda-graph") == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert main(*IRIS, "--out", str(tmp_path / "b"), "--cuda-graph", "--strategy", "ddp") == 2
    assert "--cuda-graph applies to --strategy single only" in capsys.readouterr().err
    assert main(*IRIS, "--out", str(tmp_path / "c"), "--compile", "--strategy", "pipeline", "--nproc", "2") == 2
    assert "--compile applies to --strategy" in capsys.readouterr().err
    assert main(*IRIS, "--out", str(tmp_path / "d"), "--tf32") == 2
    assert "--tf32 is a CUDA matrix-multiply mode" in capsys.readouterr().err
    assert main(*IRIS, "--out", str(tmp_path / "e"), "--strategy", "fsdp", "--reduce-precision", "bf16") == 2
    assert "--reduce-precision applies with --precision bf16" in capsys.readouterr().err


# -- mixed precision ----------------------------------------------------------------------------------------

def test_fsdp_bf16_policy_matches_single_autocast(tmp_path):
    """FSDP2's MixedPrecisionPolicy (bf16 parameters, fp32 reduction, fp32 outputs; no autocast) against
    autocast bf16 on one process: equal within bf16 tolerance, and both measurably not fp32."""
    for name, extra in (("fp32", ()), ("single", ("--precision", "bf16")),
                        ("fsdp", ("--precision", "bf16", "--strategy", "fsdp"))):
        assert main(*IRIS, "--out", str(tmp_path / name), *extra) == 0
    fsdp = record(tmp_path / "fsdp")
    assert fsdp["strategy_detail"]["mixed_precision"] == {"param_dtype": "bf16", "reduce_dtype": "fp32",
                                                          "output_dtype": "fp32", "by": "FSDP2 MixedPrecisionPolicy"}
    single, sharded, fp32 = (step_losses(tmp_path / n) for n in ("single", "fsdp", "fp32"))
    assert_close(sharded, single, 2e-2)  # bf16 has an 8-bit mantissa: ~4e-3 per rounding
    assert max(abs(a - b) / b for a, b in zip(sharded, fp32)) > 1e-5  # bf16 was really used
    assert_close(sharded, fp32, 3e-2)
    # The weights stay fp32 (the optimizer steps fp32 master weights).
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "fsdp" / "model.safetensors")).values()} == {torch.float32}


def test_mfu_divides_by_the_peak_of_the_dtype_used(tmp_path, monkeypatch):
    from parallelnn import measure

    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    peaks = {"fp32": 1e11, "bf16": 4e11}
    with measure._all_cores(cpu):
        cache = {measure._cache_key(cpu, measure.COMPUTE_DTYPES[d]): v for d, v in peaks.items()}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "peak.json").write_text(json.dumps(cache))
    for dtype in peaks:
        out = tmp_path / dtype
        assert main(*IRIS, "--out", str(out), "--precision", dtype) == 0
        rec = record(out)
        assert rec["peak_dtype"] == dtype and rec["peak_flops"] == peaks[dtype]
        assert math.isclose(rec["mfu"], rec["flops_per_sample"] * rec["samples_per_second"] / peaks[dtype])
    assert measure.compute_dtype("fp32", True, torch.device("cuda")) == "tf32"
    assert measure.compute_dtype("fp32", True, cpu) == "fp32"
    assert measure.compute_dtype("bf16", True, torch.device("cuda")) == "bf16"


# -- activation checkpointing -------------------------------------------------------------------------------

def test_activation_checkpointing_gpt2_blocks_same_gradients_less_memory():
    from transformers import GPT2Config, GPT2LMHeadModel

    from parallelnn.measure import TensorBytes
    from parallelnn.parallel.engine import checkpoint_blocks
    from parallelnn.workloads.gpt2 import CausalLM, transformer_blocks
    from parallelnn.tasks import lm_loss

    def build():
        torch.manual_seed(0)
        return CausalLM(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=3, n_embd=32, n_head=2, n_positions=32,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)))

    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointed in (False, True):
        model = build()
        if checkpointed:
            assert checkpoint_blocks(transformer_blocks(model)) == 3
        probe = TensorBytes()
        probe.start()
        lm_loss(model(x), x).backward()
        saved = probe.stop()
        results.append((saved, {k: p.grad.clone() for k, p in model.named_parameters()}, model.state_dict().keys()))
    (plain_bytes, plain_grads, plain_keys), (ckpt_bytes, ckpt_grads, ckpt_keys) = results
    assert list(plain_keys) == list(ckpt_keys)  # names unchanged: checkpoints and saved models still load
    for k in plain_grads:
        torch.testing.assert_close(ckpt_grads[k], plain_grads[k], rtol=1e-5, atol=1e-7)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_activation_checkpointing_run_records_its_blocks(tmp_path, capsys):
    assert main(*IRIS, "--out", str(tmp_path / "plain")) == 0
    assert main(*IRIS, "--out", str(tmp_path / "ckpt"), "--activation-checkpointing") == 0
    assert record(tmp_path / "ckpt")["strategy_detail"]["checkpointed_blocks"] == 2  # iris: its two Linears
    assert_close(step_losses(tmp_path / "ckpt"), step_losses(tmp_path / "plain"), 1e-6)
