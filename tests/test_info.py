"""parallelnn info: the machine, the torch build and the measured peaks, cached per machine."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import cli, main
from parallelnn import measure


def info_json(capsys, *extra: str) -> dict:
    assert main("info", "--json", *extra) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_has_the_keys(capsys):
    info = info_json(capsys)
    assert {"host", "platform", "python", "parallelnn", "cpu", "memory_bytes", "gpus", "mps", "torch", "peaks",
            "peak_cache"} <= set(info)
    assert info["cpu"]["model"] and info["cpu"]["cores"] >= 1 and info["memory_bytes"] > 0
    assert {"version", "cuda_build", "cuda_available", "mps_available", "gloo", "nccl"} <= set(info["torch"])
    assert info["torch"]["version"] == torch.__version__ and info["torch"]["gloo"] is True
    assert isinstance(info["gpus"], list) and len(info["gpus"]) == torch.cuda.device_count()
    for gpu in info["gpus"]:
        assert {"name", "memory_bytes", "capability"} <= set(gpu)
    cpu = info["peaks"]["cpu"]
    assert 1e8 < cpu["fp32_flops"] < 1e14 and 1e8 < cpu["memory_bandwidth_bytes_per_second"] < 1e13
    if info["gpus"]:
        assert {"fp32_flops", "tf32_flops", "memory_bandwidth_bytes_per_second"} <= set(info["peaks"]["cuda"])
    # Records' peak_flops is this probe: the value run uses is the one info shows.
    assert measure.peak_flops(torch.device("cpu")) == cpu["fp32_flops"]


def test_peaks_are_cached_and_refresh_measures_again(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))  # the fake peaks below must not reach other tests
    first = info_json(capsys)["peaks"]["cpu"]
    assert (tmp_path / "peak.json").is_file()

    def no_probe(*a, **k):
        raise AssertionError("probed although cached")

    monkeypatch.setattr(measure, "_probe", no_probe)
    monkeypatch.setattr(measure, "_bandwidth_probe", no_probe)
    assert info_json(capsys)["peaks"]["cpu"] == first
    monkeypatch.setattr(measure, "_probe", lambda device, dtype: 1.5e9)
    monkeypatch.setattr(measure, "_bandwidth_probe", lambda device: 2.5e9)
    fresh = info_json(capsys, "--refresh")["peaks"]["cpu"]
    assert fresh["fp32_flops"] == 1.5e9 and fresh["memory_bandwidth_bytes_per_second"] == 2.5e9
    assert measure.peak_flops(torch.device("cpu")) == 1.5e9  # the refreshed value is what runs now use


def test_info_text_from_the_command_line():
    proc = cli("info")
    assert proc.returncode == 0, proc.stderr
    for start in ("CPU ", "memory ", "GPU", "torch ", "peak "):
        assert any(line.startswith(start) for line in proc.stdout.splitlines()), (start, proc.stdout)
    assert "GFLOP/s" in proc.stdout or "TFLOP/s" in proc.stdout
    assert "GB/s" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_tf32_is_a_cuda_mode():
    with pytest.raises(ValueError):
        measure.peak_tf32_flops(torch.device("cpu"))


def test_a_probe_is_the_best_of_several_rounds_and_says_when(monkeypatch, tmp_path, capsys):
    """A busy machine reads low in some rounds: the peak is the best round, stamped with its time."""
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))
    readings = iter([148e9, 221e9, 150e9])  # what three rounds read while other work comes and goes
    monkeypatch.setattr(measure, "_probe", lambda device, dtype: next(readings))
    monkeypatch.setattr(measure, "PROBE_PAUSE_S", 0.0)
    entry = measure.peak_entry(torch.device("cpu"), refresh=True)
    assert entry["value"] == 221e9 and entry["source"] == "probe"
    cached = json.loads((tmp_path / "peak.json").read_text())
    assert [e["measured_at"] for e in cached.values()] == [entry["measured_at"]]
    assert entry["measured_at"].endswith("Z") and entry["measured_at"][:4].isdigit()
    info = info_json(capsys)
    assert info["peaks"]["cpu"]["fp32_flops"] == 221e9
    assert info["peaks"]["cpu"]["fp32_measured_at"] == entry["measured_at"]


def test_an_older_cache_of_bare_numbers_still_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))
    key = measure._cache_key(torch.device("cpu"), torch.float32)
    (tmp_path / "peak.json").write_text(json.dumps({key: 1.48e11}))
    assert measure.peak_entry(torch.device("cpu")) == {"value": 1.48e11, "measured_at": None, "source": "probe"}


def test_a_run_that_beats_the_cached_peak_has_it_probed_again(monkeypatch, tmp_path):
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "PROBE_PAUSE_S", 0.0)
    cpu = torch.device("cpu")
    monkeypatch.setattr(measure, "_probe", lambda device, dtype: 148e9)  # probed while the machine was busy
    first = measure.peak_entry(cpu)
    assert first["value"] == 148e9

    def no_probe(*a, **k):
        raise AssertionError("probed although the run stayed below the peak")

    monkeypatch.setattr(measure, "_probe", no_probe)
    assert measure.check_peak(cpu, 120e9) == 148e9  # below the peak: nothing to do
    monkeypatch.setattr(measure, "_probe", lambda device, dtype: 220e9)  # the machine is quiet now
    assert measure.check_peak(cpu, 190e9) == 220e9
    assert measure.peak_flops(cpu) == 220e9  # every later run divides by the honest peak
    assert measure.peak_entry(cpu)["measured_at"] >= first["measured_at"]


def test_a_peak_is_never_below_work_actually_done(monkeypatch, tmp_path):
    """With the real probe: a run that reached more than any probe sets the peak itself (MFU <= 1)."""
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "PROBE_ROUNDS", 1)
    cpu = torch.device("cpu")
    probed = measure.peak_flops(cpu)
    achieved = 50 * probed  # beyond what this machine can probe
    assert measure.check_peak(cpu, achieved) == achieved
    entry = measure.peak_entry(cpu)
    assert entry["value"] == achieved and entry["source"] == "achieved by a run"


def test_a_rank_with_a_share_of_the_cores_divides_by_the_whole_machines_peak(monkeypatch, tmp_path):
    """A rank computing with one thread checks the run's rate against the peak of all cores, the one MFU divides
    by (it used the one-thread peak: a 2-rank DDP run on two cores read MFU 0.79 instead of 0.34)."""
    monkeypatch.setenv("PARALLELNN_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "PROBE_PAUSE_S", 0.0)
    monkeypatch.setattr(measure, "_probe", lambda device, dtype: 100e9 * torch.get_num_threads())
    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = measure.peak_flops(cpu)
        assert whole == 100e9 * (os.cpu_count() or 1)
        measure._store(measure._cache_key(cpu, torch.float32), 100e9)  # a one-thread peak in the cache too
        assert measure.check_peak(cpu, 50e9) == whole
    finally:
        torch.set_num_threads(saved)
