"""parallelnn info: the machine, the torch build and the measured peaks, cached per machine."""

from __future__ import annotations

import json

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
