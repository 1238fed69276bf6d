"""Every strategy against the single-process reference: same losses step by step, same final weights.

Each case runs as a user would run it (``parallelnn run ... --nproc N``, ranks started through
torchrun's agent, gloo on CPU). 300 samples at batch 64 make 5 steps, the last one uneven (44),
which exercises uneven shards and the pipeline's microbatch fallback.
"""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import cli, record, step_losses
from parallelnn.config import RunConfig
from parallelnn.runner import execute

pytestmark = pytest.mark.distributed

COMMON = ["mnist", "--epochs", "1", "--limit", "300", "--log-every", "1", "--quiet"]
CASES = [  # (id, extra arguments, processes)
    ("ddp", ["--strategy", "ddp"], 2),
    ("fsdp", ["--strategy", "fsdp"], 2),
    ("fsdp-no-reshard", ["--strategy", "fsdp", "--no-reshard-after-forward"], 2),
    ("pipeline-gpipe", ["--strategy", "pipeline", "--schedule", "gpipe"], 2),
    ("pipeline-1f1b", ["--strategy", "pipeline", "--schedule", "1f1b", "--microbatches", "2"], 2),
    ("pipeline-interleaved", ["--strategy", "pipeline", "--schedule", "interleaved-1f1b"], 2),
    ("tensor", ["--strategy", "tensor"], 2),
    ("ddp-dataloader", ["--strategy", "ddp", "--loader", "dataloader"], 2),
    ("hybrid-fsdp-tensor", ["--strategy", "hybrid", "--mesh", "2x2"], 4),
    ("hybrid-fsdp-pipeline", ["--strategy", "hybrid", "--mesh", "2x2", "--hybrid", "pipeline"], 4),
]


def single_process(tmp_path_factory, name: str, **options):
    """The single-process run every layout is compared with."""
    out = tmp_path_factory.mktemp("ref") / name
    execute(RunConfig(epochs=1, log_every=1, quiet=True, out=str(out), **options))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process(tmp_path_factory, "single", workload="mnist", limit=300)


@pytest.mark.parametrize("name,args,nproc", CASES, ids=[c[0] for c in CASES])
def test_matches_single_process(name, args, nproc, reference, tmp_path):
    out = tmp_path / name
    proc = cli("run", *COMMON, *args, "--nproc", str(nproc), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = step_losses(reference), step_losses(out)
    assert len(got) == len(expected) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    ref_w, got_w = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert got_w.keys() == ref_w.keys()
    # Adam divides by the root of the second moment, so a weight whose gradient is ~0 (a dead ReLU
    # unit) can move by a fraction of lr (1e-3) on a last-bit difference in that gradient. Seen: 2 of
    # 401,408 fc1 weights 1.2e-5 apart. So: every weight within 5% of lr, and nearly all within 1e-6.
    for key in ref_w:
        diff = (got_w[key] - ref_w[key]).abs()
        assert diff.max() <= 5e-5, (key, float(diff.max()))
        assert (diff > 1e-6).float().mean() < 1e-3, (key, int((diff > 1e-6).sum()))
    rec, ref = record(out), record(reference)
    assert rec["world_size"] == nproc and rec["strategy"] == args[1]
    assert rec["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1e-3)  # same weights, ±1 sample
    assert len(rec["per_rank"]) == nproc and all("comm_share" in r for r in rec["per_rank"])
    if len(os.sched_getaffinity(0)) == os.cpu_count():  # nothing held this machine's processes to fewer cores
        share = max(1, os.cpu_count() // nproc)  # each rank on its own share, one core each in turn when fewer
        expected = [list(range(r * share, r * share + share)) if os.cpu_count() >= nproc else [r % os.cpu_count()]
                    for r in range(nproc)]
        assert [r["cores"] for r in rec["per_rank"]] == expected


# Iris (120 training samples) at batch 7: 17 batches of 7, then one of a single sample, which leaves
# the second data-parallel rank an empty share and gives the pipeline one microbatch for two stages.
SHORT = ["iris", "--epochs", "1", "--batch-size", "7", "--log-every", "1", "--quiet"]
SHORT_CASES = [("ddp", ["--strategy", "ddp"]), ("fsdp", ["--strategy", "fsdp"]),
               ("pipeline", ["--strategy", "pipeline"]), ("tensor", ["--strategy", "tensor"])]


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory):
    return single_process(tmp_path_factory, "single-short", workload="iris", batch_size=7)


@pytest.mark.parametrize("name,args", SHORT_CASES, ids=[c[0] for c in SHORT_CASES])
def test_the_last_short_batch_trains_as_in_one_process(name, args, short_reference, tmp_path):
    out = tmp_path / name
    proc = cli("run", *SHORT, *args, "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = step_losses(short_reference), step_losses(out)
    assert len(got) == len(expected) == 18
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    rec, ref = record(out), record(short_reference)
    assert rec["steps"] == ref["steps"] == 18 and rec["samples"] == ref["samples"] == 120
    ref_w, got_w = load_file(short_reference / "model.safetensors"), load_file(out / "model.safetensors")
    for key in ref_w:
        torch.testing.assert_close(got_w[key], ref_w[key], rtol=0, atol=5e-5)


def test_an_interleaved_pipelines_short_batch_takes_microbatches_torch_accepts(tmp_path_factory, tmp_path):
    """276 samples at batch 64 leave a last batch of 20: at --microbatches 8 its largest divisor, 5, is not a
    multiple of interleaved 1F1B's rounds over two ranks (5 // 2 = 2), which torch refuses; it runs as 4."""
    reference = single_process(tmp_path_factory, "single-276", workload="mnist", limit=276)
    out = tmp_path / "interleaved"
    proc = cli("run", "mnist", "--epochs", "1", "--limit", "276", "--log-every", "1", "--quiet", "--strategy",
               "pipeline", "--schedule", "interleaved-1f1b", "--microbatches", "8", "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = step_losses(reference), step_losses(out)
    assert len(got) == len(expected) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@given(batch=st.integers(1, 512), most=st.integers(1, 32), ranks=st.integers(1, 8), interleaved=st.booleans())
def test_a_batch_runs_as_the_most_microbatches_it_divides_into_that_the_schedule_accepts(batch, most, ranks,
                                                                                       interleaved):
    from parallelnn.parallel.pipeline import fitting_microbatches

    def accepted(m: int) -> bool:  # torch's ScheduleInterleaved1F1B: a multiple of its max(1, m // ranks) rounds
        return batch % m == 0 and not (interleaved and m % max(1, m // ranks))

    m = fitting_microbatches(batch, most, ranks, interleaved)
    assert 1 <= m <= most and accepted(m) and not any(accepted(k) for k in range(m + 1, most + 1))


def test_interleaved_microbatches_torch_would_refuse_are_a_user_error():
    from types import SimpleNamespace

    from parallelnn.errors import UserError
    from parallelnn.parallel.pipeline import microbatches

    cfg = SimpleNamespace(microbatches=16, schedule="interleaved-1f1b")
    with pytest.raises(UserError, match=r"multiple of its rounds \(16 // 3 = 5\); 16 is not \(try 12\)"):
        microbatches(cfg, 48, 6)  # three ranks, two stages each
    assert microbatches(SimpleNamespace(microbatches=12, schedule="interleaved-1f1b"), 48, 6) == 12
    assert microbatches(SimpleNamespace(microbatches=16, schedule="1f1b"), 48, 3) == 16
